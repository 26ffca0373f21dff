"""Images/s of the jitted train step and of evaluation for zoo models on the current device.

    python benchmarks/train_throughput.py [--models resnet20 resnet56] [--batch-sizes 256]
        [--repeats 10] [--masked]

Prints the command, the machine and one line per (model, batch): train img/s, eval img/s, compile
seconds, and (with --masked) the masked/dense train-step ratio measured in the same run.
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

from sculpt_jax import training as ft  # noqa: E402
from sculpt_jax.models import get_model, init_model, model_spec  # noqa: E402


def bench(name: str, batch: int, repeats: int, masked: bool) -> dict:
    """Train-step (dense and, with `masked`, a random 50% mask) and eval img/s of zoo model `name`
    at its own input shape (32x32x3 for CIFAR models, 224x224x3 for ImageNet ones)."""
    spec = model_spec(name)
    model = get_model(name)
    variables = init_model(model, jax.random.PRNGKey(0), spec.input_shape)
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.normal(size=(batch, *spec.input_shape)).astype(np.float32),
        "label": rng.integers(0, spec.num_classes, size=(batch,)).astype(np.int32),
    }
    out = {}
    for kind in ["dense", "masked"] if masked else ["dense"]:
        masks = None
        if kind == "masked":  # a random 50% of the weights pruned
            masks = jax.tree.map(
                lambda p: (jax.random.uniform(jax.random.PRNGKey(1), p.shape) > 0.5).astype(
                    jnp.float32
                ),
                variables["params"],
            )
        tx = ft.make_optimizer("sgd", lr=0.01, schedule="constant", masks=masks)
        state = ft.create_train_state(None, variables, tx, masks=masks)
        step = ft.make_train_step(model.apply, tx)
        key = jax.random.PRNGKey(0)
        t = time.perf_counter()
        state, m = step(state, batch_np, key)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        holder = {"s": state}

        def run(holder=holder, step=step, key=key):
            holder["s"], mm = step(holder["s"], batch_np, key)
            jax.block_until_ready(mm)

        out[f"{kind}_train_ips"] = batch / time_fn(run, repeats=repeats)
        out[f"{kind}_compile_s"] = compile_s
    ev = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.asarray(batch_np["image"])
    out["eval_ips"] = batch / time_fn(lambda: jax.block_until_ready(ev(variables, x)),
                                      repeats=repeats)  # fmt: skip
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--masked", action="store_true", help="also time the masked train step")
    args = p.parse_args(argv)
    header("train/eval throughput")
    for name in args.models:
        for b in args.batch_sizes:
            r = bench(name, b, args.repeats, args.masked)
            line = (f"{name:>10} batch {b:4d}: train {r['dense_train_ips']:8.1f} img/s  "
                    f"eval {r['eval_ips']:8.1f} img/s  compile {r['dense_compile_s']:.1f}s")  # fmt: skip
            if args.masked:
                ratio = r["masked_train_ips"] / r["dense_train_ips"]
                line += f"  masked {r['masked_train_ips']:8.1f} img/s  masked/dense {ratio:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
