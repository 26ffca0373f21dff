"""One accelerator check: the figures a CPU cannot show, in one run (< 8 min on a GPU or TPU).

    python benchmarks/accelerator.py [--json PATH] [--md PATH] [--reduced] [--repeats N]

Sections, each timed on the current backend with every figure from this one run:
  * candidate evaluations/s: N = 1, 8, 32 pattern-pruned ResNet-56 candidates scored on a
    5,000-image reward set in one compiled call (`env.evaluate`), ``eval_mode`` map vs vmap, on 1
    device and split over all devices (when the host has several);
  * train step img/s, dense and masked (a random 50% mask): ResNet-56 (32x32, batch 256) and
    ResNet-50 (224x224, batch 64);
  * top-K fine-tuning: K = 4 masked ResNet-56 models in one program (`make_topk_train_step`, vmap)
    vs K separate steps (what `pipeline` does), img/s over all K;
  * latency of the compacted model (filter removal, `compaction.compact`) vs dense and masked at
    batch 1 and the throughput batch (`benchmarks/latency.py`'s `bench_model`, ~50% true FLOPs);
  * input pipeline: host batches (`data.iterate_batches`, in-memory uint8) moved to the device and
    augmented there (`data.make_augment`), img/s, at CIFAR (32x32) and ImageNet (256 -> crop 224)
    sizes (JPEG decoding not included); and JPEG decoding alone: the grain train iterator over
    generated 500x375 JPEGs (`benchmarks/input_pipeline.py`) with 0, half and all of the host's
    cores as worker processes.

``--reduced`` (the default on CPU) runs the same code on test-size models and inputs, so a test can
check the script without an accelerator; its numbers say nothing about an accelerator. The JSON is
``{"command", "machine", "backend", "device_kind", "device_count", "reduced", "sections": {...}}``;
the markdown is one table per section, headed by the command and the machine (commit it to
experiments/RESULTS.md with the device name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import header, machine, time_fn  # noqa: E402

FULL = {
    "eval": {"model": "resnet56", "reward": 5000, "batch": 500, "ns": [1, 8, 32]},
    "train": [("resnet56", 256), ("resnet50", 64)],
    "topk": {"model": "resnet56", "k": 4, "batch": 128},
    "latency": [("resnet56", [1, 256]), ("resnet50", [1, 64])],
    "input": [("cifar", 32, 32, 256), ("imagenet", 256, 224, 128)],
    "jpeg": {"n": 512, "batch": 64, "workers": sorted({0, (os.cpu_count() or 2) // 2 or 1,
                                                      os.cpu_count() or 2})},  # fmt: skip
}
REDUCED = {
    "eval": {"model": "resnet8_tiny", "reward": 64, "batch": 32, "ns": [1, 4]},
    "train": [("resnet8_tiny", 16)],
    "topk": {"model": "resnet8_tiny", "k": 2, "batch": 16},
    "latency": [("resnet8_tiny", [1, 16])],
    "input": [("cifar", 32, 32, 64), ("imagenet", 72, 64, 16)],
    "jpeg": {"n": 16, "batch": 8, "workers": [0]},
}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds per call, seconds of the first call, compile included)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    return time_fn(fn, warmup=0, repeats=repeats), first


def candidate_evals(cfg: dict, repeats: int) -> list[dict]:
    """evals/s of `env.evaluate` on N random pattern-id candidates per call, per eval_mode, on one
    device and (when there are several) split over all of them (the main job's mesh)."""
    from sculpt_jax import env as env_lib
    from sculpt_jax import graph as graph_lib
    from sculpt_jax import patterns as pat
    from sculpt_jax import sharding as shd
    from sculpt_jax import trace
    from sculpt_jax.models import get_model, init_model, model_spec

    shape = model_spec(cfg["model"]).input_shape
    model = get_model(cfg["model"])
    variables = init_model(model, jax.random.key(0), shape)
    lg = trace.trace_model(model.apply, variables, jnp.zeros((1, *shape), jnp.float32))
    lib = pat.get_library("reference6")
    valid = np.stack([pat.valid_patterns(layer, lib) for layer in lg.layers])
    spec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns, valid=valid, level="filter")
    rng = np.random.default_rng(0)
    r_x = rng.normal(size=(cfg["reward"], *shape)).astype(np.float32)
    r_y = rng.integers(0, 10, size=(cfg["reward"],)).astype(np.int32)
    rows = []
    meshes = [(1, None)] + ([(jax.device_count(), shd.make_mesh())] if jax.device_count() > 1 else [])
    for (n_dev, mesh), mode in itertools.product(meshes, ("map", "vmap")):
        env = env_lib.make_env(model.apply, variables, spec, r_x, r_y, library=lib, mesh=mesh,
                               config=env_lib.EnvConfig(target=0.5, band=0.05, eval_mode=mode,
                                                        eval_batch_size=cfg["batch"]))  # fmt: skip
        ev = jax.jit(env.evaluate)
        for n in cfg["ns"]:
            u = rng.random((n, *np.asarray(spec.valid).shape)) * np.asarray(spec.valid)
            ids = jnp.asarray(np.where(np.asarray(spec.action_mask), np.argmax(u, -1), -1), jnp.int32)
            sec, first = _timed(lambda ev=ev, env=env, ids=ids: jax.block_until_ready(
                ev(env.consts, ids)), repeats)  # fmt: skip
            rows.append({"model": cfg["model"], "reward_set": cfg["reward"], "n": n, "mode": mode,
                         "devices": n_dev, "evals_per_s": n / sec,
                         "first_call_s": first})  # fmt: skip
    return rows


def train_steps(models: list, repeats: int) -> list[dict]:
    """Dense and masked train-step img/s (`benchmarks/train_throughput.py`'s `bench`)."""
    from train_throughput import bench

    return [dict(bench(name, b, repeats, masked=True), model=name, batch=b) for name, b in models]


def topk(cfg: dict, repeats: int) -> dict:
    """img/s (summed over the K models) of one vmapped top-K step vs K separate train steps."""
    from sculpt_jax import training as ft
    from sculpt_jax.models import get_model, init_model, model_spec

    shape, k, b = model_spec(cfg["model"]).input_shape, cfg["k"], cfg["batch"]
    model = get_model(cfg["model"])
    variables = init_model(model, jax.random.key(0), shape)
    keys = jax.random.split(jax.random.key(1), k)
    masks = [jax.tree.map(lambda p, kk=kk: (jax.random.uniform(kk, p.shape) > 0.5).astype(p.dtype),
                          variables["params"]) for kk in keys]  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(b, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, size=(b,)).astype(np.int32)}  # fmt: skip
    tx = ft.make_optimizer("sgd", lr=0.01, schedule="constant", masks=masks[0])
    key = jax.random.key(0)
    one = {"s": ft.create_topk_train_state(variables, tx, ft.stack_trees(masks))}
    topk_step = ft.make_topk_train_step(model.apply, tx, mode="vmap")

    def run_topk():
        one["s"], m = topk_step(one["s"], batch, key)
        jax.block_until_ready(m)

    seq = {"s": [ft.create_train_state(None, variables, tx, masks=m) for m in masks]}
    step = ft.make_train_step(model.apply, tx)

    def run_seq():
        out = [step(s, batch, key) for s in seq["s"]]
        seq["s"] = [o[0] for o in out]
        jax.block_until_ready([o[1] for o in out])

    t_topk, c_topk = _timed(run_topk, repeats)
    t_seq, c_seq = _timed(run_seq, repeats)
    return {"model": cfg["model"], "k": k, "batch": b, "one_program_img_per_s": k * b / t_topk,
            "sequential_img_per_s": k * b / t_seq, "one_program_over_sequential": t_seq / t_topk,
            "first_call_s": {"one_program": c_topk, "sequential": c_seq}}  # fmt: skip


def latency(models: list, repeats: int) -> list[dict]:
    """Median ms of dense, masked and compacted forward passes (`latency.bench_model`)."""
    from latency import bench_model

    rows = []
    for name, batches in models:
        rep = bench_model(name, batches, 0.5, repeats)
        for b, r in rep["batches"].items():
            d = r["dense"]["median_ms"]
            c = r["compact_a1"]["median_ms"]
            rows.append({"model": name, "batch": int(b), "dense_ms": d,
                         "masked_ms": r["masked"]["median_ms"], "compact_ms": c,
                         "flops_ratio": rep["flops_ratio"],
                         "share": (1 - c / d) / (1 - rep["flops_ratio"])})  # fmt: skip
    return rows


def input_pipeline(sizes: list, repeats: int) -> list[dict]:
    """img/s of host batches -> device -> on-device augmentation, from in-memory uint8 images."""
    from sculpt_jax import data

    rows, key = [], jax.random.key(0)
    for name, stored, size, b in sizes:
        n = 4 * b
        images = np.random.default_rng(0).integers(0, 256, (n, stored, stored, 3), np.uint8)
        labels = np.zeros(n, np.int32)
        aug = data.make_augment("cifar10" if name == "cifar" else "imagenet2012", (size, size, 3))

        def epoch(aug=aug, images=images, labels=labels, b=b):
            out = None
            for i, batch in enumerate(data.iterate_batches(images, labels, b, seed=0)):
                out = aug(jax.random.fold_in(key, i), jax.device_put(batch["image"]))
            jax.block_until_ready(out)

        sec, _ = _timed(epoch, repeats)
        rows.append({"pipeline": name, "stored": stored, "size": size, "batch": b,
                     "img_per_s": n / sec})  # fmt: skip
    return rows


def jpeg_decode(cfg: dict, repeats: int) -> list[dict]:
    """img/s of the grain ImageNet-style train iterator (decode + resize in worker processes)."""
    import tempfile
    from pathlib import Path

    import input_pipeline as bench  # benchmarks/input_pipeline.py

    from sculpt_jax import data
    from sculpt_jax import input_pipeline as ip

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = bench.write_jpegs(Path(tmp), cfg["n"])
        images = data.FolderImages(paths, None, 256, (256, 256), 3)
        for w in cfg["workers"]:
            make = lambda w=w: ip.train_iterator(images, labels, cfg["batch"], seed=0, workers=w)  # noqa: E731
            ips, start = bench.measure(make, cfg["batch"])
            rows.append({"pipeline": "imagenet jpeg (grain)", "workers": w, "img_per_s": ips,
                         "startup_s": start})  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    if isinstance(rows, dict):
        rows = [rows]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    out = [f"command: `{report['command']}`", "", f"machine: {report['machine']}", ""]
    for name, rows in report["sections"].items():
        out += [f"### {name}", "", _table(rows), ""]
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--md", default=None, help="write the markdown tables to this file")
    p.add_argument("--reduced", action="store_true", default=None,
                   help="test-size models and inputs (the default on CPU)")  # fmt: skip
    p.add_argument("--full", dest="reduced", action="store_false", help="full size even on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10, "
                   "3 when reduced)")  # fmt: skip
    a = p.parse_args(argv)
    header("accelerator check")
    reduced = jax.default_backend() == "cpu" if a.reduced is None else a.reduced
    cfg = REDUCED if reduced else FULL
    repeats = a.repeats or (3 if reduced else 10)
    devs = jax.devices()
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "machine": machine(), "backend": jax.default_backend(),
              "device_kind": devs[0].device_kind, "device_count": len(devs), "reduced": reduced,
              "sections": {}}  # fmt: skip
    t0 = time.perf_counter()
    for name, fn, arg in [("candidate evaluations", candidate_evals, cfg["eval"]),
                          ("train step", train_steps, cfg["train"]),
                          ("top-K fine-tuning", topk, cfg["topk"]),
                          ("compacted latency", latency, cfg["latency"]),
                          ("input pipeline", input_pipeline, cfg["input"]),
                          ("jpeg decoding", jpeg_decode, cfg["jpeg"])]:  # fmt: skip
        report["sections"][name] = fn(arg, repeats)
        print(f"\n### {name} ({time.perf_counter() - t0:.0f} s so far)\n"
              + _table(report["sections"][name]), flush=True)  # fmt: skip
        report["seconds"] = time.perf_counter() - t0
        _write(a, report)  # after every section: a run cut short keeps what it measured
    return report


def _write(a, report: dict) -> None:
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(report) + "\n")


if __name__ == "__main__":
    main()
