"""Masked fine-tuning throughput: masked vs dense train step, and top-K candidates in one program.

Part 1: images/s of the jitted train step (`finetune.make_train_step`) with a dense optimizer and
with a masked one (`finetune.make_optimizer(..., masks=...)`, which wraps it with `masking.masked`,
random 50% masks), in the same run; goal masked/dense >= 0.95.

Part 2: top-K fine-tuning: K masked candidates trained in one compiled program
(`finetune.make_topk_train_step`, mode "vmap" and "map", states from `create_topk_train_state`)
vs K sequential `make_train_step` calls (one per candidate), images/s counted as K x batch per
step. Every model sees the same batch, as in the pipeline's fine-tune of the kept candidates.

    python benchmarks/finetune.py [--model resnet56] [--batch 128] [--k 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header, time_fn  # noqa: E402

from sculpt_jax import masking  # noqa: E402
from sculpt_jax import training as ft  # noqa: E402
from sculpt_jax.models import get_model, init_model  # noqa: E402


def random_masks(params, key, keep: float = 0.5):
    """0/1 float masks mirroring `params`, keeping a random `keep` share of every leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        (jax.random.uniform(k, p.shape) < keep).astype(p.dtype) for k, p in zip(keys, leaves,
                                                                                strict=True)
    ])  # fmt: skip


def timed_steps(step, state, batch, key, repeats):
    """(compile+first-call seconds, median seconds per step) of a donated ``step``."""
    holder = {"s": state}

    def run():
        holder["s"], m = step(holder["s"], batch, key)
        jax.block_until_ready(m)

    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    return first, time_fn(run, warmup=0, repeats=repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="top-K candidates trained together")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["vmap", "map"], choices=["vmap", "map"])
    p.add_argument("--skip-topk", action="store_true")
    a = p.parse_args(argv)
    header("masked fine-tuning throughput")
    model = get_model(a.model, num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(a.batch, 32, 32, 3)).astype(np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, size=(a.batch,)).astype(np.int32)),
    }
    key = jax.random.PRNGKey(0)
    opt = dict(kind="sgd", lr=0.01, schedule="constant")
    print(f"# {a.model} (random init), batch {a.batch}, K={a.k}, median of {a.repeats}",
          flush=True)  # fmt: skip

    # -- 1. dense vs masked train step --
    masks = random_masks(variables["params"], jax.random.PRNGKey(1))
    ips = {}
    for kind, m in (("dense", None), ("masked", masks)):
        tx = ft.make_optimizer(**opt, masks=m)
        state = ft.create_train_state(None, variables, tx, masks=m)
        first, sec = timed_steps(ft.make_train_step(model.apply, tx), state, batch, key, a.repeats)
        ips[kind] = a.batch / sec
        print(f"train step {kind:>6}: {ips[kind]:8.1f} img/s  ({sec * 1e3:.0f} ms/step, first "
              f"call incl. compile {first:.1f}s)", flush=True)  # fmt: skip
    ratio = ips["masked"] / ips["dense"]
    print(f"masked/dense: {ratio:.3f} ({'meets' if ratio >= 0.95 else 'misses'} the 0.95 goal)",
          flush=True)  # fmt: skip
    if a.skip_topk:
        return

    # -- 2. top-K: one program (vmap / map) vs K sequential steps --
    cand = [random_masks(variables["params"], jax.random.PRNGKey(10 + k)) for k in range(a.k)]
    tx = ft.make_optimizer(**opt, masks=masking.ones_masks(variables["params"]))
    step = ft.make_train_step(model.apply, tx)
    states = [ft.create_train_state(None, variables, tx, masks=m) for m in cand]

    def seq_run(states=states):
        for k in range(a.k):
            states[k], mm = step(states[k], batch, key)
        jax.block_until_ready(mm)

    t = time.perf_counter()
    seq_run()
    first = time.perf_counter() - t
    seq = a.k * a.batch / time_fn(seq_run, warmup=0, repeats=a.repeats)
    print(f"top-K sequential: {seq:8.1f} img/s  (K={a.k} x make_train_step; first call "
          f"{first:.1f}s)", flush=True)  # fmt: skip
    stacked = ft.stack_trees(cand)
    for mode in a.modes:
        st = ft.create_topk_train_state(variables, tx, stacked)
        first, sec = timed_steps(ft.make_topk_train_step(model.apply, tx, mode=mode), st, batch,
                                 key, a.repeats)  # fmt: skip
        r = a.k * a.batch / sec
        print(f"top-K {mode:>4}:       {r:8.1f} img/s  x{r / seq:.2f} vs sequential  (first call "
              f"incl. compile {first:.1f}s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
