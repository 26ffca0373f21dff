"""Latency of dense vs masked vs physically compacted models (sculpt_jax.compact) on this machine.

For each model (CIFAR input 32x32x3, random init), removes the weakest filters (L2 norm, pattern 0)
of every prunable layer but the head at ONE uniform rate found by bisection so that the TRUE FLOPs
reduction (`flops.count_exact`) is about --target; then times the jitted forward of the dense,
masked (same shapes, zeros) and compacted models at each batch size, and reports the share of the
FLOPs reduction realised as speedup: (1 - t_compact / t_dense) / (1 - flops_masked / flops_dense).

A second part times kernel cropping on one conv (32x32x16 -> 16, batch 256): full 3x3 vs a 3x2
crop (every filter on pattern 3 = 011/011/011), and a layer with half its filters on pattern 3
split into two convs (3x2 + 3x3, concatenated) vs the one 3x3 conv that `compact` keeps.

    python benchmarks/latency.py [--models resnet56 mobilenet_v2] [--batches 1 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import header  # noqa: E402


def structured_masks(graph, variables, rate):
    import jax.numpy as jnp

    from sculpt_jax import masking

    ids = {}
    for li, layer in enumerate(graph.layers[:-1]):
        f = layer.out_features
        k = int(round(rate * f))
        if k == 0:
            continue
        k = min(k, f - 1)
        kernel = masking._kernel_of(variables, layer)
        sampled = jnp.asarray([0] * k + [5] * (f - k), jnp.int32)
        ids[li] = masking.place_by_importance(kernel, layer, sampled)
    return masking.pattern_ids_to_masks(graph, variables, ids)


def bisect_rate(graph, variables, target, iters=12):
    from sculpt_jax import flops

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = structured_masks(graph, variables, mid)
        red = flops.count_exact(graph, m)["flops_reduction"]
        best = (mid, m, red)
        if red < target:
            lo = mid
        else:
            hi = mid
    return best


def bench_model(name, batches, target, repeats):
    import jax

    from sculpt_jax import compact, trace
    from sculpt_jax.models import get_model, init_model, model_spec

    spec = model_spec(name)
    model = get_model(name)
    v = init_model(model, jax.random.key(0), spec.input_shape)
    x1 = jax.numpy.zeros((1, *spec.input_shape), jax.numpy.float32)
    graph = trace.trace_model(model.apply, v, x1)
    rate, masks, red = bisect_rate(graph, v, target)
    t = time.perf_counter()
    comp = compact.compact(model.apply, v, graph, masks, x1)
    t_compact = time.perf_counter() - t
    rep = compact.latency_report(model.apply, v, graph, masks, x1, batches=tuple(batches),
                                 repeats=repeats, compacted=comp)  # fmt: skip
    info = comp[2]
    print(f"\n## {name}: uniform filter-removal rate {rate:.3f}, true FLOPs reduction {red:.3f} "
          f"(FLOPs ratio {rep['flops']['ratio']:.3f}), params dense {info['dense_params']} "
          f"masked {info['masked_params']} compact {info['params']} "
          f"(compaction {t_compact:.1f} s)")  # fmt: skip
    print(
        "batch   dense ms   masked ms   compact ms   speedup(compact)   share of FLOPs cut realised"
    )
    for b, r in rep["batches"].items():
        share = (1 - r["compact"]["median_ms"] / r["dense"]["median_ms"]) / (
            1 - rep["flops"]["ratio"]
        )
        print(f"{int(b):5d} {r['dense']['median_ms']:10.2f} {r['masked']['median_ms']:11.2f} "
              f"{r['compact']['median_ms']:12.2f} {r['speedup_compact']:18.2f} {share:29.2f}")  # fmt: skip
    rep["rate"] = rate
    return rep


def bench_cropping(batch, repeats):
    import jax
    import jax.numpy as jnp

    from sculpt_jax.compact import measure_latency

    k = jax.random.key(0)
    x = jax.random.normal(k, (batch, 32, 32, 16), jnp.float32)
    w33 = jax.random.normal(k, (3, 3, 16, 16), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(w, x, pad):
        return jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)

    full = measure_latency(lambda w, x: conv(w, x, ((1, 1), (1, 1))), w33, x, repeats=repeats)
    crop = measure_latency(
        lambda w, x: conv(w, x, ((1, 1), (0, 1))), w33[:, 1:], x, repeats=repeats
    )

    def split(ws, x):
        a = conv(ws[0], x, ((1, 1), (0, 1)))
        b = conv(ws[1], x, ((1, 1), (1, 1)))
        return jnp.concatenate([a, b], axis=-1)

    sp = measure_latency(split, (w33[:, 1:, :, :8], w33[..., 8:]), x, repeats=repeats)
    print(f"\n## kernel cropping, one conv 32x32x16->16, batch {batch} (median ms)")
    print(f"3x3 full {full['median_ms']:.2f}  |  all filters cropped 3x2 {crop['median_ms']:.2f} "
          f"(FLOPs x0.667, time x{crop['median_ms'] / full['median_ms']:.3f})  |  half the "
          f"filters on pattern 3, split 3x2+3x3 {sp['median_ms']:.2f} (FLOPs x0.833, time "
          f"x{sp['median_ms'] / full['median_ms']:.3f} vs the unsplit 3x3)")  # fmt: skip
    return {"full": full, "crop": crop, "split": sp}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet56", "mobilenet_v2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    header("latency: dense vs masked vs compacted")
    out = {}
    for name in args.models:
        out[name] = bench_model(name, args.batches, args.target, args.repeats)
    out["cropping"] = bench_cropping(max(args.batches), max(3, args.repeats // 4))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
