"""Structured-sparsity schemes, their exact projections and ADMM pruning (layer 4; AutoCompress).

AutoCompress (arXiv 1907.03141, REFERENCE.md section 7) prunes with structured schemes whose masks
mirror the params (DESIGN.md principle 5) and are counted exactly by `flops.count`:

* filter pruning: whole output filters (a kernel's ``[:, :, f]`` in the canonical ``[K, I, F]``
  layout of `patterns.kernel_to_canonical`); a removed filter also zeroes its affine entries (bias,
  BN scale/bias), as `masking.pattern_ids_to_masks` does, so its channel is exactly zero;
* column pruning: a column is one (kernel cell, input channel) pair across ALL filters of a layer,
  ``[k, i, :]`` -- the column of the im2col GEMM matrix;
* "filter+column": filters at rate ``1 - sqrt(1 - r)`` then columns at the same rate (of the
  filter-pruned kernel), so that the kept fraction of the layer is ~``1 - r``;
* "pattern": AutoSculpt's per-filter patterns (`masking.fractions_to_pattern_ids`) mixing the two
  neighbouring pruned fractions of the library so that the layer's mean pruned fraction is ``r``.

Projections are exact Euclidean projections onto "at most n kept": keep the top-n filters (columns)
by L2 norm, n = round((1 - r) * count), at least 1, ties to the lower index. The combined scheme is
the sequential (filter then column) projection, the heuristic the paper uses.

ADMM (section 7): minimise loss(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2; W-step by SGD (jitted step),
Z-step = projection of W + U at the chosen rates, U <- U + W - Z; finally hard-prune W to the
support of the last Z (the masks). Everything here is jittable except the host loop `run_admm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sculpt_jax import data as data_lib
from sculpt_jax import masking, training
from sculpt_jax import patterns as pat
from sculpt_jax.tree_util import get_at, map_with_path, path_str, set_at
from sculpt_jax.types import Layer, LayerGraph, Path

SCHEMES = ("filter", "column", "filter+column", "pattern")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown pruning scheme {scheme!r}; choose one of {SCHEMES}.")
    return scheme


def _keep_top(norms, keep_fraction):
    """bool mask of the top-n entries of a 1-D `norms` (n = round(keep * len), >= 1; jittable)."""
    n = norms.shape[0]
    n_keep = jnp.clip(jnp.round(jnp.asarray(keep_fraction, jnp.float32) * n), 1, n)
    order = jnp.argsort(-norms, stable=True)  # strongest first, ties -> lower index first
    ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return ranks < n_keep


def filter_mask(kernel, layer: Layer, keep_fraction):
    """Canonical ``[K, I, F]`` float32 mask keeping the top filters by L2 norm (jittable)."""
    c = pat.kernel_to_canonical(jnp.asarray(kernel, jnp.float32), layer)
    keep = _keep_top(jnp.sqrt(jnp.sum(c * c, axis=(0, 1))), keep_fraction)
    return jnp.broadcast_to(keep[None, None, :], c.shape).astype(jnp.float32)


def column_mask(kernel, layer: Layer, keep_fraction):
    """Canonical ``[K, I, F]`` float32 mask keeping the top (cell, input) columns by L2 norm."""
    c = pat.kernel_to_canonical(jnp.asarray(kernel, jnp.float32), layer)
    k, i, f = c.shape
    keep = _keep_top(jnp.sqrt(jnp.sum(c * c, axis=2)).reshape(-1), keep_fraction).reshape(k, i)
    return jnp.broadcast_to(keep[:, :, None], c.shape).astype(jnp.float32)


def project_filters(kernel, layer: Layer, keep_fraction):
    """Exact projection onto "at most n filters": ``(kernel * mask, mask)``, stored layout.

    Args: kernel in `layer.kernel_shape`; keep_fraction scalar in [0, 1] (may be traced).
    Returns: the projected kernel (same dtype) and its float32 mask (stored layout). Jittable.
    """
    m = pat.canonical_to_kernel(filter_mask(kernel, layer, keep_fraction), layer)
    return kernel * m.astype(jnp.result_type(kernel)), m


def project_columns(kernel, layer: Layer, keep_fraction):
    """Exact projection onto "at most n columns" (see `column_mask`); like `project_filters`."""
    m = pat.canonical_to_kernel(column_mask(kernel, layer, keep_fraction), layer)
    return kernel * m.astype(jnp.result_type(kernel)), m


def rate_to_pattern_fractions(rate, library: str | pat.PatternLibrary = "reference6"):
    """float ``[P]`` pattern fractions whose mean pruned fraction is `rate` (jittable).

    Mixes the two library patterns whose pruned fractions bracket `rate` (linear interpolation over
    the distinct pruned fractions, ids of equal fraction sharing equally).
    """
    lib = pat.get_library(library)
    pf = np.asarray(lib.pruned_fraction, np.float64)
    levels = np.unique(pf)  # ascending
    rate = jnp.clip(jnp.asarray(rate, jnp.float32), levels[0], levels[-1])
    hi = jnp.clip(jnp.searchsorted(jnp.asarray(levels, jnp.float32), rate), 1, len(levels) - 1)
    lo = hi - 1
    lv = jnp.asarray(levels, jnp.float32)
    w_hi = (rate - lv[lo]) / (lv[hi] - lv[lo])
    level_w = jnp.zeros((len(levels),), jnp.float32).at[lo].add(1 - w_hi).at[hi].add(w_hi)
    which = np.searchsorted(levels, pf)  # level of each pattern
    share = np.bincount(which, minlength=len(levels))[which].astype(np.float32)
    return level_w[which] / share


def _resolve_layers(graph: LayerGraph, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        layers = tuple(
            layer.index for layer in graph.layers if layer.kind == "conv" and layer.depth > 0
        )
    layers = tuple(int(i) for i in layers)
    for i in layers:
        if not 0 <= i < graph.n_layers:
            raise ValueError(
                f"layer index {i} out of range for a graph of {graph.n_layers} layers."
            )
    if not layers:
        raise ValueError("no layer to prune: pass layers=(indices of prunable layers).")
    return layers


def default_layers(graph: LayerGraph) -> tuple[int, ...]:
    """Layers AutoCompress prunes by default: every conv except the input-reading ones (depth 0)."""
    return _resolve_layers(graph, None)


def layer_scheme_mask(kernel, layer: Layer, rate, scheme: str, library="reference6"):
    """Canonical ``[K, I, F]`` mask of one layer at pruning `rate` under `scheme` (jittable)."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    if scheme == "filter":
        return filter_mask(kernel, layer, keep)
    if scheme == "column":
        return column_mask(kernel, layer, keep)
    if scheme == "filter+column":
        part = jnp.sqrt(jnp.clip(keep, 0.0, 1.0))
        fm = filter_mask(kernel, layer, part)
        kept = pat.canonical_to_kernel(pat.kernel_to_canonical(kernel, layer) * fm, layer)
        return fm * column_mask(kept, layer, part)
    if scheme == "pattern":
        lib = pat.get_library(library)
        frac = rate_to_pattern_fractions(rate, lib)
        ids = masking.fractions_to_pattern_ids(
            _OneLayer(layer), {"k": kernel}, frac, lib, layer_groups=(0,)
        )[0]
        return masking.layer_canonical_mask(layer, ids, lib)
    raise ValueError(f"unknown pruning scheme {scheme!r}; choose one of {SCHEMES}.")


class _OneLayer:
    """A minimal LayerGraph stand-in holding one layer whose kernel lives at ("k",)."""

    def __init__(self, layer: Layer):
        import dataclasses

        self.layers = (dataclasses.replace(layer, index=0, kernel_path=("k",)),)
        self.n_layers = 1


def masks_from_canonical(graph: LayerGraph, params: Any, canon: Mapping[int, Any]) -> Any:
    """Mask pytree mirroring the params from per-layer canonical kernel masks (jittable).

    Layers not in `canon` keep everything. Affine entries (bias, BN scale/bias) of filters whose
    kernel mask is entirely zero are zeroed (shared leaves multiply), as in `masking`.
    """
    ptree = masking.params_of(params)
    overrides: dict[Path, Any] = {}

    def put(path: Path, value):
        rel = pat.resolve_path(ptree, path)
        shape = tuple(jnp.shape(get_at(ptree, rel)))
        if int(np.prod(shape)) != int(np.prod(value.shape)):
            raise ValueError(
                f"{path_str(path)}: leaf of shape {shape} cannot hold a mask of shape "
                f"{value.shape}; affine_paths entries must have one entry per filter."
            )
        value = jnp.reshape(value, shape)
        overrides[rel] = overrides[rel] * value if rel in overrides else value

    for li, c in sorted(canon.items()):
        layer = graph.layers[li]
        c = jnp.asarray(c, jnp.float32)
        put(layer.kernel_path, pat.canonical_to_kernel(c, layer))
        alive = (jnp.max(c.reshape(-1, c.shape[-1]), axis=0) > 0).astype(jnp.float32)
        for ap in layer.zeroed_affine_paths:
            put(ap, alive)
    return map_with_path(
        lambda path, x: overrides.get(path, jnp.ones(jnp.shape(x), jnp.float32)), ptree
    )


def scheme_masks(
    graph: LayerGraph,
    params: Any,
    rates,
    scheme: str = "filter+column",
    layers: Sequence[int] | None = None,
    library: str | pat.PatternLibrary = "reference6",
    prev_masks: Any = None,
) -> Any:
    """Masks of the whole model: each pruned layer at its rate, chosen on `params`' magnitudes.

    Args:
      graph: `LayerGraph` (static). params: params or variables (the magnitudes decide).
      rates: float ``[len(layers)]`` pruning rates in [0, 1) (may be traced).
      scheme: one of `SCHEMES`. layers: pruned layer indices (default `default_layers`).
      prev_masks: masks of earlier rounds; the result is their product with the new masks
        (weights already zero have norm 0 and are pruned first, so the supports nest).
    Returns: float32 masks mirroring the params. Jittable.
    """
    check_scheme(scheme)
    layers = _resolve_layers(graph, layers)
    ptree = masking.params_of(params)
    if prev_masks is not None:
        ptree = masking.apply_masks(ptree, prev_masks)
    rates = jnp.asarray(rates, jnp.float32)
    canon = {}
    for j, li in enumerate(layers):
        layer = graph.layers[li]
        kernel = get_at(ptree, pat.resolve_path(ptree, layer.kernel_path))
        canon[li] = layer_scheme_mask(kernel, layer, rates[j], scheme, library)
    masks = masks_from_canonical(graph, ptree, canon)
    if prev_masks is not None:
        masks = jax.tree.map(lambda a, b: a * jnp.asarray(b, jnp.float32), masks, prev_masks)
    return masks


def _kernels(graph: LayerGraph, params: Any, layers: Sequence[int]) -> list:
    ptree = masking.params_of(params)
    return [get_at(ptree, pat.resolve_path(ptree, graph.layers[i].kernel_path)) for i in layers]


_ADMM_CACHE: dict = {}


def make_admm_fns(
    apply_fn: Callable,
    graph: LayerGraph,
    layers: Sequence[int],
    scheme: str,
    tx: optax.GradientTransformation,
    *,
    rho: float = 1e-4,
    library: str | pat.PatternLibrary = "reference6",
):
    """The compiled pieces of ADMM (AutoCompress section "ADMM-based structured pruning").

    Returns ``(w_step, z_step)``:
      w_step(state: training.TrainState, z, u, batch) -> (state, metrics): one SGD step on
        ``CE + rho/2 sum_i ||W_i - Z_i + U_i||^2`` (z, u: lists of kernels of `layers`), donated.
      z_step(params, u, z_old, rates, prev_masks) -> (z, masks, u_new, residual): masks =
        `scheme_masks` of ``W + U``, ``Z = (W + U) * mask`` per pruned kernel,
        ``u_new = U + W - Z`` and ``residual = ||W - z_old||_2`` (the primal residual of the
        W-step just taken).
    """
    layers = tuple(layers)

    def w_step(state, z, u, batch):
        images = jnp.asarray(batch["image"])
        labels = jnp.asarray(batch["label"]).astype(jnp.int32)
        has_bs = bool(jax.tree.leaves(state.batch_stats))

        def loss_fn(params):
            v = {"params": params, **({"batch_stats": state.batch_stats} if has_bs else {})}
            logits, upd = apply_fn(v, images, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(0)})  # fmt: skip
            ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
            ws = _kernels(graph, params, layers)
            pen = sum(jnp.sum((w - zz + uu) ** 2) for w, zz, uu in zip(ws, z, u, strict=True))
            bs = upd.get("batch_stats", state.batch_stats) if has_bs else state.batch_stats
            return ce + 0.5 * rho * pen, (ce, bs)

        (loss, (ce, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=bs, opt_state=opt_state)
        return new, {"loss": loss, "ce": ce}

    def z_step(params, u, z_old, rates, prev_masks):
        ws = _kernels(graph, params, layers)
        ptree = masking.params_of(params)
        wu = ptree
        for li, w, uu in zip(layers, ws, u, strict=True):
            wu = set_at(wu, pat.resolve_path(ptree, graph.layers[li].kernel_path), w + uu)
        masks = scheme_masks(graph, wu, rates, scheme, layers, library, prev_masks)
        zs = [k * m for k, m in zip(_kernels(graph, wu, layers), _kernels(graph, masks, layers),
                                    strict=True)]  # fmt: skip
        u_new = [uu + w - zz for uu, w, zz in zip(u, ws, zs, strict=True)]
        res = jnp.sqrt(sum(jnp.sum((w - zz) ** 2) for w, zz in zip(ws, z_old, strict=True)))
        return zs, masks, u_new, res

    return jax.jit(w_step, donate_argnums=(0,)), jax.jit(z_step)


def _cached_admm_fns(apply_fn, graph, layers, scheme, rho, lr, library):
    """(tx, w_step, z_step) for these static settings, compiled once per process (a few kept)."""
    key = (apply_fn, graph, tuple(layers), scheme, float(rho), float(lr), library)
    for k, fns in _ADMM_CACHE.items():
        if k == key:
            return fns
    tx = training.make_optimizer("sgd", lr=lr, momentum=0.9, weight_decay=0.0, schedule="constant")
    # The masks live in the optimizer state (`run_admm` puts each round's prev_masks there), so
    # weights pruned by earlier rounds stay exactly zero through the W-steps, one compile for all.
    tx = masking.masked(tx, None)
    fns = (tx, *make_admm_fns(apply_fn, graph, layers, scheme, tx, rho=rho, library=library))
    _ADMM_CACHE[key] = fns
    while len(_ADMM_CACHE) > 4:
        _ADMM_CACHE.pop(next(iter(_ADMM_CACHE)))
    return fns


_apply_masks_jit = jax.jit(masking.apply_masks)
scheme_masks_jit = jax.jit(scheme_masks, static_argnames=("graph", "scheme", "layers", "library"))
scheme_masks_jit.__doc__ = "`scheme_masks` jitted (graph, scheme, layers, library static)."


def run_admm(
    apply_fn: Callable,
    variables: Mapping[str, Any],
    graph: LayerGraph,
    rates,
    train_images: Any,
    train_labels: np.ndarray,
    *,
    scheme: str = "filter+column",
    layers: Sequence[int] | None = None,
    prev_masks: Any = None,
    rho: float = 1e-4,
    iterations: int = 3,
    steps_per_iteration: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    library: str | pat.PatternLibrary = "reference6",
) -> dict:
    """ADMM structured pruning at fixed per-layer `rates`, then hard pruning (host loop).

    Loop: Z0 = proj(W), U0 = 0; per iteration: `steps_per_iteration` W-steps (SGD momentum 0.9 on
    ``CE + rho/2 ||W - Z + U||^2``, batches from `data.iterate_batches`; the weights `prev_masks`
    prunes are held exactly zero, `masking.masked`, so nothing pruned earlier regrows),
    Z = proj(W + U), U <- U + W - Z. Finally masks = the support of the last Z-step (exactly the projection's
    support) and the weights are multiplied by them.

    Returns: {"variables": hard-pruned variables, "masks": masks (the last Z's support),
    "residuals": [||W - Z||_2 over the pruned kernels per iteration, after its W-steps],
    "z": last Z kernels, "u": last U kernels}.
    """
    check_scheme(scheme)
    layers = _resolve_layers(graph, layers)
    if iterations < 1 or steps_per_iteration < 0:
        raise ValueError("run_admm: iterations must be >= 1 and steps_per_iteration >= 0.")
    if prev_masks is None:
        prev_masks = masking.ones_masks(variables)
    tx, w_step, z_step = _cached_admm_fns(apply_fn, graph, layers, scheme, rho, lr, library)
    state = training.create_train_state(None, variables, tx, masks=prev_masks)
    rates = jnp.asarray(rates, jnp.float32)
    u = [jnp.zeros(w.shape, w.dtype) for w in _kernels(graph, state.params, layers)]
    z, masks, _, _ = z_step(state.params, u, u, rates, prev_masks)  # Z0 = proj(W), U0 = 0
    residuals = []
    epoch, it = 0, None
    for _ in range(iterations):
        for _ in range(steps_per_iteration):
            batch = next(it, None) if it is not None else None
            if batch is None:
                it = data_lib.iterate_batches(train_images, train_labels, batch_size, seed=seed,
                                              epoch=epoch)  # fmt: skip
                epoch += 1
                batch = next(it)
            state, _ = w_step(state, z, u, batch)
        z, masks, u, res = z_step(state.params, u, z, rates, prev_masks)
        residuals.append(float(res))
    params = _apply_masks_jit(state.params, masks)
    out = {"params": params}
    if jax.tree.leaves(state.batch_stats):
        out["batch_stats"] = state.batch_stats
    return {"variables": out, "masks": masks, "residuals": residuals, "z": z, "u": u}
