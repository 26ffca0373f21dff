"""The resumable host loop shared by every search method (layer 4).

`run_search` jits one search iteration (PPO or a baseline; vmapped over seeds when n_seeds > 1),
then only checkpoints, logs and draws progress around it:

* after every iteration the whole `SearchState` (agent params, optimizer state, env states, RNG,
  iteration, best in-band candidates, counters) is saved with Orbax, so a killed search loses at most
  the iteration in flight and a resumed run is bit-identical to an uninterrupted one;
* metrics go to ``<workdir>/metrics.jsonl``, every evaluated candidate's (reduction, accuracy) to
  ``<workdir>/candidates.jsonl`` (for the accuracy-vs-FLOPs plot);
* a progress bar shows the iteration, in-band rate and the best validation accuracy / reduction.

Keys are raw uint32 PRNG keys so that they checkpoint as plain arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sculpt_jax import agent as agent_lib
from sculpt_jax import checkpoint as ckpt
from sculpt_jax import graph as graph_lib
from sculpt_jax import paths as paths_lib
from sculpt_jax import sharding as shd
from sculpt_jax.env import Env
from sculpt_jax.search import ppo, propose

log = logging.getLogger(__name__)

METHODS = propose.METHODS


@dataclasses.dataclass
class SearchResult:
    """Outcome of `run_search` (host values).

    best: list of dicts (best first; over all seeds): pattern_ids (np int32 [n_nodes]), accuracy
      (reward-set validation accuracy), reduction, flops_reduction, reference_reduction,
      params_reduction, seed. history: per-iteration metrics dicts (seed-averaged, plus per-seed
      best accuracy). n_evals / n_in_band: totals over seeds. seconds: wall time of this process's
      iterations; iterations_run: how many of them ran here (0 when all were restored). best_at:
      {iteration: best list} for the `best_at` iterations run in this process.
    """

    best: list[dict]
    history: list[dict]
    n_evals: int
    n_in_band: int
    seconds: float
    iterations_run: int
    state: Any = None
    best_at: dict = dataclasses.field(default_factory=dict)


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _host(x):
    x = np.asarray(x)
    if x.ndim == 0:
        v = x.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return x


def make_search_fns(
    env: Env,
    method: str,
    *,
    order,
    policy: Any = None,
    ppo_config: Any = None,
    n_envs: int = 16,
    n_steps: int = 1,
    top_k: int = 3,
    budget: int = 128,
    library="reference6",
    decoder: Any = None,
    proposal: dict | None = None,
):
    """(init, iterate) of `method`: the budget-exact proposal search (`propose`, needs `decoder`)
    or, for "ppo" with a legacy `agent.Policy` (heads paper / per_group / per_filter), the
    reference's band-rule PPO (`ppo.make_ppo_search`)."""
    if method == "ppo" and isinstance(policy, agent_lib.Policy):
        return ppo.make_ppo_search(
            env, policy, ppo_config, n_envs=n_envs, n_steps=n_steps, top_k=top_k
        )
    if method not in propose.METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {METHODS}")
    if decoder is None:
        raise ValueError(f"method {method!r} needs a decoder (decode.make_decoder)")
    if method == "ppo" and policy is None:
        raise ValueError("method 'ppo' needs a policy (bandit.make_mixture_policy)")
    cfg = propose.ProposalConfig(n_envs=n_envs, n_steps=n_steps, top_k=top_k, budget=budget,
                                 **(proposal or {}))  # fmt: skip
    scores = None
    if method == "magnitude":
        scores = propose.make_magnitude_scores(env.spec, env.consts["variables"])
    m = propose.make_method(method, decoder, cfg, policy=policy, bandit_config=ppo_config,
                            magnitude_scores=scores)  # fmt: skip
    return propose.make_proposal_search(env, decoder, m, cfg)


_COMPILED: list = []  # [(key tuple, env, policy, decoder, fns)]: a few recent compiled searches


def compiled_search(env: Env, method: str, *, n_seeds: int = 1, **kwargs):
    """Jitted ``(init_fn(keys [S, 2]), iter_fn(consts, state))`` of a search, cached for the same
    env/policy/settings so that resuming in the same process does not compile again.

    With n_seeds > 1 both are vmapped over a leading seed axis; iter_fn donates the state. On an
    env built with a mesh (`env.make_env(mesh=)`) the candidates of each call are split over its
    devices inside the one compiled iteration, and the state (policy, optimizer, buffers) comes
    out replicated on the mesh.
    """
    policy = kwargs.get("policy")
    order = kwargs.get("order")
    decoder = kwargs.get("decoder")
    key = (
        method,
        n_seeds,
        id(decoder),
        json.dumps(
            {k: v for k, v in kwargs.items() if k not in ("policy", "order", "library", "decoder")},
            sort_keys=True,
            default=str,
        ),
        None if order is None else np.asarray(order).tobytes(),
        str(kwargs.get("library")),
        env.mesh,
    )
    for k, e, p, d, fns in _COMPILED:
        if k == key and e is env and p is policy and d is decoder:
            return fns
    init, iterate = make_search_fns(env, method, **kwargs)
    out = {} if env.mesh is None else {"out_shardings": shd.replicated(env.mesh)}
    if n_seeds > 1:
        fns = (
            jax.jit(jax.vmap(init), **out),
            jax.jit(jax.vmap(iterate, in_axes=(None, 0)), donate_argnums=(1,), **out),
        )
    else:
        fns = (jax.jit(lambda k: init(k[0]), **out),
               jax.jit(iterate, donate_argnums=(1,), **out))  # fmt: skip
    _COMPILED.append((key, env, policy, decoder, fns))
    del _COMPILED[:-4]
    return fns


def run_search(
    env: Env,
    method: str = "ppo",
    *,
    workdir: str,
    iterations: int,
    seed: int = 0,
    n_seeds: int = 1,
    n_envs: int = 16,
    n_steps: int = 1,
    top_k: int = 3,
    policy: Any = None,
    ppo_config: Any = None,
    order=None,
    library="reference6",
    decoder: Any = None,
    proposal: dict | None = None,
    progress: bool = True,
    fingerprint: dict | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
    best_at: tuple[int, ...] = (),
    tensorboard: bool = True,
) -> SearchResult:
    """Runs (or resumes) a search in `workdir` and returns its best in-band candidates.

    Args:
      env: the pruning environment.
      method: "ppo" or a baseline name.
      workdir: folder for checkpoints, metrics.jsonl and candidates.jsonl.
      iterations: total iterations (each T=n_steps x N=n_envs candidate evaluations per seed).
      seed / n_seeds: seeds seed..seed+n_seeds-1 run together (vmapped) when n_seeds > 1.
      policy / ppo_config: for "ppo" (a `bandit.MixturePolicy` with a bandit config, or a legacy
        `agent.Policy` with a PPO config). order: `graph.importance_order`.
      decoder / proposal: the budget-exact `decode.Decoder` and `propose.ProposalConfig` fields
        (init_std, cem_elite, ...) of the proposal methods.
      fingerprint: JSON-able description of the run; resuming a workdir written with another one
        raises ValueError (pass overwrite=True to start afresh).
      stop_after: stop after this many iterations in this process (for tests of resume).
      best_at: iterations after which the kept candidates are also recorded
        (`SearchResult.best_at[it]`, as `best`): smaller budgets read off one run.
      tensorboard: also write each iteration's metrics as TensorBoard scalars under
        ``workdir/tensorboard`` (`checkpoint.log_scalars`; needs tensorboardX, else skipped).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if order is None:
        order = np.asarray(env.spec.action_nodes)
    init_fn, iter_fn = compiled_search(
        env, method, order=order, policy=policy, ppo_config=ppo_config, n_envs=n_envs,
        n_steps=n_steps, top_k=top_k, budget=iterations * n_steps * n_envs, library=library,
        n_seeds=n_seeds, decoder=decoder, proposal=proposal,
    )  # fmt: skip
    keys = jnp.stack([jax.random.PRNGKey(seed + i) for i in range(n_seeds)])

    fp = _fingerprint(
        dict(fingerprint or {}, method=method, seed=seed, n_seeds=n_seeds, n_envs=n_envs,
             n_steps=n_steps, top_k=top_k, iterations=iterations)
    )  # fmt: skip
    checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2,
                                     overwrite=overwrite)  # fmt: skip
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    cand_path = os.path.join(workdir, "candidates.jsonl")
    # Fresh and restored arrays must both be committed, else jit sees two signatures (retrace):
    # to the env's mesh (replicated) when it has one, else to the default device.
    where = jax.devices()[0] if env.mesh is None else shd.replicated(env.mesh)
    commit = lambda tree: jax.device_put(tree, where)
    state = commit(init_fn(keys))
    start = 0
    history: list[dict] = []
    latest = checkpointer.latest_step()
    if latest is not None:
        meta = checkpointer.read_meta(latest)
        if meta.get("fingerprint") != fp:
            checkpointer.close()
            raise ValueError(
                f"{workdir} holds a search with other settings (method, seeds, sizes or model); "
                "use another --workdir or pass --overwrite (Python: overwrite=True) to discard it"
            )
        restored = checkpointer.restore_latest_valid(target=state)
        if restored is not None:
            start, state, meta = restored
            state = commit(state)
            history = ckpt.read_jsonl(metrics_path)[:start] if paths_lib.exists(metrics_path) else []
            log.info("resumed search from iteration %d in %s", start, workdir)
    elif overwrite:
        for p in (metrics_path, cand_path):
            if paths_lib.exists(p):
                ckpt.write_jsonl(p, [])
    if start and paths_lib.exists(metrics_path):  # drop lines of an iteration that was in flight
        ckpt.write_jsonl(metrics_path, history)
        cands = ckpt.read_jsonl(cand_path) if paths_lib.exists(cand_path) else []
        ckpt.write_jsonl(cand_path, [c for c in cands if c.get("iteration", 0) < start])

    t0 = time.perf_counter()
    ran = 0
    snapshots: dict[int, list[dict]] = {}
    bar = tqdm(
        total=iterations, initial=start, disable=not progress, desc=f"search[{method}]",
        unit="it", dynamic_ncols=True,
    )  # fmt: skip
    try:
        for it in range(start, iterations):
            if stop_after is not None and ran >= stop_after:
                break
            state, out = iter_fn(env.consts, state)
            m = jax.tree.map(_host, jax.device_get(out["metrics"]))
            c = jax.device_get(out["candidates"])
            record = {"iteration": it + 1}
            for k, v in m.items():
                arr = np.asarray(v, np.float64) if v is not None else np.array(np.nan)
                record[k] = (
                    None
                    if not np.all(np.isfinite(arr)) and arr.ndim == 0
                    else (float(np.nanmean(arr)) if np.any(np.isfinite(arr)) else None)
                )
            if n_seeds > 1:
                record["best_accuracy_per_seed"] = [
                    None if not np.isfinite(a) else float(a)
                    for a in np.asarray(out["metrics"]["best_accuracy"])
                ]
            record["n_evals"] = int(np.sum(np.asarray(state.n_evals)))
            record["n_in_band"] = int(np.sum(np.asarray(state.n_in_band)))
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            ckpt.append_jsonl(metrics_path, record)
            if tensorboard:
                ckpt.log_scalars(os.path.join(workdir, "tensorboard"), record, it + 1)
            ckpt.append_jsonl(cand_path, {
                "iteration": it, **{k: np.asarray(v).reshape(-1).tolist() for k, v in c.items()}
            })  # fmt: skip
            checkpointer.save(it + 1, state, {"fingerprint": fp, "iteration": it + 1})
            if it + 1 in best_at:
                snapshots[it + 1] = collect_best(state, n_seeds, seed)
            ran += 1
            bar.update(1)
            best = record.get("best_accuracy")
            bar.set_postfix(
                in_band=f"{record.get('in_band_rate') or 0:.2f}",
                best_acc="-" if best is None else f"{best:.3f}",
                best_red="-" if record.get("best_reduction") is None
                else f"{record['best_reduction']:.3f}",
            )  # fmt: skip
            if record.get("nan_skipped"):
                log.warning("iteration %d: a non-finite loss or sample was skipped in the policy "
                            "update", it + 1)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()

    best = collect_best(state, n_seeds, seed)
    return SearchResult(
        best=best,
        history=history,
        n_evals=int(np.sum(np.asarray(state.n_evals))),
        n_in_band=int(np.sum(np.asarray(state.n_in_band))),
        seconds=time.perf_counter() - t0,
        iterations_run=ran,
        state=state,
        best_at=snapshots,
    )


def collect_best(state, n_seeds: int, seed: int) -> list[dict]:
    """Host: the in-band candidates of every seed's buffer, best accuracy first, duplicates once."""
    b = jax.device_get(state.best)
    score = np.asarray(b.score).reshape(n_seeds, -1)
    out, seen = [], set()
    for s in range(n_seeds):
        for k in range(score.shape[1]):
            if not np.isfinite(score[s, k]):
                continue
            ids = np.asarray(b.pattern_ids).reshape(n_seeds, score.shape[1], -1)[s, k]
            key = ids.tobytes()
            if key in seen:
                continue
            seen.add(key)
            get = lambda f, s=s, k=k: float(np.asarray(getattr(b, f)).reshape(n_seeds, -1)[s, k])
            out.append({
                "pattern_ids": ids.astype(np.int32),
                "accuracy": float(score[s, k]),
                "reduction": get("reduction"),
                "flops_reduction": get("flops_reduction"),
                "reference_reduction": get("reference_reduction"),
                "params_reduction": get("params_reduction"),
                "seed": seed + s,
            })  # fmt: skip
    out.sort(key=lambda d: -d["accuracy"])
    return out


def policy_for(env: Env, head: str, variables, cfg) -> agent_lib.Policy:
    """The actor-critic for `env` with the config's sizes and importance order."""
    order = graph_lib.importance_order(env.spec, variables)
    return agent_lib.make_policy(
        env.spec, head, order=order, sigma=cfg.sigma, hidden=cfg.hidden, n_layers=cfg.gnn_layers,
        n_heads=cfg.heads,
    )  # fmt: skip
