"""Masks: pattern ids -> mask pytrees, applying them, and an optax wrapper holding them (layer 2).

Masks mirror the params tree (same structure and shapes, float32, 1 = keep, 0 = prune, never None;
DESIGN.md principle 5). Every function taking "params" also accepts a full Flax variables dict
``{"params": ..., "batch_stats": ...}``; masks then mirror ``variables["params"]``.

Pipeline (AutoSculpt, REFERENCE.md sections 2-3):
  actions (pattern probabilities per action group, or per-filter ids)
  -> per-filter pattern ids, importance-ordered (`place_by_importance`: the k-th weakest filter by
     L2 norm of its ORIGINAL weights gets the k-th smallest sampled id)
  -> `pattern_ids_to_masks`: a kernel mask per layer (pattern per filter, broadcast over its input
     channels, placed on `Layer.kernel_spatial_axes`), plus zeroed `affine_paths` entries (bias, BN
     scale and bias) for every filter whose kernel mask is entirely zero, so that channel is EXACTLY
     zero after BatchNorm.
  -> `apply_masks` (elementwise product) and `masked(optimizer, masks)` for fine-tuning.

Residual semantics. Removing a filter zeroes that layer's own output channel (kernel and affine
entries). When that channel feeds a residual add, the summed stream channel stays alive through the
other addends (the identity shortcut or the other branch): only the removed layer's contribution is
gone. Consumers of the sum therefore still do work on that channel, and `flops.count` counts it as
alive (an input feature is alive if ANY of its producers' channels is alive). To drop a stream
channel entirely, remove that channel in every layer of its coupled group
(`LayerGraph.coupled_groups`).

Jittability: everything here is jittable (graph, library and tree structure static, ids/params may
be traced) except `validate_masks`, which is host-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sculpt_jax import patterns as pat
from sculpt_jax.tree_util import flatten_with_paths, get_at, map_with_path, path_str
from sculpt_jax.types import Layer, LayerGraph, Path

# ----------------------------------------------------------------------------------------------
# Basic mask trees.


def params_of(variables_or_params: Any) -> Any:
    """``variables["params"]`` when given a Flax variables dict, else the argument itself."""
    if isinstance(variables_or_params, Mapping) and isinstance(
        variables_or_params.get("params", None), Mapping
    ):
        return variables_or_params["params"]
    return variables_or_params


def ones_masks(variables_or_params: Any) -> Any:
    """All-ones float32 masks mirroring the params tree (jittable; shapes only are read).

    Args:
      variables_or_params: params pytree, or a variables dict (masks then mirror its "params").
    Returns:
      A pytree with the params' structure, each leaf ``jnp.ones(leaf.shape, float32)``.
    """
    return jax.tree.map(
        lambda x: jnp.ones(jnp.shape(x), jnp.float32), params_of(variables_or_params)
    )


def _paired_leaves(params: Any, masks: Any, where: str):
    """Checks that masks mirror params; returns (params treedef, param leaves, mask leaves)."""
    fp = flatten_with_paths(params)
    fm = flatten_with_paths(masks)
    kp, km = list(fp), list(fm)
    if kp != km:
        for a, b in zip(kp, km, strict=False):
            if a != b:
                raise ValueError(
                    f"{where}: masks do not mirror params: first mismatch at params path "
                    f"{path_str(a)!r} vs masks path {path_str(b)!r}; build masks with "
                    "masking.ones_masks(params) / pattern_ids_to_masks(graph, params, ...)."
                )
        extra = (kp[len(km)] if len(kp) > len(km) else km[len(kp)]) if kp or km else ()
        side = "params" if len(kp) > len(km) else "masks"
        raise ValueError(
            f"{where}: masks do not mirror params: path {path_str(extra)!r} only in {side}; build "
            "masks with masking.ones_masks(params) / pattern_ids_to_masks(graph, params, ...)."
        )
    for path in kp:
        sp, sm = jnp.shape(fp[path]), jnp.shape(fm[path])
        if sp != sm:
            raise ValueError(
                f"{where}: mask at {path_str(path)!r} has shape {sm} but the param has shape {sp}; "
                "rebuild the masks from these params."
            )
    treedef = jax.tree.structure(params)
    return treedef, list(fp.values()), list(fm.values())


def apply_masks(params: Any, masks: Any) -> Any:
    """``params * masks`` leaf by leaf (jittable).

    Args:
      params: params pytree, or a variables dict (then its "params" are masked and the other
        collections returned unchanged).
      masks: pytree mirroring the params (float 0/1 or bool leaves).
    Returns: the masked params (or variables), same structure and dtypes as the input.
    Raises: ValueError naming the first path where masks and params differ in structure or shape.
    """
    p = params_of(params)
    if p is not params and not (isinstance(masks, Mapping) and "params" in masks):
        out = dict(params)
        out["params"] = apply_masks(p, masks)
        return type(params)(out) if not isinstance(params, dict) else out
    treedef, pl, ml = _paired_leaves(params, masks, "apply_masks")
    leaves = [x * jnp.asarray(m).astype(jnp.result_type(x)) for x, m in zip(pl, ml, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def validate_masks(params: Any, masks: Any) -> None:
    """Host-only check that `masks` mirror `params` and contain only 0 and 1 (raises ValueError)."""
    _paired_leaves(params_of(params), masks, "validate_masks")
    for path, m in flatten_with_paths(masks).items():
        a = np.asarray(m)
        if a.dtype == bool:
            continue
        bad = ~((a == 0) | (a == 1))
        if np.any(bad):
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"validate_masks: mask at {path_str(path)!r} has value {a[first]!r} at index "
                f"{first}; masks must be 0/1 (build them with pattern_ids_to_masks, or threshold)."
            )


def pruned_exactly_zero(params: Any, masks: Any) -> bool:
    """True when every weight `masks` prunes is exactly 0.0 in `params` (host-only).

    `params` is a params pytree or a variables dict (its "params" are checked).
    """
    _, pl, ml = _paired_leaves(params_of(params), masks, "pruned_exactly_zero")
    return all(not np.any(np.where(np.asarray(m) == 0, np.asarray(p), 0) != 0)
               for p, m in zip(pl, ml, strict=True))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The optax wrapper (jaxpruner-style: masks live beside the optimizer state).


class MaskedState(NamedTuple):
    """State of `masked`: the inner optimizer state and the masks (float32, mirroring params)."""

    inner_state: Any
    masks: Any


def masked(
    inner: optax.GradientTransformation, masks: Any
) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so pruned weights stay EXACTLY zero (jittable init/update).

    Gradients are multiplied by the masks before `inner` (so momentum/Adam moments never see pruned
    entries), and the returned updates are ``where(mask, inner_updates, -params)``: with
    ``optax.apply_updates`` the new value at a masked position is ``p + (-p) == 0.0`` exactly
    (IEEE), whatever `inner` does there (weight decay, momentum from before a mask change,
    schedules, clipping). When `update` is called without params, masked updates are 0, which keeps
    already-zero params zero.

    Exact only as the LAST transform: wrapping the whole optimizer, or the last element of an
    `optax.chain` (e.g. after `clip_by_global_norm`). A transform after it rescales or changes the
    ``-p`` it returns (``optax.chain(masked(adam), scale(0.5))`` halves pruned weights instead of
    zeroing them); `check_exact(tx, params, masks)` proves the position with one probe update.
    (Unrelated to `optax.masked`, which applies a transform to a subset of the params.)
    Swap masks with `update_masks(opt_state, new_masks)` (same shapes: no recompilation).

    Args:
      inner: the optimizer to wrap.
      masks: float 0/1 pytree mirroring the params passed to `init`, or None: all ones at
        `init` (set the real ones with `update_masks`, or `training.create_train_state(masks=)`),
        for an optimizer built before the masks are known.
    """
    inner = optax.with_extra_args_support(inner)
    init_masks = None if masks is None else jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), masks)

    def init_fn(params):
        m = ones_masks(params) if init_masks is None else init_masks
        _paired_leaves(params, m, "masked().init")
        return MaskedState(inner.init(params), m)

    def update_fn(updates, state, params=None, **extra_args):
        treedef, ul, ml = _paired_leaves(updates, state.masks, "masked().update")
        grads = jax.tree.unflatten(
            treedef, [u * m.astype(u.dtype) for u, m in zip(ul, ml, strict=True)]
        )
        new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        nl = jax.tree.leaves(new_updates)
        if params is None:
            out = [jnp.where(m != 0, u, jnp.zeros_like(u)) for u, m in zip(nl, ml, strict=True)]
        else:
            pl = jax.tree.leaves(params)
            out = [
                jnp.where(m != 0, u, -jnp.asarray(p).astype(u.dtype))
                for u, m, p in zip(nl, ml, pl, strict=True)
            ]
        return jax.tree.unflatten(treedef, out), MaskedState(inner_state, state.masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_exact(tx: optax.GradientTransformation, params: Any, masks: Any) -> None:
    """Raises ValueError unless one update of `tx` (random gradients, from `params` with the
    pruned entries set to 1) leaves every pruned entry exactly zero: i.e. unless `tx` holds a
    `masked` optimizer as its last transform with these masks. Host-side, one step; call it once
    on an optimizer you built yourself before training with it."""
    _paired_leaves(params, masks, "check_exact")
    probe = jax.tree.map(lambda p, m: jnp.where(m != 0, p, 1.0).astype(jnp.float32), params, masks)
    leaves, treedef = jax.tree.flatten(probe)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    grads = jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )
    state = tx.init(probe)
    updates, _ = tx.update(grads, state, probe)
    new = optax.apply_updates(probe, updates)
    bad = [
        path_str(path)
        for (path, x), m in zip(flatten_with_paths(new).items(), jax.tree.leaves(masks), strict=True)
        if bool(jnp.any((jnp.asarray(m) == 0) & (x != 0)))
    ]
    if bad:
        raise ValueError(
            f"pruned weights of {bad[:3]} are not zero after one update: masking.masked must be the "
            "last transform of the optimizer (wrap the whole chain, masked(optax.chain(...), "
            "masks), or put it last in the chain) and hold these masks."
        )


def _map_masked_states(state: Any, fn, found: list) -> Any:
    if isinstance(state, MaskedState):
        found.append(state)
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map_masked_states(s, fn, found) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_masked_states(s, fn, found) for s in state)
    if isinstance(state, dict):
        return {k: _map_masked_states(v, fn, found) for k, v in state.items()}
    return state


def update_masks(opt_state: Any, new_masks: Any) -> Any:
    """`opt_state` with the masks of every `MaskedState` inside replaced by `new_masks` (jittable).

    The new masks must have the old masks' structure and shapes (they are cast to the old dtype), so
    a jitted train step is not recompiled. Raises ValueError if no `MaskedState` is found.
    """

    def swap(s: MaskedState) -> MaskedState:
        treedef, old, new = _paired_leaves(s.masks, new_masks, "update_masks")
        leaves = [jnp.asarray(n).astype(o.dtype) for o, n in zip(old, new, strict=True)]
        return MaskedState(s.inner_state, jax.tree.unflatten(treedef, leaves))

    found: list = []
    out = _map_masked_states(opt_state, swap, found)
    if not found:
        raise ValueError(
            "update_masks: no MaskedState in opt_state; build the optimizer with "
            "masking.masked(inner, masks)."
        )
    return out


def masks_from_state(opt_state: Any) -> Any:
    """The masks held by the (first) `MaskedState` inside `opt_state` (jittable)."""
    found: list = []
    _map_masked_states(opt_state, lambda s: s, found)
    if not found:
        raise ValueError(
            "masks_from_state: no MaskedState in opt_state; build the optimizer with "
            "masking.masked(inner, masks)."
        )
    return found[0].masks


# ----------------------------------------------------------------------------------------------
# Pattern ids -> masks.


def _normalize_ids(graph: LayerGraph, pattern_ids: Any) -> dict[int, Any]:
    """dict {layer_index: ids} or a per-layer sequence (None entries = untouched) -> dict."""
    if isinstance(pattern_ids, Mapping):
        items = {int(k): v for k, v in pattern_ids.items()}
    elif isinstance(pattern_ids, Sequence):
        if len(pattern_ids) != graph.n_layers:
            raise ValueError(
                f"pattern ids: got a sequence of {len(pattern_ids)} entries for "
                f"{graph.n_layers} layers; pass one entry per layer (None to leave it) or a dict."
            )
        items = {i: v for i, v in enumerate(pattern_ids) if v is not None}
    else:
        raise ValueError(
            f"pattern ids must be a dict {{layer_index: ids}} or a per-layer tuple, got "
            f"{type(pattern_ids).__name__}."
        )
    for k in items:
        if not 0 <= k < graph.n_layers:
            raise ValueError(
                f"pattern ids: layer index {k} out of range for a graph of {graph.n_layers} layers."
            )
    return items


def _check_ids_shape(layer: Layer, ids, lib: pat.PatternLibrary):
    _, i, f = pat.canonical_shape(layer)
    shape = tuple(jnp.shape(ids))
    if lib.kind == "region":
        ok = shape in ((), (1,), (f,))
        want = f"a scalar (one id per layer) or [{f}] (that id broadcast per filter)"
    elif lib.kind == "kernel":
        ok = shape in ((f,), (f, i))
        want = f"[{f}] (per filter) or [{f}, {i}] (per kernel)"
    else:
        ok = shape == (f,)
        want = f"[{f}] (one id per filter)"
    if not ok:
        raise ValueError(
            f"layer {layer.name!r}: pattern ids of shape {shape}, expected {want} for the "
            f"{lib.kind!r} library {lib.name!r}."
        )


def layer_canonical_mask(layer: Layer, ids, library: str | pat.PatternLibrary = "reference6"):
    """The ``[K, I, F]`` float32 kernel mask of `layer` for pattern `ids` (jittable).

    On layers where `valid_patterns` allows only keep/remove, a filter is zeroed iff its id is the
    library's remove id (other ids count as keep). Ids outside ``[0, P)`` (e.g. -1 padding) mean
    keep-all. Region libraries: one id for the layer (of a ``[F]`` vector, the first entry).
    """
    lib = pat.get_library(library)
    ids = jnp.asarray(ids, jnp.int32)
    _check_ids_shape(layer, ids, lib)
    ids = jnp.where((ids >= 0) & (ids < lib.n_patterns), ids, lib.keep_id)
    k, i, f = pat.canonical_shape(layer)
    lib_masks = jnp.asarray(lib.masks)
    full = bool(pat.valid_patterns(layer, lib).all())
    if lib.kind == "region":
        rid = ids.reshape(-1)[0]
        if full:
            m = pat.region_mask(lib_masks[rid], f, i)  # [F, I]
            return jnp.broadcast_to(m.T[None], (k, i, f))
        alive = (rid != lib.remove_id).astype(jnp.float32)
        return jnp.broadcast_to(alive, (k, i, f))
    if ids.ndim == 1:
        ids = jnp.broadcast_to(ids[:, None], (f, i))  # [F, I]
    if full:
        cells = lib_masks[ids].reshape(f, i, k)  # [F, I, 9]
        return jnp.transpose(cells, (2, 1, 0))
    if lib.has_remove:
        alive = (ids != lib.remove_id).astype(jnp.float32).T  # [I, F]
    else:
        alive = jnp.ones((i, f), jnp.float32)
    return jnp.broadcast_to(alive[None], (k, i, f))


def pattern_ids_to_masks(
    graph: LayerGraph,
    params: Any,
    pattern_ids: Mapping[int, Any] | Sequence[Any],
    library: str | pat.PatternLibrary = "reference6",
) -> Any:
    """Mask pytree (mirroring the params) for per-layer pattern ids (jittable; AutoSculpt sec. 3).

    Args:
      graph: the model's `LayerGraph` (static).
      params: params or variables (only shapes are read; may be abstract).
      pattern_ids: {layer_index: int32 ids} or a tuple with one entry per layer (None = all kept).
        Ids per layer: ``[out_features]`` for "filter" libraries; ``[out_features]`` or
        ``[out_features, in_features // groups]`` for "kernel" libraries; a scalar (or a broadcast
        ``[out_features]`` vector) for "region". Layers not given, and ids outside ``[0, P)``
        (e.g. -1 padding), keep everything.
      library: a registered library name or a `PatternLibrary`.
    Returns:
      float32 masks mirroring the params: kernel masks from the patterns, affine entries (bias, BN
      scale/bias) zeroed for filters whose kernel mask is all zero, ones elsewhere.
    """
    lib = pat.get_library(library)
    ptree = params_of(params)
    overrides: dict[Path, Any] = {}

    def put(path: Path, value):
        rel = pat.resolve_path(ptree, path)
        leaf_shape = tuple(jnp.shape(get_at(ptree, rel)))
        if int(np.prod(leaf_shape, dtype=np.int64)) != int(np.prod(value.shape, dtype=np.int64)):
            raise ValueError(
                f"{path_str(path)}: leaf of shape {leaf_shape} cannot hold a per-filter mask of "
                f"shape {value.shape}; affine_paths entries must have one entry per filter."
            )
        value = jnp.reshape(value, leaf_shape)
        overrides[rel] = overrides[rel] * value if rel in overrides else value

    for li, ids in sorted(_normalize_ids(graph, pattern_ids).items()):
        layer = graph.layers[li]
        canon = layer_canonical_mask(layer, ids, lib)
        put(layer.kernel_path, pat.canonical_to_kernel(canon, layer))
        f = canon.shape[-1]
        alive = (jnp.max(canon.reshape(-1, f), axis=0) > 0).astype(jnp.float32)
        for ap in layer.zeroed_affine_paths:
            put(ap, alive)

    return map_with_path(
        lambda path, x: overrides.get(path, jnp.ones(jnp.shape(x), jnp.float32)), ptree
    )


# ----------------------------------------------------------------------------------------------
# Actions -> per-filter pattern ids.


def filter_norms(kernel, layer: Layer):
    """L2 norm of each filter's weights: float32 ``[out_features]`` (jittable)."""
    c = pat.kernel_to_canonical(jnp.asarray(kernel, jnp.float32), layer)
    return jnp.sqrt(jnp.sum(c * c, axis=(0, 1)))


def place_by_importance(kernel, layer: Layer, sampled_ids):
    """Importance-ordered placement of sampled pattern ids (jittable; REFERENCE.md section 3).

    Filters are sorted by the L2 norm of their ORIGINAL weights, ascending (ties: lower index
    first); the sampled ids are sorted ascending; the k-th weakest filter gets the k-th smallest id,
    so the weakest filters get the most aggressive patterns (libraries order ids from most to least
    pruned).

    Args:
      kernel: the layer's original kernel, stored layout (`layer.kernel_shape`).
      layer: the `Layer`.
      sampled_ids: int ``[out_features]``, the multiset of ids drawn for this layer.
    Returns: int32 ``[out_features]``, the id of each filter.
    """
    order = jnp.argsort(filter_norms(kernel, layer), stable=True)
    ids = jnp.sort(jnp.asarray(sampled_ids, jnp.int32))
    return jnp.zeros_like(ids).at[order].set(ids)


def _layer_groups(graph: LayerGraph, probs, layer_groups) -> tuple[int, ...]:
    if layer_groups is None:
        if jnp.ndim(probs) == 1:
            return (0,) * graph.n_layers
        return tuple(range(graph.n_layers))
    if len(layer_groups) != graph.n_layers:
        raise ValueError(
            f"layer_groups has {len(layer_groups)} entries for {graph.n_layers} layers; give one "
            "group index per layer (-1 = not pruned)."
        )
    return tuple(int(g) for g in layer_groups)


def _layer_probs(probs, g: int, layer: Layer, lib: pat.PatternLibrary):
    p = jnp.asarray(probs, jnp.float32)
    p = p if p.ndim == 1 else p[g]
    if p.shape != (lib.n_patterns,):
        raise ValueError(
            f"pattern probabilities of shape {p.shape}: expected [{lib.n_patterns}] or "
            f"[n_groups, {lib.n_patterns}] for library {lib.name!r}."
        )
    p = jnp.clip(p, 0.0, None) * jnp.asarray(pat.valid_patterns(layer, lib), jnp.float32)
    s = jnp.sum(p)
    keep = jax.nn.one_hot(lib.keep_id, lib.n_patterns, dtype=jnp.float32)
    return jnp.where(s > 0, p / jnp.where(s > 0, s, 1.0), keep)


def _kernel_of(params: Any, layer: Layer):
    ptree = params_of(params)
    return get_at(ptree, pat.resolve_path(ptree, layer.kernel_path))


def sample_pattern_ids(
    key: jax.Array,
    graph: LayerGraph,
    params: Any,
    probs,
    library: str | pat.PatternLibrary = "reference6",
    layer_groups: Sequence[int] | None = None,
) -> dict[int, jax.Array]:
    """Draws per-filter ids from pattern probabilities and places them by importance (jittable).

    AutoSculpt (REFERENCE.md section 3): each filter's id is drawn from the categorical given by its
    action group's probabilities, restricted to `valid_patterns` and renormalised (all-invalid ->
    keep-all); then `place_by_importance` with the ORIGINAL weights in `params`.

    Args:
      key: PRNG key (folded with the layer index per layer).
      probs: float ``[P]`` (shared by all layers) or ``[n_groups, P]``.
      layer_groups: group index per layer (-1: layer left unpruned). Default: shared `probs` for a
        1-D `probs`, else one group per layer.
    Returns: {layer_index: int32 ids} (``[out_features]``; a scalar for region libraries).
    """
    lib = pat.get_library(library)
    out = {}
    for layer, g in zip(graph.layers, _layer_groups(graph, probs, layer_groups), strict=True):
        if g < 0:
            continue
        logits = jnp.log(_layer_probs(probs, g, layer, lib))
        lkey = jax.random.fold_in(key, layer.index)
        if lib.kind == "region":
            out[layer.index] = jax.random.categorical(lkey, logits).astype(jnp.int32)
            continue
        drawn = jax.random.categorical(lkey, logits, shape=(layer.out_features,))
        out[layer.index] = place_by_importance(_kernel_of(params, layer), layer, drawn)
    return out


def fractions_to_pattern_ids(
    graph: LayerGraph,
    params: Any,
    fractions,
    library: str | pat.PatternLibrary = "reference6",
    layer_groups: Sequence[int] | None = None,
) -> dict[int, jax.Array]:
    """Deterministic counterpart of `sample_pattern_ids`: per-group pattern fractions -> ids.

    For a layer with F filters and (validity-restricted, renormalised) fractions p, id j gets
    ``round(F * cumsum(p)[j]) - round(F * cumsum(p)[j-1])`` filters; the sorted ids are then placed
    by importance. Region libraries take the argmax. Jittable. Same args as `sample_pattern_ids`.
    """
    lib = pat.get_library(library)
    out = {}
    for layer, g in zip(graph.layers, _layer_groups(graph, fractions, layer_groups), strict=True):
        if g < 0:
            continue
        p = _layer_probs(fractions, g, layer, lib)
        if lib.kind == "region":
            out[layer.index] = jnp.argmax(p).astype(jnp.int32)
            continue
        f = layer.out_features
        bounds = jnp.round(f * jnp.cumsum(p))
        k = jnp.arange(f, dtype=jnp.float32)
        sorted_ids = jnp.sum(bounds[None, :] <= k[:, None], axis=1)
        sorted_ids = jnp.minimum(sorted_ids, lib.n_patterns - 1).astype(jnp.int32)
        out[layer.index] = place_by_importance(_kernel_of(params, layer), layer, sorted_ids)
    return out


def filter_actions_to_pattern_ids(
    graph: LayerGraph,
    actions: Mapping[int, Any] | Sequence[Any],
    library: str | pat.PatternLibrary = "reference6",
) -> dict[int, jax.Array]:
    """Per-filter ids chosen directly, validity-masked: ids that `valid_patterns` forbids on a layer
    (or out of range) become the keep-all id. No placement. Jittable.

    Args: actions: {layer_index: int ids} or a per-layer tuple (None = untouched).
    Returns: {layer_index: int32 ids} of the same shapes.
    """
    lib = pat.get_library(library)
    out = {}
    for li, ids in sorted(_normalize_ids(graph, actions).items()):
        valid = jnp.asarray(pat.valid_patterns(graph.layers[li], lib))
        ids = jnp.asarray(ids, jnp.int32)
        in_range = (ids >= 0) & (ids < lib.n_patterns)
        ok = in_range & valid[jnp.clip(ids, 0, lib.n_patterns - 1)]
        out[li] = jnp.where(ok, ids, lib.keep_id).astype(jnp.int32)
    return out


def actions_to_pattern_ids(
    graph: LayerGraph,
    params: Any,
    actions: Any,
    library: str | pat.PatternLibrary = "reference6",
    *,
    key: jax.Array | None = None,
    layer_groups: Sequence[int] | None = None,
) -> dict[int, jax.Array]:
    """Dispatches an agent action to per-filter pattern ids (jittable).

    * per-layer int ids (dict or tuple) -> `filter_actions_to_pattern_ids`;
    * float pattern probabilities ``[P]`` / ``[n_groups, P]`` with a `key` -> `sample_pattern_ids`;
    * the same without a key -> `fractions_to_pattern_ids`.
    """
    if isinstance(actions, (Mapping, list, tuple)):
        return filter_actions_to_pattern_ids(graph, actions, library)
    if key is not None:
        return sample_pattern_ids(key, graph, params, actions, library, layer_groups)
    return fractions_to_pattern_ids(graph, params, actions, library, layer_groups)
