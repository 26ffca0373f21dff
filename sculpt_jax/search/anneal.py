"""Simulated annealing over layer-wise pruning rates (layer 4; AutoCompress, arXiv 1907.03141).

AutoCompress searches per-layer pruning rates heuristically, not by DRL (REFERENCE.md section 7):

* state: one pruning rate per pruned layer;
* guidance ("layers with more weights can be pruned more"): after every perturbation the rates are
  re-assigned in the order of the layers' weight counts (`guide_rates`), so a layer with more
  weights never gets a smaller rate than one with fewer;
* perturbation: uniform in ``[-p, p]`` per layer with ``p = perturbation * T / T0`` (0.35 default);
* hard constraint: the proposal's rates are scaled by one global multiplier, found by bisection,
  until the EXACT reduction (`flops.count` of the masks, FLOPs or params) reaches the target
  (`make_constraint`); rates are clipped to ``[lower, max_rate]``;
* energy: ``-100 * accuracy`` (accuracy in percent) of the quickly evaluated masked model;
* acceptance: better moves always, worse ones with probability ``exp(-|dE| / T)``;
* cooling ``T <- 0.9 T`` from 100 while ``T > 20`` (16 temperatures).

`anneal` is a pure host loop around jitted callables, deterministic given its key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sculpt_jax import flops as flops_lib
from sculpt_jax import patterns as pat
from sculpt_jax.search import admm
from sculpt_jax.types import LayerGraph

TARGET_KINDS = ("flops", "params")


def temperatures(t0: float = 100.0, t_stop: float = 20.0, cooling: float = 0.9) -> tuple:
    """The cooling schedule ``t0, t0 c, t0 c^2, ...`` while ``T > t_stop`` (host-only)."""
    if not (t0 > t_stop > 0 and 0 < cooling < 1):
        raise ValueError(
            f"cooling schedule needs t0 > t_stop > 0 and 0 < cooling < 1, got t0={t0}, "
            f"t_stop={t_stop}, cooling={cooling}."
        )
    out, t = [], float(t0)
    while t > t_stop:
        out.append(t)
        t *= cooling
    return tuple(out)


def acceptance_probability(delta_e, temperature):
    """1 for ``dE <= 0`` (not worse), else ``exp(-|dE| / T)`` (jittable, elementwise)."""
    delta_e = jnp.asarray(delta_e, jnp.float32)
    return jnp.where(delta_e <= 0, 1.0, jnp.exp(-jnp.abs(delta_e) / temperature))


def guide_rates(rates, weight_counts):
    """Rates re-assigned so that more weights -> a rate no smaller (jittable).

    The multiset of rates is kept; the layer with the k-th fewest weights (ties: lower index first)
    gets the k-th smallest rate.

    Args: rates float ``[L]``; weight_counts int ``[L]`` (static numpy).
    """
    order = np.argsort(np.asarray(weight_counts), kind="stable")
    rates = jnp.asarray(rates, jnp.float32)
    return jnp.zeros_like(rates).at[order].set(jnp.sort(rates))


def reduction_of(graph: LayerGraph, masks: Any, target_kind: str = "flops"):
    """Exact reduction (float32) of `masks` by `flops.count`: FLOPs or params (jittable)."""
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {target_kind!r}.")
    c = flops_lib.count(graph, masks)
    return c["flops_reduction" if target_kind == "flops" else "params_reduction"]


def make_constraint(
    graph: LayerGraph,
    *,
    scheme: str = "filter+column",
    layers: Sequence[int] | None = None,
    target_kind: str = "flops",
    max_rate: float = 0.95,
    n_bisect: int = 24,
    library: str | pat.PatternLibrary = "reference6",
) -> Callable:
    """Jitted ``constrain(params, prev_masks, rates, lower, target) -> (rates, reduction, masks)``.

    Hard constraint of AutoCompress: the smallest multiplier m (bisection, `n_bisect` halvings of
    ``[0, max_rate / min(rates)]``) with ``reduction(clip(m * rates, lower, max_rate)) >= target``.
    If even the upper end cannot reach the target, the upper end is returned (the caller sees
    ``reduction < target``). `prev_masks` may be None (no earlier round; a different trace from
    a mask pytree). Cached per static settings. Guidance order is preserved
    (scaling and clipping are monotone; `lower` must itself be guided).
    """
    layers = admm._resolve_layers(graph, layers)
    admm.check_scheme(scheme)
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {target_kind!r}.")
    key = (graph, scheme, layers, target_kind, float(max_rate), int(n_bisect), library)
    if key in _CONSTRAINTS:
        return _CONSTRAINTS[key]

    def at(params, prev_masks, base, lower, m):
        r = jnp.clip(jnp.maximum(m * base, lower), 0.0, max_rate)
        masks = admm.scheme_masks(graph, params, r, scheme, layers, library, prev_masks)
        return r, reduction_of(graph, masks, target_kind), masks

    def constrain(params, prev_masks, rates, lower, target):
        base = jnp.maximum(jnp.asarray(rates, jnp.float32), 1e-3)
        lower = jnp.asarray(lower, jnp.float32)
        hi = max_rate / jnp.min(base)

        def body(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            ok = at(params, prev_masks, base, lower, mid)[1] >= target
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        _, hi = jax.lax.fori_loop(0, n_bisect, body, (jnp.float32(0.0), hi))
        return at(params, prev_masks, base, lower, hi)

    _CONSTRAINTS[key] = jax.jit(constrain)
    while len(_CONSTRAINTS) > 8:
        _CONSTRAINTS.pop(next(iter(_CONSTRAINTS)))
    return _CONSTRAINTS[key]


_CONSTRAINTS: dict = {}  # compiled constraints by static settings (reused across rounds/calls)


def anneal(
    key: jax.Array,
    energy_fn: Callable[[Any], tuple[float, dict]],
    project_fn: Callable[[Any], Any],
    init_rates,
    weight_counts: Sequence[int],
    *,
    t0: float = 100.0,
    t_stop: float = 20.0,
    cooling: float = 0.9,
    perturbation: float = 0.35,
    moves_per_temperature: int = 1,
    top_k: int = 3,
    progress: bool = False,
) -> dict:
    """Simulated annealing over per-layer rates (host loop; deterministic given `key`).

    Args:
      key: PRNG key (folded with the move number).
      energy_fn: ``rates -> (energy, info)``, lower is better (e.g. -100 * accuracy).
      project_fn: ``rates -> rates`` enforcing the hard constraint (after `guide_rates`).
      init_rates: float ``[L]`` start (guided and projected first).
      weight_counts: per pruned layer, for `guide_rates`.
    Returns: {"best": up to `top_k` dicts (energy, rates np [L], info) best first, distinct rates;
      "current": the final state's dict; "history": per move (temperature, energy, accepted);
      "n_evals"}.
    """
    temps = temperatures(t0, t_stop, cooling)
    wc = np.asarray(weight_counts)

    def propose(r):
        return np.asarray(project_fn(guide_rates(r, wc)), np.float32)

    rates = propose(init_rates)
    energy, info = energy_fn(rates)
    best: list[dict] = []

    def remember(e, r, inf):
        if not math.isfinite(e) or any(np.array_equal(b["rates"], r) for b in best):
            return
        best.append({"energy": float(e), "rates": np.asarray(r), "info": inf})
        best.sort(key=lambda b: b["energy"])
        del best[top_k:]

    remember(energy, rates, info)
    history = []
    n_moves = len(temps) * moves_per_temperature
    bar = tqdm(total=n_moves, disable=not progress, desc="anneal", dynamic_ncols=True)
    move = 0
    try:
        for t in temps:
            for _ in range(moves_per_temperature):
                k = jax.random.fold_in(key, move)
                k_step, k_acc = jax.random.split(k)
                scale = perturbation * t / t0
                step = jax.random.uniform(k_step, rates.shape, minval=-scale, maxval=scale)
                cand = propose(np.clip(rates + np.asarray(step), 0.0, 1.0))
                e_new, info_new = energy_fn(cand)
                p = float(acceptance_probability(e_new - energy, t))
                accepted = bool(float(jax.random.uniform(k_acc)) < p) and math.isfinite(e_new)
                remember(e_new, cand, info_new)
                if accepted:
                    rates, energy, info = cand, e_new, info_new
                history.append({"temperature": t, "energy": float(e_new), "accepted": accepted})
                move += 1
                bar.update(1)
                bar.set_postfix(T=f"{t:.1f}", E=f"{energy:.2f}", best=f"{best[0]['energy']:.2f}")
    finally:
        bar.close()
    return {
        "best": best,
        "current": {"energy": energy, "rates": rates, "info": info},
        "history": history,
        "n_evals": 1 + n_moves,
    }
