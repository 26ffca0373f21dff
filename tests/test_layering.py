"""The module dependency direction of DESIGN.md section 2, enforced on the source."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "sculpt_jax"

# DESIGN.md section 2, in list order: a module imports only modules listed before it.
ORDER = [
    "types",
    "tree_util",
    "paths",
    "config",
    "patterns",
    "trace",
    "data",
    "input_pipeline",
    "sharding",
    "checkpoint",
    "models",
    "graph",
    "masking",
    "flops",
    "latency",
    "decode",
    "gnn",
    "training",
    "agent",
    "bandit",
    "env",
    "search",
    "compaction",
    "report",
    "pipeline",
    "api",
    "cli",
    "__main__",
]
LAYERS = {name: i for i, name in enumerate(ORDER)}
LAYERS["__init__"] = -1
FILESYSTEM_OK = {"paths", "data", "checkpoint", "report", "cli", "pipeline", "config"}


def _module_key(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path.name}: use absolute imports (from sculpt_jax.x import y)"
            if node.module and node.module.startswith("sculpt_jax."):
                yield node.module.split(".")[1]
            elif node.module == "sculpt_jax":
                for alias in node.names:
                    yield alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sculpt_jax."):
                    yield alias.name.split(".")[1]


SOURCES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_respect_layers(path):
    me = _module_key(path)
    assert me in LAYERS, f"{me} has no place in DESIGN.md's order; add it to ORDER"
    for dep in _imports(path):
        if dep == me or dep not in LAYERS:
            continue
        if me == "__init__":
            continue
        assert LAYERS[dep] < LAYERS[me], (
            f"{path.name} imports {dep}, which DESIGN.md lists after it (dependency direction)"
        )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_core_is_model_agnostic_and_io_free(path):
    me = _module_key(path)
    deps = set(_imports(path))
    if me not in ("models", "cli", "__main__", "pipeline", "__init__"):
        assert "models" not in deps, f"{path.name}: the core must not import sculpt_jax.models"
    if me not in FILESYSTEM_OK and me != "models":
        src = path.read_text()
        for bad in ("open(", "os.makedirs", "np.save", "np.load("):
            assert bad not in src, (
                f"{path.name} touches the filesystem ({bad}); only IO modules may"
            )
