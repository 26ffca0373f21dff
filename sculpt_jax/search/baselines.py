"""Baseline searches in the same environment and with the same evaluation budget as PPO (layer 4).

Each returns ``(init, iterate)`` with the same `SearchState` and metrics as `search.ppo`, so the host
loop, checkpointing and reports are shared. Every iteration evaluates T * N candidates in T compiled
calls of `env.evaluate` (N at a time), like a PPO iteration.

* ``random``: per action group, pattern probabilities from a flat Dirichlet; per-filter ids drawn from
  them and placed by importance (the PPO action space without learning).
* ``uniform``: one pruning pattern p for a fraction q of every layer's filters (the weakest by L2
  norm), the rest kept; candidates sweep (p, q) over a grid sized by the budget (q = 1 is "pattern p
  on every filter").
* ``magnitude``: per-layer magnitude filter pruning: the weakest fraction q of every layer's filters
  removed (the library's remove pattern), q swept over a grid sized by the budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import graph as graph_lib
from sculpt_jax import patterns as pat
from sculpt_jax.env import Env
from sculpt_jax.search.ppo import SearchState, init_best, update_best

METHODS = ("random", "uniform", "magnitude")


def importance_ranks(spec: graph_lib.GraphSpec, order) -> tuple[np.ndarray, np.ndarray]:
    """Host: (rank [n_nodes], layer_size [n_nodes]) of every action node within its layer, weakest
    filter rank 0 (from `graph.importance_order`); zeros elsewhere."""
    order = np.asarray(order)
    layer_of = np.asarray(spec.action_layer)
    starts = {}
    for a, layer in enumerate(layer_of):
        starts.setdefault(int(layer), a)
    rank = np.zeros((spec.n_nodes,), np.int32)
    size = np.zeros((spec.n_nodes,), np.int32)
    counts = np.bincount(layer_of, minlength=spec.layer_graph.n_layers)
    for a, node in enumerate(order):
        layer = int(layer_of[a])
        rank[node] = a - starts[layer]
        size[node] = counts[layer]
    return rank, size


def make_baseline_search(
    env: Env,
    method: str,
    order,
    *,
    library: str | pat.PatternLibrary = "reference6",
    n_envs: int = 4,
    n_steps: int = 8,
    top_k: int = 3,
    budget: int = 320,
):
    """Builds a baseline search (see module docstring). `budget` = total candidate evaluations the
    run will make (iterations * n_steps * n_envs); it sizes the deterministic sweeps."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    spec = env.spec
    lib = pat.get_library(library)
    action = jnp.asarray(spec.action_mask)
    valid = jnp.asarray(spec.valid)
    rank_np, size_np = importance_ranks(spec, order)
    rank, size = jnp.asarray(rank_np), jnp.asarray(size_np)
    group = jnp.asarray(np.maximum(spec.node_group, 0))
    order_j = jnp.asarray(order)
    pruning = [p for p in range(lib.n_patterns) if p != lib.keep_id]
    n_p = len(pruning)
    pruning_j = jnp.asarray(pruning, jnp.int32)
    per_call = n_envs

    def fraction_ids(p, q):
        chosen = rank.astype(jnp.float32) < q * size.astype(jnp.float32)
        ok = valid[:, p]
        ids = jnp.where(chosen & ok, p, lib.keep_id)
        return jnp.where(action, ids, -1).astype(jnp.int32)

    def candidate(j, key):
        if method == "random":
            alpha = jnp.ones((spec.n_groups, lib.n_patterns), jnp.float32)
            probs = jax.random.dirichlet(jax.random.fold_in(key, 0), alpha)
            logits = jnp.where(valid, jnp.log(probs[group] + 1e-12), -1e9)
            ids = jax.random.categorical(jax.random.fold_in(key, 1), logits, axis=-1)
            ids = jnp.where(action, ids, -1).astype(jnp.int32)
            return graph_lib.place_by_importance(spec, order_j, ids)
        if method == "uniform":
            n_q = -(-budget // n_p)
            p = pruning_j[j % n_p]
            q = ((j // n_p) + 1).astype(jnp.float32) / n_q
            return fraction_ids(p, q)
        q = (j + 1).astype(jnp.float32) / budget
        return fraction_ids(jnp.int32(lib.remove_id if lib.has_remove else pruning[0]), q)

    def init(key):
        env_states = jax.vmap(lambda _: env.reset())(jnp.arange(n_envs))
        return SearchState(
            agent={},
            env=env_states,
            key=key,
            iteration=jnp.int32(0),
            best=init_best(top_k, spec.n_nodes),
            n_evals=jnp.int32(0),
            n_in_band=jnp.int32(0),
        )

    def iterate(consts, state):
        key, k_roll = jax.random.split(state.key)
        base = state.iteration * n_steps * per_call

        def one_call(best, xs):
            t, call_key = xs
            js = base + t * per_call + jnp.arange(per_call)
            keys = jax.random.split(call_key, per_call)
            ids = jax.vmap(candidate)(js, keys)
            if env.config.reward == "gated":  # FLOPs first; forward passes only in band
                measured = env.evaluate(consts, ids, jnp.zeros((per_call,), bool))
                gate = jnp.abs(measured["reduction"] - env.config.target) <= env.config.band
            else:
                gate = None
            info = env.evaluate(consts, ids, gate)
            info["in_band"] = jnp.abs(info["reduction"] - env.config.target) <= env.config.band
            best = update_best(best, ids, info)
            keep = ("reduction", "flops_reduction", "accuracy", "in_band", "evaluated")
            return best, {k: info[k] for k in keep}

        best, info = jax.lax.scan(
            one_call,
            state.best,
            (jnp.arange(n_steps), jax.random.split(k_roll, n_steps)),
        )
        in_band = info["in_band"]
        acc = info["accuracy"]
        reward = jnp.where(in_band, 100.0 * jnp.nan_to_num(acc), jnp.nan_to_num(acc) - 1.0)
        metrics = dict(
            reward_mean=jnp.mean(reward),
            in_band_rate=jnp.mean(in_band.astype(jnp.float32)),
            reduction_mean=jnp.mean(info["reduction"]),
            best_accuracy=best.score[0],
            best_reduction=best.reduction[0],
            forward_passes=jnp.sum(info["evaluated"]).astype(jnp.int32),
        )
        candidates = {k: info[k] for k in ("reduction", "flops_reduction", "accuracy", "in_band")}
        new = SearchState(
            agent=state.agent,
            env=state.env,
            key=key,
            iteration=state.iteration + 1,
            best=best,
            n_evals=state.n_evals + n_steps * per_call,
            n_in_band=state.n_in_band + jnp.sum(in_band).astype(jnp.int32),
        )
        return new, {"metrics": metrics, "candidates": candidates}

    return init, iterate
