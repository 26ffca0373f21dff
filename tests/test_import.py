"""Importing sculpt_jax starts no JAX backend: a user's script (or the CLI) may import every module
and only then join a multi-host job (`sharding.initialize_distributed`, which must run before any
backend use), as README's "Devices" section says."""

import os
import pkgutil
import subprocess
import sys

import sculpt_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_every_module_starts_no_backend():
    names = sorted(m.name for m in pkgutil.walk_packages(sculpt_jax.__path__, "sculpt_jax.")
                   if m.name != "sculpt_jax.__main__")  # fmt: skip
    assert "sculpt_jax.pipeline" in names and "sculpt_jax.search.runner" in names
    code = ("import importlib, sys\n"
            "import jax._src.xla_bridge as xb\n"
            "for n in sys.argv[1:]:\n"
            "    importlib.import_module(n)\n"
            "    assert not xb._backends, f'importing {n} started a JAX backend'\n"
            "print('ok', len(sys.argv) - 1)\n")  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code, *names], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"ok {len(names)}"
