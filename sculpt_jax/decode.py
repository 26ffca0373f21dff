"""Budget-exact decoding of search proposals into per-filter pattern ids (layer 2).

Every search method (the GNN policy, random search, uniform allocation, annealing, CEM, global
magnitude) proposes something low-dimensional; this module turns it into pattern ids whose
reduction (true FLOPs, the reference formula, parameters, or the latency a measured per-layer table
predicts, `latency.make_predictor`) equals the target within a tolerance,
so that no evaluation is spent off budget and no reward has a band cliff.

Mixture proposals (`Decoder.decode`): ``a [L + 1, P]``, a network-wide row ``a_0`` plus one row per
layer, giving per-layer logits ``z_l = a_0 + a_l`` over the patterns (the keep-all logit is fixed
at 0; entries of invalid patterns are ignored). The shared row is the "uniform allocation" family
(every layer the same mixture); the layer rows are each layer's deviation from it. One scalar shift
``lambda`` is added along the patterns' pruned fractions ``c_p``:

    pi_l(lambda) = softmax_valid(z_l + lambda c),   Q_lk = sum of pi_l over the k most aggressive
    patterns,   N_lk = floor(F_l Q_lk + u_l)  (cumulative filter counts, u_l a fixed dither),

the k-th weakest filter of layer l (L2 norm of its original weights) gets the pattern whose
cumulative count first exceeds k (importance-ordered placement, REFERENCE.md section 3). Every Q_lk
is non-decreasing in lambda (d/dlambda P(upper set of c) = Cov(1_set, c) >= 0; tied patterns keep a
constant ratio), so every filter's pattern only grows more aggressive with lambda and the reduction
R(lambda) is a non-decreasing step function: a bisection on lambda brackets the target between two
adjacent steps and the closer one is returned. The dither ``u_l`` (golden-ratio sequence over the
layers) makes layers with equal widths and logits step at different lambdas, so one step moves one
layer by one filter, far below the default 0.5 percentage-point tolerance on real models; when a
step still moves several filters at once, they are switched from the lower side's pattern to the
upper side's one at a time (a second bisection, on how many are switched), so the result is within
half of one filter's pattern change of the target. In a small model one filter's change can exceed
the tolerance (removing one of 32 filters also removes every consumer's work on its channel); then
that filter is frozen at its pruned side and the others are bisected again (up to `EXTRA_PASSES`
times), so finer filters elsewhere give back what it over-pruned.

Score proposals (`Decoder.decode_scores`): one score per action node; nodes below a threshold are
removed (the library's remove pattern, where valid), the threshold found by the same bisection.
Used by global magnitude pruning.

Coupled (residual) layers: each layer decodes from its own proposal; the count of a residual
stream channel follows `flops` (alive while any addend is alive), so the reduction the decoder
targets is the exact one of the masked model, coupling included. The classifier head (keep-only in
`graph.default_valid`) and layers with nothing valid to prune have no action dimensions.

Everything returned by `make_decoder` is jittable and vmappable (one proposal per call; vmap over
candidates); a second call with the same shapes does not retrace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import flops as flops_lib
from sculpt_jax import graph as graph_lib
from sculpt_jax import latency as latency_lib
from sculpt_jax import masking
from sculpt_jax import patterns as pat

MEASURES = ("flops", "reference", "params", "latency")
_MEASURE_KEY = {"flops": "flops_reduction", "reference": "reference_reduction",
                "params": "params_reduction", "latency": "latency_reduction"}  # fmt: skip
LOGIT_CLIP = 20.0  # proposals are clipped to +-LOGIT_CLIP, which bounds the shift's bracket
_GOLDEN = 0.6180339887498949
EXTRA_PASSES = 3  # decode passes after the first, for steps coarser than the tolerance (`bisect`)


class Decoder(NamedTuple):
    """Budget-exact decoding of one model's proposals (closures; see the module docstring).

    action_mask: bool [L + 1, P] (numpy), the proposal entries that matter (row 0, the shared
      row: patterns some layer may use; row 1 + l: layer l's valid patterns but keep-all, none on a
      keep-only layer); n_dims = its count.
    decode(proposal f32 [L + 1, P]) -> (ids int32 [n_nodes], info): info has reduction (the target's
      measure), flops_reduction, reference_reduction, params_reduction, shift (lambda) and
      on_budget (|reduction - target| <= tolerance), all scalars.
    decode_scores(scores f32 [n_nodes]) -> (ids, info): nodes with the lowest scores removed.
    measure(ids int32 [n_nodes]) -> dict of the reductions above (exact).
    fractions(proposal, shift) -> f32 [L, P] the per-layer pattern mixture at that shift.
    decode_at(proposal, shift) -> ids int32 [n_nodes] at a given shift (no bisection).
    target, tolerance, kind: the budget; max_reduction: the largest reachable reduction (host).
    """

    action_mask: np.ndarray
    n_dims: int
    decode: Callable
    decode_scores: Callable
    measure: Callable
    fractions: Callable
    decode_at: Callable
    target: float
    tolerance: float
    kind: str
    max_reduction: float


def _measure_fn(spec: graph_lib.GraphSpec, lib: pat.PatternLibrary, params_shapes: Any,
                table: latency_lib.LatencyTable | None = None):  # fmt: skip
    """ids [n_nodes] -> exact reductions: `flops.count_ids` for per-filter libraries, the masks and
    `flops.count` for region libraries; with a latency `table`, also latency_reduction = 1 -
    predicted / predicted dense ms and latency_ms (the prediction, `latency.make_predictor`)."""
    lg = spec.layer_graph
    predict = None if table is None else latency_lib.make_predictor(lg, table, lib)

    def measure(ids):
        per_layer = graph_lib.layer_pattern_ids(spec, ids)
        if lib.kind != "region":
            c = flops_lib.count_ids(lg, per_layer, lib)
            ref = c["reference_reduction"]
        else:
            masks = masking.pattern_ids_to_masks(lg, params_shapes, per_layer, lib)
            c = flops_lib.count(lg, masks)
            ref = flops_lib.reference_flops_reduction(lg, per_layer, lib)
        out = {"flops_reduction": c["flops_reduction"], "reference_reduction": ref,
               "params_reduction": c["params_reduction"]}  # fmt: skip
        if predict is not None:
            ms = predict(per_layer)
            out["latency_ms"] = ms
            out["latency_reduction"] = 1.0 - ms / jnp.float32(table.dense_ms)
        return out

    return measure


def _placement(spec: graph_lib.GraphSpec, order) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host: for every entry a of the importance order, (node, layer, rank within its layer)."""
    order = np.asarray(order, np.int64)
    if order.shape != spec.action_nodes.shape:
        raise ValueError(
            f"order must have shape {spec.action_nodes.shape} (one entry per action node); build "
            "it with graph.importance_order(spec, params)"
        )
    layer = np.asarray(spec.action_layer, np.int64)
    node_layer = np.asarray(spec.node_layer)[order]
    if not np.array_equal(node_layer, layer):
        raise ValueError("order must list the action nodes layer by layer (graph.importance_order)")
    start = np.searchsorted(layer, layer, side="left")
    return order, layer, np.arange(len(order)) - start


def make_decoder(
    spec: graph_lib.GraphSpec,
    order,
    library: str | pat.PatternLibrary = "reference6",
    *,
    target: float,
    tolerance: float = 0.005,
    kind: str = "flops",
    iterations: int = 48,
    params_shapes: Any = None,
    latency_table: latency_lib.LatencyTable | None = None,
) -> Decoder:
    """Builds the decoder of one model (host-side, once; see the module docstring).

    Args:
      spec: the model's `GraphSpec` (its `valid` decides which patterns each layer may use).
      order: int32 [A] `graph.importance_order(spec, original_params)` (weakest filter first).
      library: the pattern library of `spec`.
      target: reduction in (0, 1) of the measure `kind`.
      tolerance: accepted |reduction - target| (> 0; 0.005 = half a percentage point).
      kind: "flops" (exact true FLOPs), "reference" (the reference code's formula, labelled),
        "params" (exact parameter count) or "latency" (the latency `latency_table` predicts for
        its lowering: monotone in the shift for the "filters" lowering, as its tables are
        non-decreasing; nearly so for "grouped" / "taps", where a filter joining an empty
        footprint group starts an op: the bisection keeps its bracket, on_budget says the rest).
      iterations: bisection steps on the shift (48 resolve float32).
      params_shapes: the params' shapes (only for region libraries, whose counts need masks).
      latency_table: a `latency.LatencyTable` of this model (needed by kind "latency"; with any
        kind it adds latency_ms / latency_reduction to the measures).
    Raises:
      ValueError: a bad tolerance, target or kind, a latency kind without a table (or a region
        library), a target above what pruning every prunable filter as far as its valid
        patterns allow reaches (the message gives that maximum), or one below what the unpruned
        model already gives (a latency table calibrated on a compacted model faster than dense).
    """
    lib = pat.get_library(library)
    if kind not in MEASURES:
        raise ValueError(f"decoder measure must be one of {MEASURES}, got {kind!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (e.g. 0.005 = 0.5 percentage points), got {tolerance}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target reduction must be in (0, 1), got {target}")
    if kind == "latency" and latency_table is None:
        raise ValueError(
            "decoder kind 'latency' needs a latency table measured on this backend "
            "(latency.measure_table); none was given"
        )
    if latency_table is not None and lib.kind == "region":
        raise ValueError(f"latency tables model per-filter libraries, not {lib.name!r}")
    if lib.kind == "region" and params_shapes is None:
        raise ValueError("region libraries need params_shapes (their counts are built from masks)")
    lg = spec.layer_graph
    n_layers, n_p = lg.n_layers, lib.n_patterns
    layer_valid = np.zeros((n_layers, n_p), bool)
    for li, nodes in enumerate(spec.layer_nodes):
        layer_valid[li] = np.asarray(spec.valid)[nodes[0]]
    layer_mask = layer_valid.copy()
    layer_mask[:, lib.keep_id] = False
    action_mask = np.concatenate([layer_mask.any(axis=0, keepdims=True), layer_mask])
    cost = np.asarray(lib.pruned_fraction, np.float64)
    by_aggression = np.argsort(-cost, kind="stable")  # pattern ids, most aggressive first
    layer_size = np.asarray([len(n) for n in spec.layer_nodes], np.float32)
    dither = np.mod(0.5 + _GOLDEN * np.arange(n_layers), 1.0).astype(np.float32)
    bracket = default_bracket(lib)
    nodes_j, layer_j, rank_j = (jnp.asarray(a) for a in _placement(spec, order))
    n_act = int(len(np.asarray(order)))
    pos = np.full(spec.n_nodes, n_act, np.int32)  # node -> its place in the placement order
    pos[np.asarray(order, np.int64)] = np.arange(n_act, dtype=np.int32)
    pos_j = jnp.asarray(pos)
    k_iterations = max(1, int(np.ceil(np.log2(n_act + 1))) + 1)
    measure = _measure_fn(spec, lib, params_shapes, latency_table)
    key = _MEASURE_KEY[kind]
    valid_j = jnp.asarray(layer_valid)
    agg_j = jnp.asarray(by_aggression, jnp.int32)

    def fractions(proposal, shift):
        a = jnp.where(jnp.asarray(action_mask), jnp.asarray(proposal, jnp.float32), 0.0)
        z = jnp.clip(a[1:] + a[:1], -LOGIT_CLIP, LOGIT_CLIP)
        z = jnp.where(jnp.asarray(layer_mask), z, 0.0) + shift * jnp.asarray(cost, jnp.float32)
        return jax.nn.softmax(jnp.where(valid_j, z, -jnp.inf), axis=-1)

    def ids_at(logits, shift):
        pi = fractions(logits, shift)[:, by_aggression]  # [L, P], most aggressive first
        bounds = jnp.floor(jnp.cumsum(pi, axis=-1) * layer_size[:, None] + dither[:, None])
        bounds = bounds.at[:, -1].set(layer_size)
        k = jnp.sum(bounds[layer_j] <= rank_j[:, None].astype(jnp.float32), axis=-1)
        ids = agg_j[jnp.minimum(k, n_p - 1)]
        return jnp.full((spec.n_nodes,), -1, jnp.int32).at[nodes_j].set(ids)

    def bracket_and_repair(ids_of, lo, hi):
        """Bracket the target between R(lo) <= target <= R(hi); return the closer side, the pair
        (ids below, ids above) it was chosen from and the shift of the returned side."""

        def body(_, carry):
            lo, hi, ids_lo, ids_hi = carry
            mid = 0.5 * (lo + hi)
            ids = ids_of(mid)
            below = measure(ids)[key] <= target
            return (jnp.where(below, mid, lo), jnp.where(below, hi, mid),
                    jnp.where(below, ids, ids_lo), jnp.where(below, ids_hi, ids))  # fmt: skip

        init = (jnp.float32(lo), jnp.float32(hi), ids_of(jnp.float32(lo)), ids_of(jnp.float32(hi)))
        # The ids measured at each end travel with it: computed again after the loop, they could
        # differ (at a one-ulp bracket, XLA's fusion of the same expression can flip a floor), and
        # the repair below would then see two equal sides (measured: 0.61 pp off inside a search).
        lo, hi, ids_lo, ids_hi = jax.lax.fori_loop(0, iterations, body, init)
        # Repair a step that moved several filters at once: switch the filters from the lo side's
        # pattern to the hi side's one at a time, in placement order. Every switch only prunes
        # more, so the reduction is monotone in the number switched: bisect on it, keep the closer.

        def switched(k):
            return jnp.where(pos_j < k, ids_hi, ids_lo)

        def k_body(_, carry):
            k_lo, k_hi = carry
            mid = (k_lo + k_hi) // 2
            below = measure(switched(mid))[key] <= target
            return jnp.where(below, mid, k_lo), jnp.where(below, k_hi, mid)

        k_lo, k_hi = jax.lax.fori_loop(0, k_iterations, k_body, (jnp.int32(0), jnp.int32(n_act)))
        ids_a, ids_b = switched(k_lo), switched(k_hi)
        r_a, r_b = measure(ids_a)[key], measure(ids_b)[key]
        take_b = jnp.abs(r_b - target) < jnp.abs(r_a - target)
        return (jnp.where(take_b, ids_b, ids_a), jnp.where(take_b, r_b, r_a), ids_a, ids_b,
                jnp.where(take_b & (k_hi == n_act), hi, lo))  # fmt: skip

    def bisect(ids_of, lo, hi):
        """`bracket_and_repair`, then, while the last step is a filter whose change alone moves
        the count by more than the tolerance (removing a filter of a narrow layer also removes
        every consumer's work on its channel: 3 pp in a 32-64 filter CNN), up to `EXTRA_PASSES`
        more passes, each freezing the filters of the last step at their pruned side and bisecting
        the OTHER filters again from `lo`: finer filters elsewhere then give back what the coarse
        one over-pruned. The closest result of all passes is kept."""
        ids, red, ids_a, ids_b, shift = bracket_and_repair(ids_of, lo, hi)
        off = lambda r: jnp.abs(r - target)  # noqa: E731

        def cond(c):
            return (c[0] < EXTRA_PASSES) & (off(c[2]) > tolerance)

        def again(c):
            n, ids, red, shift, frozen, fixed, ids_a, ids_b = c
            fixed = jnp.where(ids_a != ids_b, ids_b, fixed)
            frozen = frozen | (ids_a != ids_b)
            ids2, red2, ids_a, ids_b, shift2 = bracket_and_repair(
                lambda s: jnp.where(frozen, fixed, ids_of(s)), lo, hi)
            better = off(red2) < off(red)
            return (n + 1, jnp.where(better, ids2, ids), jnp.where(better, red2, red),
                    jnp.where(better, shift2, shift), frozen, fixed, ids_a, ids_b)  # fmt: skip

        init = (jnp.int32(0), ids, red, shift, jnp.zeros_like(ids, bool), ids, ids_a, ids_b)
        _, ids, _, shift, *_ = jax.lax.while_loop(cond, again, init)
        info = measure(ids)
        red = info[key]
        return ids, dict(info, reduction=red, shift=shift,
                         on_budget=jnp.abs(red - target) <= tolerance)  # fmt: skip

    def decode(proposal):
        proposal = jnp.asarray(proposal, jnp.float32)
        if proposal.shape != (n_layers + 1, n_p):
            raise ValueError(f"proposals must have shape [L + 1, P] = {(n_layers + 1, n_p)}, got "
                             f"{proposal.shape}")  # fmt: skip
        return bisect(lambda s: ids_at(proposal, s), -bracket, bracket)

    removable = np.zeros(spec.n_nodes, bool)
    if lib.has_remove:
        removable = np.asarray(spec.valid)[:, lib.remove_id] & np.asarray(spec.action_mask)
    keep_ids = jnp.asarray(np.where(spec.action_mask, lib.keep_id, -1), jnp.int32)

    def decode_scores(scores):
        scores = jnp.asarray(scores, jnp.float32)
        if scores.shape != (spec.n_nodes,):
            raise ValueError(f"scores must have shape [n_nodes] = {(spec.n_nodes,)}")
        if not lib.has_remove:
            raise ValueError(f"library {lib.name!r} has no remove pattern to decode scores into")
        s = jnp.where(jnp.asarray(removable), scores, jnp.inf)
        finite = jnp.where(jnp.isfinite(s), s, 0.0)
        lo, hi = jnp.min(finite) - 1.0, jnp.max(finite) + 1.0

        def ids_of(threshold):  # larger threshold -> more nodes removed
            return jnp.where(s < threshold, lib.remove_id, keep_ids).astype(jnp.int32)

        return bisect(ids_of, lo, hi)

    full = np.full((spec.n_nodes,), -1, np.int32)  # every layer at its most aggressive pattern
    for li, nodes in enumerate(spec.layer_nodes):
        full[nodes] = by_aggression[np.flatnonzero(layer_valid[li][by_aggression])[0]]
    measure_j = jax.jit(measure)
    max_red = float(measure_j(jnp.asarray(full))[key])
    if target > max_red:
        raise ValueError(
            f"target {kind} reduction {target} is not reachable: pruning every prunable filter as "
            f"far as the {lib.name!r} patterns allow gives {max_red:.4f}; choose a target below it"
        )
    min_red = float(measure_j(keep_ids)[key])  # 0 but for a latency table calibrated below dense
    if target < min_red:
        raise ValueError(
            f"target {kind} reduction {target} is below what the unpruned model already gives "
            f"({min_red:.4f}: the compacted form the latency table models runs faster than the "
            f"dense model); choose a target above it"
        )
    return Decoder(action_mask, int(action_mask.sum()), decode, decode_scores, measure, fractions,
                   ids_at, float(target), float(tolerance), kind, max_red)  # fmt: skip


def uniform_logits(decoder: Decoder) -> np.ndarray:
    """The all-zero proposal f32 [L + 1, P]: every layer the same pattern mixture (the uniform
    allocation at the target)."""
    return np.zeros(decoder.action_mask.shape, np.float32)


def default_bracket(library: str | pat.PatternLibrary) -> float:
    """The shift's bisection bracket +-B for `library` (host): with proposals clipped to
    +-LOGIT_CLIP, at +-B every layer's mixture is one pattern up to exp(-40)."""
    cost = np.asarray(pat.get_library(library).pruned_fraction, np.float64)
    gaps = np.diff(np.unique(cost))
    return float((2 * LOGIT_CLIP + 40.0) / (gaps.min() if gaps.size else 1.0))

