"""Search methods at the same FLOPs target and evaluation budget: PPO (AutoSculpt) vs annealing
(AutoCompress) vs random vs uniform, accuracy before and after a short masked fine-tune, over seeds.

Data: CIFAR-10 from ``../shared/data/cifar10-jpeg.tar.gz`` when present, else the embedded digits.
All selection uses the validation split; the test split is evaluated once per fine-tuned candidate.
CPU-sized defaults (a few minutes on 2 cores with --train-subset); raise them on an accelerator.

    python benchmarks/methods.py --seeds 2 --budget 64
    python benchmarks/methods.py --smoke          # tiny model, digits, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header  # noqa: E402

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                     "cifar10-jpeg.tar.gz")  # fmt: skip


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="auto", help="auto (CIFAR-10 if present else digits), "
                   "cifar10-folder or digits")  # fmt: skip
    p.add_argument("--target", type=float, default=0.5, help="true FLOPs reduction target")
    p.add_argument("--band", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--budget", type=int, default=64, help="candidate evaluations per method+seed")
    p.add_argument("--methods", default="ppo,autocompress,random,uniform")
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--reward-size", type=int, default=500)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ac-rounds", type=int, default=2)
    p.add_argument("--ac-scheme", default="filter+column")
    p.add_argument("--admm-iterations", type=int, default=2)
    p.add_argument("--admm-steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="resnet8_tiny on digits, tiny budget")
    a = p.parse_args()
    if a.smoke:
        a.model, a.dataset, a.seeds, a.budget = "resnet8_tiny", "digits", 1, 16
        a.train_subset, a.reward_size, a.calib_batches = 1000, 150, 2
        a.pretrain_epochs, a.finetune_epochs, a.batch_size = 3, 1, 32
        a.ac_rounds, a.admm_iterations, a.admm_steps = 1, 1, 3
    return a


def main():
    a = parse()
    header("search methods at equal FLOPs target and evaluation budget")
    import jax
    import jax.numpy as jnp

    from sculpt_jax import agent as agent_lib
    from sculpt_jax import data as data_lib
    from sculpt_jax import env as env_lib
    from sculpt_jax import flops as flops_lib
    from sculpt_jax import graph as graph_lib
    from sculpt_jax import patterns as pat
    from sculpt_jax import trace as trace_lib
    from sculpt_jax import training as ft
    from sculpt_jax.models import get_model, init_model
    from sculpt_jax.pipeline import make_apply_fn
    from sculpt_jax.search import autocompress as ac
    from sculpt_jax.search import runner

    ds = a.dataset
    if ds == "auto":
        ds = "cifar10-folder" if os.path.exists(CIFAR) else "digits"
    splits = (data_lib.load_dataset("folder", CIFAR) if ds == "cifar10-folder"
              else data_lib.load_dataset("digits"))  # fmt: skip
    tr_x, tr_y = splits.train.arrays
    idx = np.random.default_rng(0).permutation(len(tr_y))[: a.train_subset]
    tr_x, tr_y = np.asarray(tr_x[np.sort(idx)]), np.asarray(tr_y[np.sort(idx)])
    va_x, va_y = (np.asarray(z) for z in splits.val.arrays)
    te_x, te_y = (np.asarray(z) for z in splits.test.arrays)
    print(f"# data: {ds} train={len(tr_y)} val={len(va_y)} test={len(te_y)}; model={a.model}; "
          f"target={a.target} (true FLOPs), band={a.band}; budget={a.budget} evals; "
          f"seeds={a.seeds}")  # fmt: skip

    model = get_model(a.model, num_classes=splits.num_classes)
    variables = init_model(model, jax.random.PRNGKey(0), tuple(splits.image_shape))
    apply_fn = make_apply_fn(model, splits.mean, splits.std)
    tmp = tempfile.mkdtemp(prefix="bench_methods_")
    data = {"train": (tr_x, tr_y), "val": (va_x, va_y), "test": (te_x, te_y)}
    t = time.perf_counter()
    pre = ft.fit(apply_fn, variables, data, epochs=a.pretrain_epochs, batch_size=a.batch_size,
                 workdir=os.path.join(tmp, "pretrain"), optimizer=dict(lr=0.05, schedule="cosine"),
                 progress=False)  # fmt: skip
    variables = {"params": pre.params, **({"batch_stats": pre.batch_stats} if pre.batch_stats
                                           else {})}  # fmt: skip
    print(f"# pretrain: {a.pretrain_epochs} epochs, val {pre.best_val_accuracy:.4f}, "
          f"test {pre.test_accuracy:.4f}, {time.perf_counter() - t:.0f}s")  # fmt: skip

    lg = trace_lib.trace_model(apply_fn, variables, jnp.zeros((1, *splits.image_shape), jnp.uint8))
    lib = pat.get_library("reference6")
    valid = np.stack([pat.valid_patterns(layer, lib) for layer in lg.layers])
    spec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid)
    r_x, r_y = va_x[: a.reward_size], va_y[: a.reward_size]
    cb = a.batch_size
    calib = tr_x[: a.calib_batches * cb].reshape(a.calib_batches, cb, *tr_x.shape[1:])
    env = env_lib.make_env(apply_fn, variables, spec, r_x, r_y, library=lib, calib_images=calib,
                           config=env_lib.EnvConfig(target=a.target, band=a.band,
                                                    reward="gated"))  # fmt: skip
    order = np.asarray(graph_lib.importance_order(spec, variables))
    n_envs, n_steps = 4, 4
    iters = max(1, a.budget // (n_envs * n_steps))
    policy = agent_lib.make_policy(spec, "per_group", order=order)

    rows = []
    for seed in range(a.seeds):
        for method in a.methods.split(","):
            t = time.perf_counter()
            if method == "autocompress":
                moves = max(1, round((a.budget / a.ac_rounds - 1) / 16))
                cands = ac.run_autocompress(
                    apply_fn, variables, lg, (tr_x, tr_y), target=a.target, rounds=a.ac_rounds,
                    scheme=a.ac_scheme, moves_per_temperature=moves,
                    admm_iterations=a.admm_iterations, admm_steps=a.admm_steps,
                    batch_size=a.batch_size, reward_images=r_x, reward_labels=r_y,
                    calib_images=calib, seed=seed, progress=False, top_k=1,
                )  # fmt: skip
                best = cands[0]
                masks, start, n_evals = best["masks"], best["variables"], best["n_evals"]
            else:
                res = runner.run_search(
                    env, method, workdir=os.path.join(tmp, f"{method}_{seed}"), iterations=iters,
                    seed=seed, n_envs=n_envs, n_steps=n_steps, top_k=1, order=order,
                    policy=policy if method == "ppo" else None, library=lib, progress=False,
                    overwrite=True,
                )  # fmt: skip
                n_evals = res.n_evals
                if not res.best:
                    rows.append(dict(method=method, seed=seed, found=False, n_evals=n_evals,
                                     search_s=time.perf_counter() - t))  # fmt: skip
                    continue
                best = res.best[0]
                masks, start = env.masks_of(jnp.asarray(best["pattern_ids"])), variables
            search_s = time.perf_counter() - t
            exact = flops_lib.count_exact(lg, masks)
            fit = ft.fit(apply_fn, start, data, epochs=a.finetune_epochs, batch_size=a.batch_size,
                         workdir=os.path.join(tmp, f"ft_{method}_{seed}"), masks=masks,
                         optimizer=dict(lr=1e-2, schedule="cosine"), progress=False)  # fmt: skip
            rows.append(
                dict(
                    method=method,
                    seed=seed,
                    found=True,
                    n_evals=n_evals,
                    search_s=search_s,
                    flops=exact["flops_reduction"],
                    params=exact["params_reduction"],
                    acc_before=best["accuracy"],
                    val_after=fit.best_val_accuracy,
                    test_after=fit.test_accuracy,
                )
            )
            print(f"# done {method} seed {seed}: {rows[-1]}", flush=True)

    print("\n| method | seed | evals | search s | FLOPs red. | params red. | val acc before FT "
          "(reward set) | val acc after FT | test acc after FT |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["found"]:
            print(f"| {r['method']} | {r['seed']} | {r['n_evals']} | {r['search_s']:.0f} | "
                  "no in-band candidate | | | | |")  # fmt: skip
            continue
        print(f"| {r['method']} | {r['seed']} | {r['n_evals']} | {r['search_s']:.0f} | "
              f"{r['flops']:.3f} | {r['params']:.3f} | {r['acc_before']:.4f} | "
              f"{r['val_after']:.4f} | {r['test_after']:.4f} |")  # fmt: skip
    print("\n| method | n | FLOPs red. | acc before FT | test acc after FT (mean +- std) |")
    print("|---|---|---|---|---|")
    for method in a.methods.split(","):
        rs = [r for r in rows if r["method"] == method and r["found"]]
        if not rs:
            print(f"| {method} | 0 | | | |")
            continue
        f = lambda k, rs=rs: (np.mean([r[k] for r in rs]), np.std([r[k] for r in rs]))
        print(
            f"| {method} | {len(rs)} | {f('flops')[0]:.3f} | {f('acc_before')[0]:.4f} +- "
            f"{f('acc_before')[1]:.4f} | {f('test_after')[0]:.4f} +- {f('test_after')[1]:.4f} |"
        )


if __name__ == "__main__":
    main()
