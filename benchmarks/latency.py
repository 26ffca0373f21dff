"""Latency of dense vs masked vs physically compacted models (sculpt_jax.compaction) on this machine.

For each model (CIFAR input 32x32x3, random init), removes the weakest filters (L2 norm, pattern 0)
of every prunable layer but the head at ONE uniform rate found by bisection so that the TRUE FLOPs
reduction (`flops.count_exact`) is about --target; then times the jitted forward of the dense,
masked (same shapes, zeros) and compacted models at each batch size, and reports the share of the
FLOPs reduction realised as speedup: (1 - t_compact / t_dense) / (1 - flops_masked / flops_dense).
``compact_unpruned`` is the compaction of the model without a mask: its time next to the dense
one is the overhead of the compact replay itself (it should be none).

With several ``--align`` values, each compacted model stores its conv/dense output filters in
multiples of that value (`compact(..., align=N)`, exact-zero filters materialised; 1 = none) and
all of them are timed round-robin with the dense and masked models.

A width table times one 3x3 conv (batch 256) at the widths pruning produces: microseconds per image
for 16 -> 16 ... 16 -> 8 channels at 32x32 and 64 -> 64 ... 64 -> 32 at 8x8. On a SIMD CPU a
channel count below the vector width (16 float32 lanes with AVX-512) costs about as much as a full
vector, so thin layers shrink in FLOPs but not in time.

A third part times kernel cropping on one conv (32x32x16 -> 16, batch 256): full 3x3 vs a 3x2
crop (every filter on pattern 3 = 011/011/011), and a layer with half its filters on pattern 3
split into two convs (3x2 + 3x3, concatenated) vs the one 3x3 conv that `compact` keeps.

A pattern table (first) draws random reference6 patterns (``random_pattern_masks``) at a rate
bisected to --target TRUE FLOPs reduction and times dense, masked, compact (filter lowering, align
1 and 16), grouped (`compact(lowering="grouped")`), taps and auto (`compact(lowering="auto")`:
each conv on the lowering `compaction.choose_lowerings` timed fastest for it at that batch)
round-robin, one JSON row per model and batch (dense_ms, masked_ms, compact_ms, compact_a16_ms,
grouped_ms, taps_ms, auto_ms, auto_kept, auto_layers, max_abs_err, flops_ratio, share =
((dense_ms - grouped_ms) / dense_ms) / (1 - flops_ratio), share_auto likewise). A grouped-layer table times
one conv under the three lowerings (`bench_grouped_layer`).

A table part (`bench_table`, ``--parts table``) checks the latency constraint's model: per table
lowering (``--table-lowerings filters taps``; the grouped ones on convs of at least
``--taps-min-width`` filters), the per-layer table is measured at the first ``--batches`` value,
random proposals are decoded at each ``--table-targets`` latency reduction, and each decoded model
is compacted as its table models it and timed: predicted vs measured reduction per candidate.

    python benchmarks/latency.py [--models resnet56 mobilenet_v2] [--batches 1 256] [--align 1 16]
        [--parts patterns grouped_layer structured widths cropping table] [--json PATH]
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


def _traced(name):
    """(model, random-init variables, a zero batch of 1, traced graph) of a zoo model."""
    import jax

    from sculpt_jax import trace
    from sculpt_jax.models import get_model, init_model, model_spec

    spec = model_spec(name)
    model = get_model(name)
    v = init_model(model, jax.random.key(0), spec.input_shape)
    x1 = jax.numpy.zeros((1, *spec.input_shape), jax.numpy.float32)
    return model, v, x1, trace.trace_model(model.apply, v, x1)


def bench_model(name, batches, target, repeats, aligns=(1,)):
    import jax

    from sculpt_jax import compaction

    model, v, x1, graph = _traced(name)
    rate, masks, red = bisect_rate(graph, v, target)
    from sculpt_jax import masking

    comps, t_compact = {}, {}
    unpruned = compaction.compact(model.apply, v, graph, None, x1)  # the replay's own overhead
    for a in aligns:
        t = time.perf_counter()
        comps[a] = compaction.compact(model.apply, v, graph, masks, x1, align=a)
        t_compact[a] = time.perf_counter() - t
    info = comps[aligns[0]][2]
    ratio = info["masked_flops"] / info["dense_flops"]
    print(f"\n## {name}: uniform filter-removal rate {rate:.3f}, true FLOPs reduction {red:.3f} "
          f"(FLOPs ratio {ratio:.3f}), params dense {info['dense_params']} "
          f"masked {info['masked_params']} compact {info['params']}; by align: "
          + ", ".join(f"{a}: {c[2]['stored_params']} stored params, compaction {t_compact[a]:.1f} s"
                      for a, c in comps.items()))  # fmt: skip
    print("timed round-robin; median ms (min ms in brackets); share = (1 - t_compact / t_dense) / "
          "(1 - FLOPs ratio), the goal is >= 0.8 at the throughput batch")
    cols = ["dense", "masked", "compact_unpruned"] + [f"compact_a{a}" for a in aligns]
    print("batch " + " ".join(f"{c:>20s}" for c in cols) + "   speedup / share by align")
    dense_apply = lambda v_, x_: model.apply(v_, x_, train=False)  # noqa: E731
    named = {"dense": (dense_apply, v), "masked": (dense_apply, masking.apply_masks(v, masks))}
    named["compact_unpruned"] = (unpruned[0], unpruned[1])
    named.update({f"compact_a{a}": (c[0], c[1]) for a, c in comps.items()})
    rep = {"flops_ratio": ratio, "rate": rate, "params": {k: info[k] for k in (
        "dense_params", "masked_params", "params")}, "stored_params": {
        str(a): c[2]["stored_params"] for a, c in comps.items()}, "batches": {}}  # fmt: skip
    for b in batches:
        x = jax.random.normal(jax.random.key(b), (b, *x1.shape[1:]), jax.numpy.float32)
        n = repeats if b <= 8 else max(5, repeats // 2)
        r = compaction.measure_latencies(named, x, repeats=n)
        d = r["dense"]["median_ms"]
        tail = "  ".join(
            f"a{a}: {d / r[f'compact_a{a}']['median_ms']:.2f}x / "
            f"{(1 - r[f'compact_a{a}']['median_ms'] / d) / (1 - ratio):.2f}" for a in aligns
        )
        print(f"{b:5d} " + " ".join(f"{r[c]['median_ms']:9.2f} ({r[c]['min_ms']:8.2f})"
                                     for c in cols) + "   " + tail)  # fmt: skip
        rep["batches"][str(b)] = r
    return rep


def random_pattern_masks(graph, variables, q, seed=0):
    """Random reference6 patterns: every filter of every prunable layer but the head draws, with
    probability `q`, a uniform id among its layer's valid ones (0 = removed ... 5 = keep-all),
    else keeps all (5). Host-side numpy draws (a benchmark input, not part of the search)."""
    import jax.numpy as jnp
    import numpy as np

    from sculpt_jax import masking, patterns

    lib = patterns.get_library("reference6")
    rng = np.random.default_rng(seed)
    ids = {}
    for li, layer in enumerate(graph.layers[:-1]):
        valid = np.nonzero(patterns.valid_patterns(layer, lib))[0]
        f = layer.out_features
        draw = valid[rng.integers(0, len(valid), f)]
        ids[li] = jnp.asarray(np.where(rng.random(f) < q, draw, lib.keep_id), jnp.int32)
    return masking.pattern_ids_to_masks(graph, variables, ids)


def bisect_pattern_rate(graph, variables, target, iters=10, seed=0):
    """(q, masks, true FLOPs reduction) of `random_pattern_masks` nearest `target` by bisection
    (the same seed for every q, so the reduction grows with q)."""
    from sculpt_jax import flops

    lo, hi, best = 0.0, 1.0, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = random_pattern_masks(graph, variables, mid, seed)
        red = float(flops.count_exact(graph, m)["flops_reduction"])
        if best is None or abs(red - target) < abs(best[2] - target):
            best = (mid, m, red)
        lo, hi = (mid, hi) if red < target else (lo, mid)
    return best


def bench_patterns(name, batches, target, repeats, min_widths=(0,), taps_min_width=128):
    """Random reference6 patterns at ~`target` true FLOPs reduction: dense vs masked vs compact
    (filter lowering: removed filters gone, 3x3 kernels with zeros; also with align=16, the CPU
    export default) vs grouped (one cropped conv
    per pattern group; one variant per ``group_min_width``; ``grouped_nc``: the same with the
    coupled residual convs on the filter lowering, so no add gathers; ``taps``: one shifted
    matmul per kernel tap and filter run, on every conv and, ``taps_w<N>``, only on convs of at
    least `taps_min_width` kept filters), timed round-robin. Returns one row
    per batch: dense_ms, masked_ms, compact_ms, grouped_ms (first min width), grouped_ms_by_width,
    max_abs_err (grouped vs masked), flops_ratio, share = ((dense - grouped) / dense) / (1 -
    flops_ratio)."""
    import jax
    import numpy as np

    from sculpt_jax import compaction, masking

    model, v, x1, graph = _traced(name)
    q, masks, red = bisect_pattern_rate(graph, v, target)
    comp = compaction.compact(model.apply, v, graph, masks, x1)
    comp16 = compaction.compact(model.apply, v, graph, masks, x1, align=16)
    grouped = {w: compaction.compact(model.apply, v, graph, masks, x1, lowering="grouped",
                                     group_min_width=w) for w in min_widths}  # fmt: skip
    ratio = comp[2]["masked_flops"] / comp[2]["dense_flops"]
    dense_apply = lambda v_, x_: model.apply(v_, x_, train=False)  # noqa: E731
    masked_v = masking.apply_masks(v, masks)
    named = {"dense": (dense_apply, v), "masked": (dense_apply, masked_v),
             "compact": (comp[0], comp[1]), "compact_a16": (comp16[0], comp16[1])}  # fmt: skip
    named.update({f"grouped_w{w}": (g[0], g[1]) for w, g in grouped.items()})
    nc = compaction.compact(model.apply, v, graph, masks, x1, lowering="grouped",
                            group_min_width=min_widths[0], group_coupled=False)  # fmt: skip
    named["grouped_nc"] = (nc[0], nc[1])  # coupled (residual) convs on the filter lowering
    taps = {w: compaction.compact(model.apply, v, graph, masks, x1, lowering="taps",
                                  group_min_width=w) for w in (0, taps_min_width)}  # fmt: skip
    named["taps"] = (taps[0][0], taps[0][1])
    named[f"taps_w{taps_min_width}"] = (taps[taps_min_width][0], taps[taps_min_width][1])
    autos = {b: compaction.compact(model.apply, v, graph, masks, x1, lowering="auto",
                                   auto_batch=b) for b in batches}  # fmt: skip
    print(f"\n## {name}: random reference6 patterns (q={q:.3f}), true FLOPs reduction {red:.3f}; "
          f"stored params dense {comp[2]['dense_stored_params']} compact "
          f"{comp[2]['stored_params']} grouped "
          + ", ".join(f"w{w}: {g[2]['stored_params']}" for w, g in grouped.items())
          + f" (counted {comp[2]['params']})")  # fmt: skip
    print("batch " + " ".join(f"{k:>12s}" for k in [*named, "auto"])
          + "   max_abs_err  share (grouped)")  # fmt: skip
    rows = []
    for b in batches:
        x = jax.random.normal(jax.random.key(b), (b, *x1.shape[1:]), jax.numpy.float32)
        n = repeats if b <= 8 else max(3, repeats // 4)
        auto = autos[b]  # each conv on the lowering timed fastest for it at this batch
        r = compaction.measure_latencies({**named, "auto": (auto[0], auto[1])}, x, repeats=n)
        ref = np.asarray(jax.jit(dense_apply)(masked_v, x))
        w0 = min_widths[0]
        err = max(float(np.abs(np.asarray(g[0](g[1], x)) - ref).max())
                  for g in [*grouped.values(), nc, *taps.values(), auto])  # fmt: skip
        t = {k: r[k]["median_ms"] for k in [*named, "auto"]}
        used = [d["lowering"] for d in auto[2]["layers"] if "lowering" in d]
        share = (t["dense"] - t[f"grouped_w{w0}"]) / t["dense"] / (1 - ratio)
        rows.append({"model": name, "batch": b, "dense_ms": t["dense"], "masked_ms": t["masked"],
                     "compact_ms": t["compact"], "compact_a16_ms": t["compact_a16"],
                     "grouped_ms": t[f"grouped_w{w0}"], "grouped_uncoupled_ms": t["grouped_nc"],
                     "taps_ms": t["taps"], "taps_wide_ms": t[f"taps_w{taps_min_width}"],
                     "taps_min_width": taps_min_width, "auto_ms": t["auto"],
                     "auto_kept": auto[2]["auto_lowering"]["kept"],
                     "auto_layers": {k: used.count(k) for k in sorted(set(used))},
                     "share_auto": (t["dense"] - t["auto"]) / t["dense"] / (1 - ratio),
                     "grouped_ms_by_min_width": {str(w): t[f"grouped_w{w}"] for w in grouped},
                     "max_abs_err": err, "flops_ratio": ratio, "share": share, "share_taps_wide":
                     (t["dense"] - t[f"taps_w{taps_min_width}"]) / t["dense"] / (1 - ratio), "q": q,
                     "repeats": n})  # fmt: skip
        print(f"{b:5d} " + " ".join(f"{t[k]:12.2f}" for k in [*named, "auto"]) + f"   {err:.1e}   "
              f"{share:.2f}")  # fmt: skip
    return rows


def bench_grouped_layer(repeats):
    """One 3x3 conv (+ scale + relu) whose filters are split evenly over the five non-empty
    reference6 patterns, three lowerings of the same function, median ms: ``dense`` (one 3x3
    conv, the masked/filter lowering), ``grouped`` (one cropped conv per pattern: 3x1, 3x2, 3x3,
    2x3, 1x3, outputs concatenated: `compact(lowering="grouped")`) and ``taps`` (nine shifted 1x1
    matmuls, each on the contiguous filter range keeping that tap in the order right column, right
    two columns, full, bottom two rows, bottom row; 0.6x the FLOPs, like grouped)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sculpt_jax.compaction import measure_latencies

    dn = ("NHWC", "HWIO", "NHWC")
    taps_of = {(3, 1): [(r, 2) for r in range(3)], (3, 2): [(r, c) for r in range(3) for c in (1, 2)],
               (3, 3): [(r, c) for r in range(3) for c in range(3)],
               (2, 3): [(r, c) for r in (1, 2) for c in range(3)], (1, 3): [(2, c) for c in range(3)]}
    pads = {s: ((1 - min(r for r, _ in t), 1), (1 - min(c for _, c in t), 1))
            for s, t in taps_of.items()}  # fmt: skip

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), pads[w.shape[:2]], dimension_numbers=dn)

    out = {}
    print("\n## one 3x3 conv, filters split evenly over reference6's 5 non-empty patterns (median ms)")
    for hw, c, b in ((32, 16, 256), (16, 32, 256), (8, 64, 256), (8, 256, 64), (32, 16, 1)):
        k = jax.random.key(0)
        x = jax.random.normal(k, (b, hw, hw, c))
        n = [c // 5] * 4 + [c - 4 * (c // 5)]
        off = np.cumsum([0] + n)
        ws = [jax.random.normal(k, (*s, c, m)) for s, m in zip(taps_of, n, strict=True)]
        ranges = {}
        for t in taps_of[(3, 3)]:
            gs = [i for i, s in enumerate(taps_of) if t in taps_of[s]]  # contiguous by the order
            ranges[t] = (int(off[gs[0]]), int(off[gs[-1] + 1]))
        wt = {t: jax.random.normal(k, (c, hi - lo)) for t, (lo, hi) in ranges.items()}

        def dense(w, x):
            return jax.nn.relu(conv(x, w) * 1.1)

        def grouped(ws, x):
            return jax.nn.relu(jnp.concatenate([conv(x, w) for w in ws], -1) * 1.1)

        def taps(wt, x, ranges=ranges, hw=hw, c=c):
            xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            y = 0
            for (r, cc), (lo, hi) in ranges.items():
                part = xp[:, r : r + hw, cc : cc + hw, :] @ wt[(r, cc)]
                y = y + jnp.pad(part, ((0, 0), (0, 0), (0, 0), (lo, c - hi)))
            return jax.nn.relu(y * 1.1)

        w33 = jax.random.normal(k, (3, 3, c, c))
        r = measure_latencies({"dense": (dense, w33), "grouped": (grouped, ws), "taps": (taps, wt)},
                              x, repeats=repeats if b > 1 else 5 * repeats)  # fmt: skip
        row = {k_: v["median_ms"] for k_, v in r.items()}
        out[f"{hw}x{hw}x{c} b{b}"] = row
        print(f"{hw}x{hw} {c}->{c} batch {b}: dense {row['dense']:.2f}  grouped "
              f"{row['grouped']:.2f} ({row['grouped'] / row['dense']:.2f}x)  taps {row['taps']:.2f} "
              f"({row['taps'] / row['dense']:.2f}x)  groups {n}")  # fmt: skip
    return out


def bench_widths(repeats):
    import jax
    import jax.numpy as jnp

    from sculpt_jax.compaction import measure_latencies

    dn = ("NHWC", "HWIO", "NHWC")
    b = 256
    out = {}
    print(f"\n## one 3x3 conv at pruned widths, batch {b}: microseconds per image (median)")
    for hw, c in ((32, 16), (8, 64)):
        row = []
        for cout in (c, c * 3 // 4, c * 5 // 8, c // 2):
            for cin in (c, cout):
                x = jnp.ones((b, hw, hw, cin), jnp.float32)
                w = jnp.ones((3, 3, cin, cout), jnp.float32)
                r = measure_latencies({"conv": (lambda w_, x_: jax.lax.conv_general_dilated(
                    x_, w_, (1, 1), "SAME", dimension_numbers=dn), w)}, x, repeats=repeats)
                us = r["conv"]["median_ms"] * 1e3 / b
                out[f"{hw}x{hw} {cin}->{cout}"] = us
                row.append(f"{cin}->{cout}: {us:.0f}")
        print(f"{hw}x{hw}: " + "  ".join(row))
    return out


def bench_cropping(batch, repeats):
    import jax
    import jax.numpy as jnp

    from sculpt_jax.compaction import measure_latency

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


def bench_table(name, batch, lowerings, min_width, targets, n_random, repeats, calibrate=True):
    """Predicted vs measured latency of the latency-constrained decoder's choices, per table
    lowering: the table is measured here (`latency.measure_table`, real timer), random mixture
    proposals (and the uniform one) are decoded at each target latency reduction, each decoded
    model is compacted as its table models it (`LatencyTable.layer_lowerings`, align 1) and all
    of them are timed round-robin with the dense model. One row per lowering: per candidate the
    predicted and measured reduction, their mean absolute error and the rank correlation of
    predicted and measured ms. `calibrate`: T_rest from the unpruned compacted model
    (`compaction.unpruned_build`, as the pipeline does) rather than from the dense model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sculpt_jax import compaction, decode, latency, masking
    from sculpt_jax import graph as graph_lib
    from sculpt_jax import patterns as pat

    model, v, x1, graph = _traced(name)
    lib = pat.get_library("reference6")
    spec = graph_lib.build_graph_spec(graph, n_patterns=lib.n_patterns,
                                      valid=graph_lib.default_valid(graph, lib.n_patterns, lib))  # fmt: skip
    order = graph_lib.importance_order(spec, v)
    timer = lambda build, info: latency.time_fn(build, info, repeats=repeats)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (batch, *x1.shape[1:]), jnp.float32)
    rows = []
    for low in lowerings:
        t0 = time.perf_counter()
        pinned = latency.lowered_layers(graph, latency.table_lowerings(graph, low, min_width))
        unpruned = compaction.unpruned_build(model.apply, v, graph, x1, batch=batch,
                                             layer_lowerings=pinned) if calibrate else None  # fmt: skip
        table = latency.measure_table(graph, model.apply, v, x1, batch=batch, timer=timer,
                                      lowering=low, min_width=min_width, unpruned=unpruned)  # fmt: skip
        secs = time.perf_counter() - t0
        named, cands = {"dense": (lambda v_, x_: model.apply(v_, x_, train=False), v)}, []
        for target in targets:
            try:
                d = decode.make_decoder(spec, order, lib, target=target, kind="latency",
                                        latency_table=table)  # fmt: skip
            except ValueError as e:  # a target this lowering cannot reach: said, skipped
                print(f"# {name} {low}: {e}")
                continue
            props = jax.random.normal(jax.random.key(1), (n_random + 1, *d.action_mask.shape))
            ids, info = jax.jit(jax.vmap(d.decode))(props.at[0].set(0.0))
            for k in range(n_random + 1):
                per_layer = graph_lib.layer_pattern_ids(spec, ids[k])
                masks = masking.pattern_ids_to_masks(graph, v["params"], per_layer, lib)
                fn, cv, _ = compaction.compact(model.apply, v, graph, masks, x1, align=1,
                                               layer_lowerings=table.layer_lowerings(graph))  # fmt: skip
                key = f"t{target}_{'uniform' if k == 0 else f'r{k}'}"
                named[key] = (fn, cv)
                cands.append((key, target, float(info["latency_ms"][k]),
                              float(info["flops_reduction"][k])))  # fmt: skip
        if not cands:
            continue
        r = compaction.measure_latencies(named, x, repeats=repeats)
        dense = r["dense"]["median_ms"]
        per = [{"candidate": k, "target": tg, "predicted_ms": p, "measured_ms": r[k]["median_ms"],
                "predicted_reduction": 1 - p / table.dense_ms,
                "measured_reduction": 1 - r[k]["median_ms"] / dense, "flops_reduction": fr}
               for k, tg, p, fr in cands]  # fmt: skip
        err = float(np.mean([abs(c["predicted_reduction"] - c["measured_reduction"]) for c in per]))
        rank = np.corrcoef(*(np.argsort(np.argsort([c[f] for c in per]))
                             for f in ("predicted_ms", "measured_ms")))[0, 1]  # fmt: skip
        rows.append({"model": name, "batch": batch, "lowering": low, "min_width": min_width,
                     "calibrated": calibrate, "predicted_unpruned_ms": float(
                         latency.make_predictor(graph, table, lib)(tuple(
                             jnp.full((la.out_features,), lib.keep_id) for la in graph.layers))),
                     "lowered_layers": len(table.layer_lowerings(graph)), "table_seconds": secs,
                     "table_dense_ms": table.dense_ms, "measured_dense_ms": dense,
                     "mean_abs_error": err, "spearman": float(rank), "candidates": per})  # fmt: skip
        print(f"\n## {name} batch {batch}, table lowering {low} (min width {min_width}, "
              f"{rows[-1]['lowered_layers']} convs lowered; table measured in {secs:.0f} s): "
              f"dense {dense:.2f} ms (table {table.dense_ms:.2f})")  # fmt: skip
        print("candidate          pred. red.  meas. red.  FLOPs red.")
        for c in per:
            print(f"{c['candidate']:<18s} {c['predicted_reduction']:10.3f} "
                  f"{c['measured_reduction']:11.3f} {c['flops_reduction']:11.3f}")  # fmt: skip
        print(f"mean |predicted - measured| reduction {err:.3f}; Spearman (ms) {rank:.2f}")
    return rows


PARTS = ("patterns", "grouped_layer", "structured", "widths", "cropping", "table")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet56", "mobilenet_v2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--align", nargs="+", type=int, default=[1, 16],
                   help="compact(align=N) variants to time (1 = no padding)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which tables to run (default all)")
    p.add_argument("--group-min-width", nargs="+", type=int, default=[0],
                   help="compact(lowering='grouped', group_min_width=N) variants to time")
    p.add_argument("--taps-min-width", type=int, default=128,
                   help="the taps_w<N> variant: compact(lowering='taps', group_min_width=N)")
    p.add_argument("--table-lowerings", nargs="+", default=["filters", "taps"],
                   choices=["filters", "grouped", "taps"], help="the table part's lowerings")
    p.add_argument("--table-targets", nargs="+", type=float, default=[0.2, 0.4],
                   help="the table part's target latency reductions")
    p.add_argument("--table-random", type=int, default=3,
                   help="random proposals per target in the table part (plus the uniform one)")
    p.add_argument("--table-uncalibrated", action="store_true",
                   help="table part: T_rest from the dense model, not the unpruned compacted one")
    args = p.parse_args(argv)
    header("latency: dense vs masked vs compacted")
    out = {}
    if "patterns" in args.parts:
        out["patterns"] = [row for name in args.models for row in bench_patterns(
            name, args.batches, args.target, args.repeats, tuple(args.group_min_width),
            args.taps_min_width)]
    if "grouped_layer" in args.parts:
        out["grouped_layer"] = bench_grouped_layer(max(3, args.repeats // 2))
    if "structured" in args.parts:
        for name in args.models:
            out[name] = bench_model(name, args.batches, args.target, args.repeats, args.align)
    if "widths" in args.parts:
        out["widths"] = bench_widths(max(5, args.repeats // 2))
    if "cropping" in args.parts:
        out["cropping"] = bench_cropping(max(args.batches), max(3, args.repeats // 4))
    if "table" in args.parts:
        out["table"] = [row for name in args.models for row in bench_table(
            name, args.batches[0], args.table_lowerings, args.taps_min_width,
            args.table_targets, args.table_random, args.repeats,
            not args.table_uncalibrated)]  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
