"""Exact MACs, FLOPs and parameter counts of dense and masked networks (layer 2).

`count(graph, masks)` is jitted with the `LayerGraph` static and the masks traced, so evaluating a
new mask set never retraces. It counts the TRUE work of the masked model (REFERENCE.md section 6,
defect 2); `reference_flops_reduction` reproduces the AutoSculpt reference code's channel-pruning
formula (REFERENCE.md section 5) for comparison and is labelled as such everywhere.

Conventions (exact counts per example):
* Masked MACs of a layer = ``sum_k P_k * sum_{j,f} mask[k,j,f] * alive_in[in_feature(j,f)]``
  over kernel cells k, per-filter input channels j and filters f (canonical layout, see
  `patterns.kernel_to_canonical`). With groups g, kernel channel j of filter f reads input feature
  ``(f // (F / g)) * (C_in / g) + j``.
* Padding: ``P_k`` (`Layer.cell_position_counts`) is the number of output positions at which kernel
  cell k reads an in-bounds input, so taps on zero padding are not counted (as in XLA's cost
  analysis); ``Layer.macs = sum_k P_k * C_in / g * F`` and with no mask the masked count equals it.
  Pruning an edge column of a 3x3 kernel therefore removes slightly less work than the centre one.
* A filter is *alive* when any entry of its kernel mask is nonzero (`masking.pattern_ids_to_masks`
  zeroes the affine entries of the others, so their output channel is exactly zero). An input
  feature of a layer is alive when ANY of its `sources` feeds it from an alive channel: producer -1
  (model input, channel-mixing ops) is always alive where it feeds; a channels entry -1 means "not
  fed by this producer". So is every channel of a producer in `Layer.nonzero_dead_sources`: its
  removed filters reach the layer as constants (an op with f(0) != 0 on the way, e.g. sigmoid or
  ``relu(x) + 1``), which the masked model multiplies as any other input and compaction keeps as
  inputs. Gating products (``x * sigmoid(...)``, attention) count the union of their factors'
  alive channels, as compaction keeps them: an upper bound where a factor's dead channel zeroes
  the product. Residual adds therefore keep a stream channel alive while any addend is
  alive. A layer with no sources is treated as fed entirely by always-alive inputs.
* FLOPs = 2 * MACs + `LayerGraph.other_flops` (non-prunable ops, constant under pruning).
* Params: kernel entries with mask != 0, plus the affine entries (bias, BN scale/bias) of alive
  filters, plus every other parameter (``total_params - kernel params - affine params``).

Dtypes: per-layer cell counts are exact int32; totals of MACs/FLOPs are float32 (exact below 2**24,
relative error ~1e-7 above); param counts are int32. `count_exact` gives exact Python ints
(host-only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import patterns as pat
from sculpt_jax.tree_util import get_at
from sculpt_jax.types import ALWAYS_ALIVE, Layer, LayerGraph


def _check_layer(layer: Layer) -> tuple[int, int, int]:
    k, i, f = pat.canonical_shape(layer)
    g = layer.groups
    if g < 1 or layer.in_features % g or f % g or i != layer.in_features // g:
        raise ValueError(
            f"layer {layer.name!r}: in_features={layer.in_features}, out_features={f}, groups={g} "
            f"and {i} kernel input features per filter are inconsistent; fix the LayerGraph."
        )
    if layer.macs != sum(layer.cell_position_counts) * i * f:
        raise ValueError(
            f"layer {layer.name!r}: macs={layer.macs} but sum(cell positions)*C_in/g*F = "
            f"{sum(layer.cell_position_counts) * i * f}; fix the LayerGraph (trace.py)."
        )
    for src in layer.sources:
        if len(src.channels) != layer.in_features:
            raise ValueError(
                f"layer {layer.name!r}: a source (producer {src.producer}) lists "
                f"{len(src.channels)} channels for {layer.in_features} input features."
            )
    return k, i, f


def _canonical_mask(graph_masks: Any, layer: Layer):
    rel = pat.resolve_path(graph_masks, layer.kernel_path)
    m = jnp.asarray(get_at(graph_masks, rel), jnp.float32)
    return pat.kernel_to_canonical(m, layer)


def _layer_counts(layer: Layer, nonzero, alive_in):
    """Exact kept kernel entries per kernel cell (int32 ``[K]``), weighted by input aliveness.

    Args: nonzero bool ``[K, I, F]`` (canonical kernel mask != 0); alive_in bool ``[in_features]``.
    Kernel channel j of filter f reads input feature ``(f // (F / g)) * I + j``; the per-filter
    aliveness ``[I, F]`` is built by a reshape and repeat (no gather).
    """
    _, i, f = nonzero.shape
    g = layer.groups
    alive = jnp.repeat(alive_in.reshape(g, i).T, f // g, axis=1)  # [I, F]
    return jnp.sum(nonzero & alive[None], axis=(1, 2), dtype=jnp.int32)


def _alive_in(layer: Layer, filter_alive: Sequence[Any]):
    """bool ``[in_features]``: input features fed by at least one alive channel."""
    if not layer.sources:
        return jnp.ones((layer.in_features,), bool)
    alive = None
    for src in layer.sources:
        ch = np.asarray(src.channels, np.int64)
        fed = ch >= 0
        if src.producer == ALWAYS_ALIVE or src.producer in layer.nonzero_dead_sources:
            a = jnp.asarray(fed)  # its removed channels arrive nonzero (f(0) != 0 on the way)
        else:
            prod = filter_alive[src.producer]
            if fed.all() and len(ch) == prod.shape[0] and np.array_equal(ch, np.arange(len(ch))):
                a = prod  # identity wiring: no gather
            else:
                a = jnp.asarray(fed) & prod[np.clip(ch, 0, None)]
        alive = a if alive is None else alive | a
    return alive


def alive_features(graph: LayerGraph, masks: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Which filters and input features of every layer are alive under `masks` (jittable).

    Returns: (filter_alive, input_alive): per layer, bool ``[out_features]`` (any kernel-mask entry
    of the filter nonzero) and bool ``[in_features]`` (fed by at least one alive channel, see the
    module docstring). Dead input features are exactly zero in the masked model's forward pass.
    """
    filter_alive = tuple(
        jnp.sum(_canonical_mask(masks, layer) != 0, axis=(0, 1)) > 0 for layer in graph.layers
    )
    return filter_alive, tuple(_alive_in(layer, filter_alive) for layer in graph.layers)


def _affine_param_count(graph: LayerGraph) -> tuple[int, int, dict]:
    """(kernel params, affine params, {affine path: owning layer}); shared paths counted once."""
    kernels = {}
    affine: dict = {}
    for layer in graph.layers:
        kernels[layer.kernel_path] = layer.params
        for ap in layer.affine_paths:
            affine.setdefault(ap, layer.index)
    n_aff = sum(graph.layers[li].out_features for li in affine.values())
    return sum(kernels.values()), n_aff, affine


def _count(graph: LayerGraph, masks: Any = None) -> dict[str, jax.Array]:
    shapes = [_check_layer(layer) for layer in graph.layers]
    n_kernel, n_affine, affine = _affine_param_count(graph)
    n_other = graph.total_params - n_kernel - n_affine
    if n_other < 0:
        raise ValueError(
            f"LayerGraph.total_params={graph.total_params} is smaller than its prunable kernel "
            f"({n_kernel}) + affine ({n_affine}) params; fix the LayerGraph (trace.py)."
        )

    if masks is None:  # dense: everything static (avoids folding big all-ones constants)
        filter_alive = [jnp.ones((f,), bool) for _, _, f in shapes]
        cell_kept = [jnp.full((k,), i * f, jnp.int32) for k, i, f in shapes]
        kept_entries = [jnp.int32(n_kernel)]
    else:
        nonzero = [_canonical_mask(masks, layer) != 0 for layer in graph.layers]  # [K, I, F]
        kept = [jnp.sum(nz, axis=0, dtype=jnp.int32) for nz in nonzero]  # [I, F]
        filter_alive = [jnp.sum(kp, axis=0) > 0 for kp in kept]
        cell_kept = [
            _layer_counts(layer, nz, _alive_in(layer, filter_alive))
            for layer, nz in zip(graph.layers, nonzero, strict=True)
        ]
        kept_entries = []
        seen_kernels = set()
        for layer, kp in zip(graph.layers, kept, strict=True):
            if layer.kernel_path not in seen_kernels:
                seen_kernels.add(layer.kernel_path)
                kept_entries.append(jnp.sum(kp, dtype=jnp.int32))
    cells = [jnp.sum(ck, dtype=jnp.int32) for ck in cell_kept]
    layer_cells = jnp.stack(cells) if cells else jnp.zeros((0,), jnp.int32)
    layer_masked_macs = jnp.stack([
        jnp.sum(ck.astype(jnp.float32) * np.asarray(layer.cell_position_counts, np.float32))
        for ck, layer in zip(cell_kept, graph.layers, strict=True)
    ]) if cell_kept else jnp.zeros((0,), jnp.float32)  # fmt: skip
    layer_dense_macs = jnp.asarray([layer.macs for layer in graph.layers], jnp.float32)

    dense_macs = jnp.asarray(float(graph.dense_macs), jnp.float32)
    masked_macs = jnp.sum(layer_masked_macs)
    other = jnp.asarray(float(graph.other_flops), jnp.float32)
    dense_flops = 2.0 * dense_macs + other
    masked_flops = 2.0 * masked_macs + other

    alive_affine = sum(
        (jnp.sum(filter_alive[li], dtype=jnp.int32) for li in affine.values()), jnp.int32(0)
    )
    masked_params = sum(kept_entries, jnp.int32(0)) + alive_affine + jnp.int32(n_other)
    dense_params = jnp.int32(graph.total_params)

    def reduction(masked, dense):
        dense = jnp.asarray(dense, jnp.float32)
        return jnp.where(dense > 0, 1.0 - jnp.asarray(masked, jnp.float32) / dense, 0.0)

    return {
        "dense_macs": dense_macs,
        "masked_macs": masked_macs,
        "dense_flops": dense_flops,
        "masked_flops": masked_flops,
        "dense_params": dense_params,
        "masked_params": masked_params,
        "macs_reduction": reduction(masked_macs, dense_macs),
        "flops_reduction": reduction(masked_flops, dense_flops),
        "params_reduction": reduction(masked_params, dense_params),
        "layer_dense_macs": layer_dense_macs,
        "layer_masked_macs": layer_masked_macs,
        "layer_masked_cells": layer_cells,
        "layer_cell_kept": tuple(cell_kept),
        "layer_alive_filters": jnp.stack([jnp.sum(a, dtype=jnp.int32) for a in filter_alive])
        if filter_alive
        else jnp.zeros((0,), jnp.int32),
    }


count: Callable[..., dict[str, jax.Array]] = jax.jit(_count, static_argnames=("graph",))
count.__doc__ = """Exact dense and masked MACs, FLOPs and params of a model (jitted, graph static).

Args:
  graph: `LayerGraph` (static; hashable).
  masks: mask pytree mirroring the params or variables (float 0/1), or None for the dense model.
Returns: dict of jnp values: dense_macs, masked_macs, dense_flops, masked_flops (float32 scalars);
  dense_params, masked_params (int32); macs_reduction, flops_reduction, params_reduction (float32,
  1 - masked/dense); layer_dense_macs, layer_masked_macs (float32 [L]); layer_masked_cells (int32
  [L], kept alive kernel entries, exact); layer_cell_kept (per layer int32 [K]: the same per kernel
  cell, exact; MACs = sum_k P_k * kept_k); layer_alive_filters (int32 [L]).
A second call with the same graph and mask shapes does not retrace. See the module docstring.
"""


def make_counter(graph: LayerGraph) -> Callable[[Any], dict[str, jax.Array]]:
    """``masks -> count(graph, masks)`` (jitted through `count`; no retrace across mask values)."""
    return lambda masks=None: count(graph, masks)


def count_exact(graph: LayerGraph, masks: Any = None) -> dict[str, int | float]:
    """`count` with MACs/FLOPs/params as exact Python ints and reductions as floats (host-only),
    plus the literature's convention (`conventional_macs`, padding taps included)."""
    c = count(graph, masks)
    masked_macs = sum(
        sum(int(n) * p for n, p in zip(np.asarray(ck).tolist(), layer.cell_position_counts,
                                        strict=True))
        for ck, layer in zip(c["layer_cell_kept"], graph.layers, strict=True)
    )  # fmt: skip
    conv_masked = sum(int(np.sum(np.asarray(ck))) * layer.n_positions
                      for ck, layer in zip(c["layer_cell_kept"], graph.layers, strict=True))  # fmt: skip
    conv_dense = conventional_macs(graph)
    dense_macs = graph.dense_macs
    masked_flops = 2 * masked_macs + graph.other_flops
    dense_flops = graph.dense_flops
    masked_params = int(c["masked_params"])
    dense_params = graph.total_params

    def red(m, d):
        return 1.0 - m / d if d else 0.0

    return {
        "dense_macs": dense_macs,
        "masked_macs": masked_macs,
        "dense_flops": dense_flops,
        "masked_flops": masked_flops,
        "dense_params": dense_params,
        "masked_params": masked_params,
        "macs_reduction": red(masked_macs, dense_macs),
        "flops_reduction": red(masked_flops, dense_flops),
        "params_reduction": red(masked_params, dense_params),
        "dense_conventional_macs": conv_dense,
        "masked_conventional_macs": conv_masked,
        "conventional_macs_reduction": red(conv_masked, conv_dense),
    }


def conventional_macs(graph: LayerGraph) -> int:
    """Dense MACs per example in the pruning literature's convention (thop / fvcore /
    Torch-Pruning): every kernel tap at every output position, zero padding included, convs and
    dense layers only (host). ResNet-20 (CIFAR): 40,551,040 (40.55M); ResNet-56: 125,485,696 (125.49M).

    `count_exact` gives it with the masked count in the same convention (kept, alive kernel entries
    x output positions) as ``dense_conventional_macs`` / ``masked_conventional_macs``; its own
    ``dense_macs`` counts only the taps that land inside the input (what XLA computes)."""
    return sum(layer.n_positions * layer.kernel_cells * (layer.in_features // layer.groups)
               * layer.out_features for layer in graph.layers)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The reference (AutoSculpt code) formula -- for comparison only, NOT the true FLOPs.


def reference_conv_flops(layer: Layer) -> int:
    """REFERENCE FORMULA per-conv FLOPs (REFERENCE.md section 5; k^2 = kernel cells), host-only:
    ``H_out * W_out * (C_in * (2 k^2 - 1) + 1) * C_out / groups``."""
    hw = int(np.prod(layer.out_spatial, dtype=np.int64)) if layer.out_spatial else 1
    return (
        hw
        * (layer.in_features * (2 * layer.kernel_cells - 1) + 1)
        * layer.out_features
        // (layer.groups)
    )


def _reference_pruned_fraction(layer: Layer, ids, lib: pat.PatternLibrary):
    """Mean pruned fraction r_l of a layer from its pattern ids (as the reference reads them)."""
    ids = jnp.asarray(ids, jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < lib.n_patterns), ids, lib.keep_id)  # padding -> keep
    if bool(pat.valid_patterns(layer, lib).all()):
        return jnp.mean(jnp.asarray(lib.pruned_fraction)[ids])
    if not lib.has_remove:
        return jnp.float32(0.0)
    return jnp.mean((ids == lib.remove_id).astype(jnp.float32))


def _is_pattern_ids(x: Any) -> bool:
    if isinstance(x, Mapping):
        return all(isinstance(k, (int, np.integer)) for k in x)
    return isinstance(x, (tuple, list))


def _reference_flops_reduction(
    graph: LayerGraph,
    masks_or_pattern_ids: Any,
    library: str | pat.PatternLibrary = "reference6",
) -> jax.Array:
    """REFERENCE FORMULA FLOPs reduction (AutoSculpt code, REFERENCE.md sec. 5) -- NOT true FLOPs.

    Over the conv layers only, in graph order (1x1 and unpruned convs included, as the reference
    does): ``F_l = H_out W_out (C_in (2k^2 - 1) + 1) C_out / groups``, r_l = mean pruned fraction of
    layer l (pattern `pruned_fraction` of each filter's id, or ``1 - mean(kernel mask)`` from
    masks), ``P_0 = F_0 r_0``, ``P_l = F_l (r_{l-1} + r_l - r_{l-1} r_l)``; returns
    ``sum P / sum F`` (float32). This treats pattern sparsity as channel removal (e.g. 0.555 for
    ResNet-56 with every 3x3 filter at a 1/3 pattern, where the true 3x3-MAC reduction is 1/3).
    Jitted; `graph` and `library` static.

    Args:
      masks_or_pattern_ids: a mask pytree (mirroring params/variables), or pattern ids as in
        `masking.pattern_ids_to_masks` ({layer_index: ids} or a per-layer tuple; missing = keep).
      library: pattern library of the ids (unused for masks).
    """
    lib = pat.get_library(library)
    convs = [layer for layer in graph.layers if layer.kind == "conv"]
    if not convs:
        return jnp.float32(0.0)
    if _is_pattern_ids(masks_or_pattern_ids):
        ids = masks_or_pattern_ids
        if not isinstance(ids, Mapping):
            ids = {i: v for i, v in enumerate(ids) if v is not None}
        rs = [
            _reference_pruned_fraction(layer, ids[layer.index], lib)
            if layer.index in ids
            else jnp.float32(0.0)
            for layer in convs
        ]
    else:
        rs = [1.0 - jnp.mean(_canonical_mask(masks_or_pattern_ids, layer)) for layer in convs]
    fl = [float(reference_conv_flops(layer)) for layer in convs]
    pruned = fl[0] * rs[0]
    for l_ in range(1, len(convs)):
        r_prev, r = rs[l_ - 1], rs[l_]
        pruned = pruned + fl[l_] * (r_prev + r - r_prev * r)
    return jnp.asarray(pruned / sum(fl), jnp.float32)


reference_flops_reduction = jax.jit(
    _reference_flops_reduction, static_argnames=("graph", "library")
)
reference_flops_reduction.__doc__ = _reference_flops_reduction.__doc__


# ----------------------------------------------------------------------------------------------
# The same exact counts straight from per-filter pattern ids (no mask pytree): the decoder's measure.


def _pattern_costs(layer: Layer, lib: pat.PatternLibrary) -> tuple[np.ndarray, np.ndarray]:
    """Per pattern id of `layer` (host, static): (in-bounds MACs per input channel of one filter,
    kept kernel cells of one filter), i.e. ``w_p = sum_k P_k m_p[k]`` and ``kc_p = sum_k m_p[k]``.

    Mirrors `masking.layer_canonical_mask`: on layers where only keep/remove are valid, every id but
    the remove id keeps the whole filter.
    """
    k, _, _ = pat.canonical_shape(layer)
    pos = np.asarray(layer.cell_position_counts, np.float64)
    if bool(pat.valid_patterns(layer, lib).all()):
        cells = np.asarray(lib.masks, np.float64).reshape(lib.n_patterns, -1)
        if cells.shape[1] != k:
            raise ValueError(
                f"layer {layer.name!r}: {k} kernel cells but the {lib.name!r} masks have "
                f"{cells.shape[1]}; spatial libraries apply to 3x3 kernels only."
            )
        return cells @ pos, cells.sum(axis=1)
    keep = np.ones(lib.n_patterns)
    if lib.has_remove:
        keep[lib.remove_id] = 0.0
    return keep * pos.sum(), keep * k


def _count_ids(
    graph: LayerGraph, layer_ids: tuple, library: str | pat.PatternLibrary = "reference6"
) -> dict[str, jax.Array]:
    lib = pat.get_library(library)
    if lib.kind == "region":
        raise ValueError(
            f"count_ids supports per-filter libraries; {lib.name!r} is a region library: build the "
            "masks (masking.pattern_ids_to_masks) and use flops.count"
        )
    if len(layer_ids) != graph.n_layers:
        raise ValueError(f"count_ids: {len(layer_ids)} id vectors for {graph.n_layers} layers")
    shapes = [_check_layer(layer) for layer in graph.layers]
    n_kernel, n_affine, affine = _affine_param_count(graph)
    n_other = graph.total_params - n_kernel - n_affine
    ids, costs = [], []
    for layer, li, (_, _, f) in zip(graph.layers, layer_ids, shapes, strict=True):
        li = jnp.asarray(li, jnp.int32).reshape(-1)
        if li.shape != (f,):
            raise ValueError(f"layer {layer.name!r}: ids of shape {li.shape}, expected [{f}]")
        ids.append(jnp.where((li >= 0) & (li < lib.n_patterns), li, lib.keep_id))
        costs.append(_pattern_costs(layer, lib))
    filter_alive = [jnp.asarray(kc > 0)[i] for i, (_, kc) in zip(ids, costs, strict=True)]
    macs, kept, seen = jnp.float32(0.0), jnp.int32(0), set()
    for layer, i, (w, kc), (_, n_in, f) in zip(graph.layers, ids, costs, shapes, strict=True):
        g = layer.groups
        alive_in = _alive_in(layer, filter_alive).reshape(g, n_in).sum(axis=1)
        n_alive = jnp.repeat(alive_in, f // g).astype(jnp.float32)  # [F] alive inputs per filter
        macs = macs + jnp.sum(jnp.asarray(w, jnp.float32)[i] * n_alive)
        if layer.kernel_path not in seen:
            seen.add(layer.kernel_path)
            kept = kept + jnp.sum(jnp.asarray(kc, jnp.int32)[i]) * n_in
    alive_affine = sum(
        (jnp.sum(filter_alive[li], dtype=jnp.int32) for li in affine.values()), jnp.int32(0)
    )
    masked_params = kept + alive_affine + jnp.int32(n_other)
    dense_macs = float(graph.dense_macs)
    masked_flops = 2.0 * macs + float(graph.other_flops)
    return {
        "masked_macs": macs,
        "masked_flops": masked_flops,
        "masked_params": masked_params,
        "macs_reduction": 1.0 - macs / max(dense_macs, 1.0),
        "flops_reduction": 1.0 - masked_flops / max(float(graph.dense_flops), 1.0),
        "params_reduction": 1.0 - masked_params.astype(jnp.float32) / max(graph.total_params, 1),
        "reference_reduction": _reference_flops_reduction(graph, tuple(ids), lib),
    }


count_ids: Callable[..., dict[str, jax.Array]] = jax.jit(
    _count_ids, static_argnames=("graph", "library")
)
count_ids.__doc__ = """Exact counts of the model pruned by per-filter pattern ids (jitted; no masks).

The same numbers as ``count(graph, masking.pattern_ids_to_masks(graph, params, layer_ids, lib))``
for "filter" and "kernel" libraries with one id per filter, at O(filters) cost instead of
O(weights): masked MACs ``sum_l sum_f w_(id_f) * alive_inputs_f`` with ``w_p = sum_k P_k m_p[k]``
(in-bounds MACs per input channel, see the module docstring) and the alive inputs from the layer's
sources; params from the kept cells. Used by `decode` inside its bisection.

Args:
  graph: `LayerGraph` (static).
  layer_ids: per layer, int ``[out_features]`` pattern ids (ids outside ``[0, P)`` keep all).
  library: pattern library (static).
Returns: dict of float32 scalars masked_macs, masked_flops, macs_reduction, flops_reduction,
  params_reduction, reference_reduction (the reference formula, labelled), and int32
  masked_params. Region libraries raise ValueError (use `count` on masks).
"""


def alive_widths_ids(
    graph: LayerGraph, layer_ids: tuple, library: str | pat.PatternLibrary = "reference6"
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per layer, (alive input features, alive filters) as float32 scalars: the widths the
    compacted layer runs at (`compaction.compact`, align 1), from per-filter pattern ids (jittable;
    `graph` and `library` static; per-filter libraries only, as `count_ids`).

    A filter is alive when its pattern keeps any cell; an input feature when any source feeds it
    from an alive channel (residual coupling included, module docstring). A depthwise conv
    (groups == in_features) keeps a channel only where its filter AND its input are alive, so both
    of its widths are that count.
    """
    lib = pat.get_library(library)
    if lib.kind == "region":
        raise ValueError(f"alive_widths_ids supports per-filter libraries, not {lib.name!r}")
    ids = []
    for _layer, li in zip(graph.layers, layer_ids, strict=True):
        li = jnp.asarray(li, jnp.int32).reshape(-1)
        ids.append(jnp.where((li >= 0) & (li < lib.n_patterns), li, lib.keep_id))
    filter_alive = [jnp.asarray(_pattern_costs(layer, lib)[1] > 0)[i]
                    for layer, i in zip(graph.layers, ids, strict=True)]  # fmt: skip
    out = []
    for layer, fa in zip(graph.layers, filter_alive, strict=True):
        alive_in = _alive_in(layer, filter_alive)
        if layer.groups > 1 and layer.groups == layer.in_features == layer.out_features:
            n = jnp.sum(alive_in & fa).astype(jnp.float32)
            out.append((n, n))
        else:
            out.append((jnp.sum(alive_in).astype(jnp.float32), jnp.sum(fa).astype(jnp.float32)))
    return tuple(out)
