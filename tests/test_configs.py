"""The paper-table configs (experiments/configs/*.py) and the Colab quickstart notebook.

Every config file and every variant loads through `sculpt_jax.config.load_config("path:variant")`,
uses only the default config's keys (with the default's types), locks, and has sane values; smoke
variants are small enough for a CPU run of about a minute.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from sculpt_jax import config as config_lib
from sculpt_jax import models, patterns

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
EXPECTED_FILES = {
    "digits_resnet20.py": ("resnet20", "digits"),
    "resnet20_cifar10.py": ("resnet20", "cifar10"),
    "resnet56_cifar10.py": ("resnet56", "cifar10"),
    "resnet110_cifar10.py": ("resnet110", "cifar10"),
    "vgg19_cifar100.py": ("vgg19", "cifar100"),
    "vgg16_imagenet.py": ("vgg16_imagenet", "imagenet2012"),
    "resnet50_imagenet.py": ("resnet50", "imagenet2012"),
    "mobilenet_v2_imagenet.py": ("mobilenet_v2_imagenet", "imagenet2012"),
    "vit_b16_imagenet.py": ("vit_b16", "imagenet2012"),
}
TARGETS = {"t30": 0.3, "t50": 0.5, "t70": 0.7}
DIGITS_VAL, DIGITS_TRAIN = 400, 1100


def _files():
    return sorted(p.name for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def _variants(name: str) -> list[str | None]:
    spec = importlib.util.spec_from_file_location("cfg_variants_" + name[:-3], CONFIG_DIR / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tokens = list(mod.VARIANTS)
    out: list[str | None] = [None, *tokens]
    out += [f"{t},smoke" for t in tokens if t in TARGETS]
    return out


CASES = [(f, v) for f in sorted(EXPECTED_FILES) for v in _variants(f)]


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_the_expected_config_files_exist():
    assert set(_files()) == set(EXPECTED_FILES)


@pytest.mark.parametrize(("name", "variant"), CASES, ids=lambda x: str(x))
def test_config_loads_locks_and_is_sane(name, variant):
    spec = str(CONFIG_DIR / name) + (f":{variant}" if variant else "")
    cfg = config_lib.load_config(spec)
    cfg.lock()
    assert cfg.is_locked
    default = _flat(config_lib.get_default_config())
    got = _flat(cfg)
    assert set(got) == set(default), "configs may only use the default config's keys"
    for k, v in got.items():
        assert type(v) is type(default[k]), f"{k}: {type(v).__name__} vs {type(default[k])}"
    tokens = (variant or "").split(",")
    smoke = "smoke" in tokens
    model, dataset = EXPECTED_FILES[name]
    # Model, data, library and graph level are valid names.
    assert cfg.model in models.list_models()
    assert cfg.search.library in patterns.library_names()
    assert cfg.search.level in ("filter", "layer")
    assert cfg.search.method == "ppo"
    assert cfg.search.flops_kind == "true", "tables report true FLOPs; the band uses them too"
    if smoke:
        assert cfg.dataset == "digits"
        if model == cfg.model:
            pass  # the row's own model on 8x8 digits (CIFAR rows)
        else:  # ImageNet rows: the family's tiny model
            assert models.model_spec(cfg.model).family == models.model_spec(model).family
            assert "tiny" in cfg.model
    else:
        assert (cfg.model, cfg.dataset) == (model, dataset)
    # Targets.
    assert 0.0 < cfg.search.target_flops < 1.0
    assert 0.0 < cfg.search.band < 0.5
    for t, value in TARGETS.items():
        if t in tokens:
            assert cfg.search.target_flops == value
    if not any(t in TARGETS for t in tokens) and name.startswith(("resnet", "vgg", "digits")):
        assert cfg.search.target_flops == 0.5
    # Budgets.
    assert cfg.pretrain.epochs >= 1 and cfg.finetune.epochs >= 1
    assert cfg.search.iterations >= 1 and cfg.search.top_k >= 1
    val = DIGITS_VAL if cfg.dataset == "digits" else cfg.val_size
    if val > 0:  # the reward set and the held-out part fit in the validation split
        held = val // 2 if cfg.search.heldout_size < 0 else cfg.search.heldout_size
        reward = val - held if cfg.search.reward_set_size < 0 else cfg.search.reward_set_size
        assert reward >= 1 and reward + held <= val
    if cfg.dataset == "digits":
        assert cfg.search.bn_recalib_batches * cfg.search.bn_recalib_batch_size <= DIGITS_TRAIN
    if smoke:
        assert cfg.pretrain.epochs <= 2 and cfg.finetune.epochs <= 2
        assert cfg.search.iterations * cfg.search.n_envs * cfg.search.n_steps <= 64
        assert cfg.search.top_k == 1
        assert cfg.search.reward_set_size <= 128
        assert not cfg.pretrain.checkpoint
        assert cfg.autocompress.admm_iterations * cfg.autocompress.admm_steps <= 64
    elif cfg.dataset != "digits":  # paper rows: AutoCompress's ADMM trains for >= 1 epoch
        n_train = 45000 if cfg.dataset.startswith("cifar") else 1_000_000
        ac = cfg.autocompress
        assert ac.admm_iterations * ac.admm_steps * cfg.finetune.batch_size >= n_train
    # Every variant gets its own workdir.
    assert cfg.workdir.startswith("runs/" + name[:-3])
    if variant:
        assert cfg.workdir.endswith("_" + variant.replace(",", "_"))


def test_vit_uses_region_patterns_on_a_layer_graph():
    for v in (None, "smoke"):
        cfg = config_lib.load_config(
            str(CONFIG_DIR / "vit_b16_imagenet.py") + (f":{v}" if v else "")
        )
        assert cfg.search.library == "vit6" and cfg.search.level == "layer"


def test_digits_resnet20_is_the_default_main_job():
    cfg = _flat(config_lib.load_config(str(CONFIG_DIR / "digits_resnet20.py")))
    default = _flat(config_lib.get_default_config())
    diff = {k for k in cfg if cfg[k] != default[k]}
    assert diff <= {"workdir"}


def test_bad_variants_are_rejected_with_the_valid_list():
    with pytest.raises(ValueError, match=r"unknown config variant.*t30.*smoke"):
        config_lib.load_config(str(CONFIG_DIR / "resnet56_cifar10.py") + ":t40")
    with pytest.raises(ValueError, match="two FLOPs targets"):
        config_lib.load_config(str(CONFIG_DIR / "resnet56_cifar10.py") + ":t30,t70")


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_docstring_gives_command_budget_runtime_and_expected_numbers(name):
    spec = importlib.util.spec_from_file_location("cfg_doc_" + name[:-3], CONFIG_DIR / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.__doc__ or ""
    assert f"python -m sculpt_jax run --config experiments/configs/{name}" in doc
    assert f"experiments/configs/{name}:smoke" in doc or f"{name}:t30,smoke" in doc
    for word in ("Budget", "Runtime", "Expected numbers"):
        assert word in doc, f"{name}: docstring lacks {word!r}"
    if name != "digits_resnet20.py":
        assert "not yet measured" in doc
        assert "withdrawn" in doc


def test_colab_notebook_is_valid_and_stripped():
    nb = json.loads((ROOT / "experiments" / "colab" / "quickstart.ipynb").read_text())
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["cells"] and isinstance(nb["metadata"], dict)
    code = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            code.append("".join(cell["source"]))
    text = "\n".join(code)
    assert 'CONFIG = "experiments/configs/resnet20_cifar10.py:smoke"' in text
    assert '"-m", "sculpt_jax", "run", "--config", CONFIG' in text
    assert '"install", "-q", "--no-deps"' in text
    for line in text.splitlines():  # never replace Colab's jax (tests/test_notebook.py runs it)
        if "pip" in line:
            assert '"jax' not in line and "'jax" not in line, line
