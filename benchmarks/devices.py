"""Search evaluation over devices: one call's N candidates scored on 1 device vs split over D
(`env.candidate_runner`, the main job's mesh), same candidates, same reward set, in one process.

Set the device count before JAX starts; on CPU, fake devices share the machine's cores:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/devices.py
    python benchmarks/devices.py --model resnet20 --candidates 16   # on a multi-GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, time_fn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet8_tiny")
    p.add_argument("--shape", default="32,32,3")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--reward", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    header("search evaluation: N candidates on 1 device vs split over all devices")
    import jax
    import jax.numpy as jnp

    from sculpt_jax import env as env_lib
    from sculpt_jax import graph, patterns, trace
    from sculpt_jax import sharding as shd
    from sculpt_jax.models import get_model, init_model

    shape = tuple(int(s) for s in a.shape.split(","))
    model = get_model(a.model, num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(0), shape)
    lg = trace.trace_model(model.apply, variables, jnp.zeros((1, *shape)))
    lib = patterns.get_library("reference6")
    spec = graph.build_graph_spec(lg, n_patterns=lib.n_patterns,
                                  valid=graph.default_valid(lg, lib.n_patterns, lib))  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.reward, *shape)).astype(np.float32)
    y = rng.integers(0, 10, a.reward).astype(np.int32)
    calib = rng.normal(size=(1, 64, *shape)).astype(np.float32)
    valid = np.asarray(spec.valid)
    ids = np.where(spec.action_mask[None],
                   np.argmax(rng.random((a.candidates, *valid.shape)) * valid, -1), -1)
    ids = jnp.asarray(ids.astype(np.int32))
    out = {}
    n = jax.device_count()
    for name, mesh in (("1 device", None), (f"{n} devices", shd.make_mesh())):
        e = env_lib.make_env(model.apply, variables, spec, x, y, library=lib, calib_images=calib,
                             mesh=mesh)  # fmt: skip
        fn = jax.jit(e.evaluate)
        out[name] = (time_fn(lambda fn=fn, e=e: jax.block_until_ready(fn(e.consts, ids)),
                             warmup=1, repeats=a.repeats),
                     np.asarray(fn(e.consts, ids)["accuracy"]))  # fmt: skip
        print(f"{name}: {out[name][0] * 1e3:.1f} ms per call of {a.candidates} candidates "
              f"(median of {a.repeats})")
    (t1, acc1), (tn, accn) = out.values()
    print(f"speedup {t1 / tn:.2f}x; max accuracy difference {np.max(np.abs(acc1 - accn)):.2e}")


if __name__ == "__main__":
    main()
