"""Searches over budget-exact proposals: the GNN policy and its baselines (layer 4).

Every method here proposes a low-dimensional per-layer proposal, the shared `decode.Decoder` turns
it into pattern ids ON the budget (within the tolerance), the environment scores the candidates
(`env.evaluate_staged`: one compiled call per N candidates, successive halving when enabled), and
the method learns from the accuracies. Methods differ only in how they propose and learn:

* ``ppo``: the "mixture" GNN policy (`bandit.make_mixture_policy`) trained by the contextual-bandit
  PPO update (`bandit.make_bandit_update`) on the N x T samples of an iteration (T rollout calls of
  N candidates each, one update).
* ``random``: i.i.d. Gaussian proposals, the policy's initial distribution without learning
  (N(0, init_std^2) on the network-wide row, N(0, init_std_layer^2) on the layer rows).
* ``uniform``: only the network-wide row, N(0, init_std^2): the same pattern mixture in every layer
  (the "uniform allocation" family); the very first proposal is the zero vector, the uniform
  allocation itself (and the policy's initial mean).
* ``cem``: the cross-entropy method over the same Gaussian (mean and per-dimension std; the best
  ``cem_elite`` fraction of each iteration's samples refits them, smoothed by ``cem_alpha``).
* ``anneal``: AutoCompress's simulated annealing (arXiv 1907.03141, REFERENCE.md section 7) over
  the same proposal: N perturbations of the current point per call (scale init_std T / T0), the best
  one accepted with probability exp(-dE / T), dE in accuracy points; T cools geometrically from t0
  to t_stop over the run.
* ``magnitude``: global magnitude filter pruning through the score decoder: a filter's score is its
  L2 norm over its layer's mean L2 norm to the power alpha, the lowest-scoring filters are removed
  until the target; candidates sweep alpha over [0, 1] (0: raw global magnitude, 1: per-layer
  normalised).

`make_proposal_search` returns ``init(key) -> SearchState`` and ``iterate(consts, state) ->
(state, outputs)`` with the same state and outputs as `search.ppo`, so `search.runner` checkpoints,
logs and resumes every method alike. `make_joint_search` runs the ``ppo`` method on several
models at once with one shared GNN (`bandit.make_joint_update`), for policies that transfer (no
runner: it neither checkpoints nor resumes). Reward: the candidate's accuracy when on budget, else
``accuracy - 1 - |reduction - target|`` (never better than an on-budget one); only on-budget
candidates scored on the full reward set enter the kept top-K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import bandit
from sculpt_jax import graph as graph_lib
from sculpt_jax.decode import Decoder
from sculpt_jax.env import Env
from sculpt_jax.search.ppo import SearchState, init_best, update_best

METHODS = ("ppo", "random", "uniform", "cem", "anneal", "magnitude")


@dataclasses.dataclass(frozen=True)
class ProposalConfig:
    """Settings shared by the proposal methods (see the module docstring).

    n_envs: N candidates per compiled evaluation call; n_steps: T calls per iteration (one policy
    update per iteration). budget: total candidate evaluations of the run (sizes schedules).
    init_std / init_std_layer: the proposal Gaussian's initial std on the network-wide row / on
    the layer rows (policy, random, uniform, CEM, annealing steps).
    """

    n_envs: int = 16
    n_steps: int = 1
    top_k: int = 3
    budget: int = 128
    init_std: float = 1.0
    init_std_layer: float = 0.5
    cem_elite: float = 0.25
    cem_alpha: float = 0.7
    min_std: float = 0.05
    t0: float = 100.0
    t_stop: float = 20.0


class Method(NamedTuple):
    """init(key, obs) -> method state; propose(mstate, obs, key, j0) -> (proposals [N, ...], aux);
    learn(mstate, obs, proposals [S, ...], aux [S], reward [S], key) -> (mstate, metrics);
    kind: "logits" (decoded by `Decoder.decode`) or "scores" (`Decoder.decode_scores`)."""

    init: Callable
    propose: Callable
    learn: Callable
    kind: str


def _gaussian(mask, n, key, mean, std):
    eps = jax.random.normal(key, (n, *mask.shape), jnp.float32)
    return jnp.where(mask, mean + std * eps, 0.0)


def _no_learning(mstate, obs, proposals, aux, reward, key):
    return mstate, {}


def make_method(name: str, decoder: Decoder, cfg: ProposalConfig, *, policy=None,
                bandit_config=None, magnitude_scores=None) -> Method:  # fmt: skip
    """The `Method` of `name` (see the module docstring). `policy`/`bandit_config` for "ppo";
    `magnitude_scores` (f32 [alpha grid... ] -> scores fn) for "magnitude"."""
    mask = jnp.asarray(decoder.action_mask)
    n = cfg.n_envs
    row_std = jnp.full(mask.shape, cfg.init_std_layer).at[0].set(cfg.init_std)  # [L + 1, P]

    if name == "ppo":
        if policy is None:
            raise ValueError("method 'ppo' needs a policy (bandit.make_mixture_policy)")
        update = bandit.make_bandit_update(policy, bandit_config)

        def init(key, obs):
            return bandit.create_agent_state(policy.init(key, obs), bandit_config)

        def propose(mstate, obs, key, j0):
            return policy.sample(mstate.params, obs, key, n)

        def learn(mstate, obs, proposals, aux, reward, key):
            return update(mstate, obs, proposals, aux, reward, key)

        return Method(init, propose, learn, "logits")

    if name == "random":
        return Method(lambda key, obs: {},
                      lambda m, obs, key, j0: (_gaussian(mask, n, key, 0.0, row_std),
                                               jnp.zeros((n,))),
                      _no_learning, "logits")  # fmt: skip

    if name == "uniform":
        shared_only = mask & (jnp.arange(mask.shape[0]) == 0)[:, None]

        def propose(mstate, obs, key, j0):
            a = _gaussian(shared_only, n, key, 0.0, cfg.init_std)
            first = (j0 + jnp.arange(n)) == 0  # the run's first proposal: the zero vector
            return jnp.where(first[:, None, None], 0.0, a), jnp.zeros((n,))

        return Method(lambda key, obs: {}, propose, _no_learning, "logits")

    if name == "cem":
        def init(key, obs):
            return {"mean": jnp.zeros(mask.shape), "std": row_std}

        def propose(m, obs, key, j0):
            return _gaussian(mask, n, key, m["mean"], m["std"]), jnp.zeros((n,))

        def learn(m, obs, proposals, aux, reward, key):
            s = reward.shape[0]
            n_elite = max(2, int(round(cfg.cem_elite * s)))
            _, top = jax.lax.top_k(jnp.where(jnp.isfinite(reward), reward, -jnp.inf), n_elite)
            elite = proposals[top]
            a = cfg.cem_alpha
            mean = (1 - a) * m["mean"] + a * jnp.mean(elite, 0)
            std = (1 - a) * m["std"] + a * jnp.maximum(jnp.std(elite, 0), cfg.min_std)
            new = {"mean": jnp.where(mask, mean, 0.0), "std": std}
            return new, {"std_mean": jnp.sum(std * mask) / max(decoder.n_dims, 1)}

        return Method(init, propose, learn, "logits")

    if name == "anneal":
        iters = max(1, cfg.budget // (cfg.n_envs * cfg.n_steps))
        decay = (cfg.t_stop / cfg.t0) ** (1.0 / max(iters - 1, 1))

        def init(key, obs):
            return {"x": jnp.zeros(mask.shape), "energy": jnp.float32(jnp.inf),
                    "temperature": jnp.float32(cfg.t0)}  # fmt: skip

        def propose(m, obs, key, j0):
            scale = row_std * m["temperature"] / cfg.t0
            return _gaussian(mask, n, key, m["x"], scale), jnp.zeros((n,))

        def learn(m, obs, proposals, aux, reward, key):
            best = jnp.argmax(jnp.where(jnp.isfinite(reward), reward, -jnp.inf))
            energy = -100.0 * reward[best]
            d_e = energy - m["energy"]
            p_accept = jnp.where(d_e <= 0, 1.0, jnp.exp(-d_e / m["temperature"]))
            accept = jax.random.uniform(key) < p_accept
            new = {"x": jnp.where(accept, proposals[best], m["x"]),
                   "energy": jnp.where(accept, energy, m["energy"]),
                   "temperature": m["temperature"] * decay}  # fmt: skip
            return new, {"temperature": m["temperature"], "accepted": accept.astype(jnp.float32)}

        return Method(init, propose, learn, "logits")

    if name == "magnitude":
        if magnitude_scores is None:
            raise ValueError("method 'magnitude' needs magnitude_scores")

        def propose(m, obs, key, j0):
            j = j0 + jnp.arange(n)
            alpha = j.astype(jnp.float32) / max(cfg.budget - 1, 1)
            return jax.vmap(magnitude_scores)(alpha), jnp.zeros((n,))

        return Method(lambda key, obs: {}, propose, _no_learning, "scores")

    raise ValueError(f"unknown proposal method {name!r}; choose one of {METHODS}")


def make_magnitude_scores(spec: graph_lib.GraphSpec, variables) -> Callable:
    """alpha -> f32 [n_nodes] scores ``l2_f / mean_l2(layer)^alpha`` (host precomputes norms)."""
    l2 = np.asarray(graph_lib.filter_l2_norms(spec, variables), np.float64)
    layer = np.asarray(spec.action_layer)
    mean = np.bincount(layer, l2) / np.maximum(np.bincount(layer), 1)
    log_l2 = np.log(np.maximum(l2, 1e-30))
    log_mean = np.log(np.maximum(mean[layer], 1e-30))
    nodes = jnp.asarray(spec.action_nodes)

    def scores(alpha):
        s = jnp.asarray(log_l2, jnp.float32) - alpha * jnp.asarray(log_mean, jnp.float32)
        return jnp.full((spec.n_nodes,), jnp.inf, jnp.float32).at[nodes].set(s)

    return scores


def candidate_reward(info: dict, target: float) -> jax.Array:
    """Accuracy when on budget, else accuracy - 1 - |reduction - target| (f32, elementwise)."""
    off = info["accuracy"] - 1.0 - jnp.abs(info["reduction"] - target)
    return jnp.where(info["on_budget"], info["accuracy"], off).astype(jnp.float32)


def _rollout(env: Env, decoder: Decoder, decode: Callable, propose: Callable, consts, best,
             key, base, n: int, t_steps: int):
    """T calls of `propose(key, j0)` -> N proposals each (j0: the run's index of the call's
    first proposal, from `base`), decoded, scored and kept in `best`.

    Returns (best, proposals [N T, ...], aux [N T], reward [N T], info {name: [T, N]})."""
    def call(best, xs):
        t, k = xs
        proposals, aux = propose(k, base + t * n)
        ids, dec = jax.vmap(decode)(proposals)
        info = env.evaluate_staged(consts, ids)
        # The target's measure is the decoder's (true FLOPs, reference formula or params).
        info = dict(info, reduction=dec["reduction"], on_budget=dec["on_budget"])
        info["in_band"] = dec["on_budget"] & info["promoted"]
        best = update_best(best, ids, info)
        reward = candidate_reward(info, decoder.target)
        keep = ("reduction", "flops_reduction", "accuracy", "in_band", "promoted", "images")
        return best, (proposals, aux, reward, {k: info[k] for k in keep})

    best, (proposals, aux, reward, info) = jax.lax.scan(
        call, best, (jnp.arange(t_steps), jax.random.split(key, t_steps))
    )
    flat = lambda x: x.reshape((-1, *x.shape[2:]))
    return best, flat(proposals), flat(aux), flat(reward), info


def _iteration_metrics(reward, info, decoder: Decoder, best) -> dict:
    """What every search logs per iteration (means over its N T candidates)."""
    return dict(
        reward_mean=jnp.mean(reward),
        in_band_rate=jnp.mean(info["in_band"].astype(jnp.float32)),
        on_budget_rate=jnp.mean((jnp.abs(info["reduction"] - decoder.target)
                                 <= decoder.tolerance).astype(jnp.float32)),
        reduction_mean=jnp.mean(info["reduction"]),
        accuracy_mean=jnp.mean(info["accuracy"]),
        best_accuracy=best.score[0],
        best_reduction=best.reduction[0],
        images_scored=jnp.sum(info["images"]).astype(jnp.int32),
    )  # fmt: skip


def make_proposal_search(env: Env, decoder: Decoder, method: Method, cfg: ProposalConfig):
    """Builds ``(init, iterate)`` of a proposal search (see the module docstring).

    The environment's FLOPs measure must be the decoder's (both count the same masked model).
    """
    n, t_steps = cfg.n_envs, cfg.n_steps
    decode = decoder.decode if method.kind == "logits" else decoder.decode_scores

    def observation(consts):
        return env.observe(consts, env.reset())

    def init(key):
        k_method, k_run = jax.random.split(key)
        return SearchState(
            agent=method.init(k_method, observation(env.consts)), env={}, key=k_run,
            iteration=jnp.int32(0), best=init_best(cfg.top_k, env.spec.n_nodes),
            n_evals=jnp.int32(0), n_in_band=jnp.int32(0),
        )  # fmt: skip

    def iterate(consts, state: SearchState):
        key, k_roll, k_learn = jax.random.split(state.key, 3)
        obs = observation(consts)
        propose = lambda k, j0: method.propose(state.agent, obs, k, j0)
        best, proposals, aux, reward, info = _rollout(
            env, decoder, decode, propose, consts, state.best, k_roll,
            state.iteration * n * t_steps, n, t_steps,
        )  # fmt: skip
        agent, learn_metrics = method.learn(state.agent, obs, proposals, aux, reward, k_learn)
        metrics = dict(learn_metrics, **_iteration_metrics(reward, info, decoder, best))
        candidates = {k: info[k] for k in ("reduction", "flops_reduction", "accuracy", "in_band")}
        new = SearchState(
            agent=agent, env=state.env, key=key, iteration=state.iteration + 1, best=best,
            n_evals=state.n_evals + n * t_steps,
            n_in_band=state.n_in_band + jnp.sum(info["in_band"]).astype(jnp.int32),
        )  # fmt: skip
        return new, {"metrics": metrics, "candidates": candidates}

    return init, iterate


class JointState(NamedTuple):
    """State of `make_joint_search`: the shared agent, the run's key and iteration, and per model
    its kept top-K (`search.ppo.Best`) and evaluation count (int32 [K])."""

    agent: Any
    key: jax.Array
    iteration: jax.Array
    best: tuple
    n_evals: jax.Array


def make_joint_search(envs: Sequence[Env], decoders: Sequence[Decoder],
                      policies: Sequence[bandit.MixturePolicy], cfg: ProposalConfig,
                      bandit_config=None):  # fmt: skip
    """Builds ``(init, iterate)`` of the ppo search on K models at once with ONE GNN policy.

    Every iteration each model draws N x T proposals from its own distribution (the shared GNN's
    mean plus its correction), they are decoded on its budget and scored on its reward set as in
    `make_proposal_search`, and `bandit.make_joint_update` improves each model's distribution in
    its own trust region and fits the shared GNN to all of them: the GNN learns what the K models
    have in common, which is what starts a search on a model it never saw (`--policy-from`).
    The K graphs stay K observations (the GNN runs once per model inside the one program), not
    one `jraph.batch`. ``iterate(consts [K], state) -> (state, {"metrics": {name: [K]}})``;
    jittable. Not checkpointed: a killed joint run starts again.
    """
    k_models = len(envs)
    if not k_models == len(decoders) == len(policies):
        raise ValueError("make_joint_search needs one decoder and one policy per environment")
    n, t_steps = cfg.n_envs, cfg.n_steps
    update = bandit.make_joint_update(policies, bandit_config)

    def observations(consts):
        return [e.observe(c, e.reset()) for e, c in zip(envs, consts, strict=True)]

    def init(key):
        k_policy, k_run = jax.random.split(key)
        params = bandit.init_joint_params(policies, k_policy, observations([e.consts for e in envs])[0])
        return JointState(
            agent=bandit.create_agent_state(params, bandit_config), key=k_run,
            iteration=jnp.int32(0), best=tuple(init_best(cfg.top_k, e.spec.n_nodes) for e in envs),
            n_evals=jnp.zeros((k_models,), jnp.int32),
        )  # fmt: skip

    def iterate(consts, state: JointState):
        key, k_roll, k_learn = jax.random.split(state.key, 3)
        obs = observations(consts)
        g, corr = state.agent.params["gnn"], state.agent.params["correction"]
        out = []
        for k, k_key in enumerate(jax.random.split(k_roll, k_models)):
            params = {"gnn": g, "correction": corr[k]}
            propose = lambda key, j0, k=k, p=params: policies[k].sample(p, obs[k], key, n)
            out.append(_rollout(envs[k], decoders[k], decoders[k].decode, propose, consts[k],
                                state.best[k], k_key, state.iteration * n * t_steps, n, t_steps))  # fmt: skip
        best, proposals, aux, reward, info = (list(x) for x in zip(*out, strict=True))
        agent, learn = update(state.agent, obs, proposals, aux, reward, k_learn)
        per = [_iteration_metrics(r, i, d, b) for r, i, d, b in zip(reward, info, decoders, best, strict=True)]  # fmt: skip
        metrics = dict(learn, **{m: jnp.stack([p[m] for p in per]) for m in per[0]})
        new = JointState(agent=agent, key=key, iteration=state.iteration + 1, best=tuple(best),
                         n_evals=state.n_evals + n * t_steps)  # fmt: skip
        return new, {"metrics": metrics}

    return init, iterate


def mean_proposal(method_name: str, mstate: Any, policy, obs, decoder: Decoder):
    """The method's current best guess as one proposal [L + 1, P] (policy / CEM mean, annealing's
    current point, zeros otherwise): what zero-shot transfer evaluates."""
    if method_name == "ppo":
        return policy.dist(mstate.params, obs)[0]
    if method_name == "cem":
        return mstate["mean"]
    if method_name == "anneal":
        return mstate["x"]
    return jnp.zeros(decoder.action_mask.shape, jnp.float32)
