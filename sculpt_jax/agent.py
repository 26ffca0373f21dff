"""The AutoSculpt agent: action sampling, log-probs and the PPO update (layer 3).

AutoSculpt (arXiv 2412.18091, Sec. 3; REFERENCE.md Sec. 3-4) trains a GNN actor-critic with PPO. An
action assigns one pattern id to every action node of the observation graph (`graph.GraphSpec`):

* head "paper": the actor gives a mean vector over the P patterns; a Gaussian sample (sigma 0.2),
  clipped to [0.01, 0.99] and normalised, is the categorical shared by the whole network from which
  each filter's id is drawn (restricted to its valid patterns), then placed by importance (weakest
  filter gets the smallest id). The log-prob is the Gaussian density of the sample; the per-filter
  draw is environment-side randomness, as in the reference. Action = {"sample": f32 [P],
  "ids": int32 [N]}.
* head "per_group": per action group logits [G, P]; each filter draws from its group's categorical
  (restricted to its valid patterns), then importance placement inside each layer; log-prob = sum
  over action nodes of log p_group(id) (exact after placement: filters of one layer share one
  distribution, so the product is permutation invariant). Action = {"ids": int32 [N]}.
* head "per_filter": per node logits [N, P]; no placement (the policy sees each filter's weight
  statistics and chooses directly); log-prob = sum over action nodes. Action = {"ids": int32 [N]}.

Ids are -1 on non-action nodes. PPO follows rlax: `rlax.clipped_surrogate_pg_loss` on the ratio,
advantages from `rlax.truncated_generalized_advantage_estimation` ("gae") or the reference's
per-batch normalised discounted returns ("reference"), MSE value loss, optional entropy bonus,
Adam, epochs x minibatches by `lax.scan`, a NaN guard. All functions are jittable and vmappable
(over environments and over seeds); helpers are unbatched with `_t` names and rank asserts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import rlax

from sculpt_jax import gnn
from sculpt_jax import graph as graph_lib

# ----------------------------------------------------------------------------------------------
# Distributions (unbatched).


def categorical_log_probs(logits: jax.Array, action_mask: jax.Array) -> jax.Array:
    """Per-node log-probabilities f32 [N, P] of masked logits [N, P]; rows of non-action nodes are
    computed from zeros (finite) and must be ignored (see `categorical_probs`)."""
    chex.assert_rank([logits, action_mask], [2, 1])
    logits = jnp.where(action_mask[:, None], logits, 0.0)
    return jax.nn.log_softmax(logits, axis=-1)


def categorical_probs(logits: jax.Array, action_mask: jax.Array) -> jax.Array:
    """Per-node probabilities f32 [N, P]: exactly 0 on non-action (padding, feature-map) rows and
    on invalid patterns (masked to `gnn.NEG_LOGIT`)."""
    p = jnp.exp(categorical_log_probs(logits, action_mask))
    return p * action_mask[:, None].astype(p.dtype)


def ids_log_prob(log_probs: jax.Array, ids: jax.Array, action_mask: jax.Array) -> jax.Array:
    """sum_n log p_n(ids_n) over action nodes. log_probs f32 [N, P], ids int32 [N] -> f32 []."""
    chex.assert_rank([log_probs, ids, action_mask], [2, 1, 1])
    idx = jnp.clip(ids, 0, log_probs.shape[-1] - 1)
    lp = jnp.take_along_axis(log_probs, idx[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(action_mask, lp, 0.0))


def categorical_entropy(log_probs: jax.Array, action_mask: jax.Array) -> jax.Array:
    """Sum over action nodes of -sum_p p log p (the joint entropy of the independent draws)."""
    ent = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return jnp.sum(jnp.where(action_mask, ent, 0.0))


def gaussian_log_prob(x: jax.Array, mean: jax.Array, sigma: float) -> jax.Array:
    """log N(x; mean, sigma^2 I) summed over the P entries: f32 []."""
    chex.assert_rank([x, mean], 1)
    z = (x - mean) / sigma
    return jnp.sum(-0.5 * z * z - math.log(sigma) - 0.5 * math.log(2.0 * math.pi))


def gaussian_entropy(n: int, sigma: float) -> float:
    """Entropy of N(., sigma^2 I_n): n * (0.5 log(2 pi e) + log sigma) (a constant)."""
    return n * (0.5 * math.log(2.0 * math.pi * math.e) + math.log(sigma))


# ----------------------------------------------------------------------------------------------
# Policy.


class Policy(NamedTuple):
    """Functions of one policy (closures over the `GraphSpec`; all jittable and vmappable).

    init(key, obs=None) -> params (obs defaults to `graph.example_observation(spec)`).
    apply(params, obs) -> dict of head outputs (`gnn.ActorCritic`).
    sample_action(params, obs, key) -> (action, log_prob f32 [], value f32 [],
      pattern_ids int32 [N]).
    action_log_prob(params, obs, action) -> (log_prob f32 [], entropy f32 [], value f32 []).
    """

    init: Callable
    apply: Callable
    sample_action: Callable
    action_log_prob: Callable


def make_policy(
    spec: graph_lib.GraphSpec,
    head: str = "per_group",
    *,
    order: Any = None,
    sigma: float = 0.2,
    hidden: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    edge_dim: int = 32,
    mlp_hidden: int = 128,
) -> Policy:
    """Builds the actor-critic policy for a model's observation graph (REFERENCE.md Sec. 3-4).

    Args:
      spec: from `graph.build_graph_spec`.
      head: "paper", "per_group" or "per_filter" (see module docstring).
      order: int32 [A] from `graph.importance_order(spec, original_params)`; None -> filter order
        (no importance information). Used by "paper" and "per_group".
      sigma: standard deviation of the "paper" head's Gaussian.
      hidden, n_layers, n_heads, edge_dim, mlp_hidden: `gnn.ActorCritic` sizes.

    Returns:
      A `Policy` (init, apply, sample_action, action_log_prob).
    """
    if head == "mixture":
        raise ValueError("head 'mixture' is built by bandit.make_mixture_policy (budget-exact "
                         "proposals); agent.make_policy builds the legacy band-rule heads")  # fmt: skip
    if head not in gnn.LEGACY_HEADS:
        raise ValueError(f"head must be one of {gnn.LEGACY_HEADS}, got {head!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    order_np = np.asarray(spec.action_nodes if order is None else order, np.int32)
    if order_np.shape != spec.action_nodes.shape:
        raise ValueError(
            f"order must have shape {spec.action_nodes.shape} (one entry per action node); "
            "build it with graph.importance_order(spec, params)"
        )
    model = gnn.ActorCritic(
        n_patterns=spec.n_patterns,
        n_edge_types=graph_lib.n_edge_types(spec),
        n_groups=spec.n_groups,
        head=head,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        edge_dim=edge_dim,
        mlp_hidden=mlp_hidden,
    )
    n_patterns = spec.n_patterns

    def statics():
        return (
            jnp.asarray(spec.node_mask),
            jnp.asarray(spec.edge_mask),
            jnp.asarray(spec.action_mask),
            jnp.asarray(spec.valid),
            jnp.asarray(spec.node_group),
        )

    def init(key: jax.Array, obs: Any = None) -> Any:
        if obs is None:
            obs = graph_lib.example_observation(spec)
        return model.init(key, obs, *statics())

    def apply(params: Any, obs: Any) -> dict[str, jax.Array]:
        # The topology is static: use the spec's constant senders/receivers, so that a vmap over
        # observations batches only features and edge types (cheaper gathers/scatters).
        obs = obs._replace(senders=jnp.asarray(spec.senders), receivers=jnp.asarray(spec.receivers))
        return model.apply(params, obs, *statics())

    def place(ids):
        if head == "per_filter":
            return ids
        return graph_lib.place_by_importance(spec, jnp.asarray(order_np), ids)

    def sample_action(params: Any, obs: Any, key: jax.Array):
        out = apply(params, obs)
        action_mask = jnp.asarray(spec.action_mask)
        if head == "paper":
            key_gauss, key_ids = jax.random.split(key)
            mean = out["mean"]
            sample = mean + sigma * jax.random.normal(key_gauss, mean.shape, mean.dtype)
            log_prob = gaussian_log_prob(sample, mean, sigma)
            probs = jnp.clip(sample, 0.01, 0.99)
            probs = probs / jnp.sum(probs)
            valid = jnp.asarray(spec.valid)
            logits = jnp.where(valid, jnp.log(probs)[None, :], gnn.NEG_LOGIT)
            logits = jnp.where(action_mask[:, None], logits, 0.0)
            ids = jax.random.categorical(key_ids, logits, axis=-1).astype(jnp.int32)
            ids = place(jnp.where(action_mask, ids, -1))
            action = {"sample": sample, "ids": ids}
        else:
            logits = out["logits"]
            log_probs = categorical_log_probs(logits, action_mask)
            ids = jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)
            ids = place(jnp.where(action_mask, ids, -1))
            log_prob = ids_log_prob(log_probs, ids, action_mask)
            action = {"ids": ids}
        return action, log_prob, out["value"], action["ids"]

    def action_log_prob(params: Any, obs: Any, action: Mapping[str, jax.Array]):
        out = apply(params, obs)
        if head == "paper":
            log_prob = gaussian_log_prob(action["sample"], out["mean"], sigma)
            entropy = jnp.asarray(gaussian_entropy(n_patterns, sigma), jnp.float32)
        else:
            action_mask = jnp.asarray(spec.action_mask)
            log_probs = categorical_log_probs(out["logits"], action_mask)
            log_prob = ids_log_prob(log_probs, action["ids"], action_mask)
            entropy = categorical_entropy(log_probs, action_mask)
        return log_prob, entropy, out["value"]

    return Policy(init, apply, sample_action, action_log_prob)


# ----------------------------------------------------------------------------------------------
# PPO.


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (defaults: the reference's, REFERENCE.md Sec. 4, where it has one).

    advantage: "gae" (rlax truncated GAE, lambda `gae_lambda`) or "reference" (discounted returns
      normalised over the batch; advantage = normalised return - old value, target = normalised
      return). normalize_advantages: standardise advantages over the batch. adam_eps: Adam's
      epsilon (torch's 1e-8 as in the reference; RL codes often use 1e-5, which also stops Adam
      from amplifying rounding noise on near-zero gradients). max_grad_norm: global norm clip,
      None or <= 0 for none. n_minibatches must divide T * N_envs.
    """

    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    lr: float = 1e-3
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    n_epochs: int = 3
    n_minibatches: int = 1
    advantage: str = "gae"
    normalize_advantages: bool = True


def as_ppo_config(config: Any = None) -> PPOConfig:
    """A `PPOConfig` from None, a `PPOConfig`, a mapping or a `ml_collections.ConfigDict`."""
    if config is None:
        return PPOConfig()
    if isinstance(config, PPOConfig):
        cfg = config
    else:
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        names = {f.name for f in dataclasses.fields(PPOConfig)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"unknown PPO config keys {sorted(unknown)}; known: {sorted(names)}")
        cfg = PPOConfig(**dict(config))
    if cfg.advantage not in ("gae", "reference"):
        raise ValueError(f"advantage must be 'gae' or 'reference', got {cfg.advantage!r}")
    if cfg.n_epochs < 1 or cfg.n_minibatches < 1:
        raise ValueError("n_epochs and n_minibatches must be >= 1")
    return cfg


@flax.struct.dataclass
class AgentState:
    """PPO learner state: policy params, optax state, number of `update` calls (int32 [])."""

    params: Any
    opt_state: Any
    step: jax.Array


def make_optimizer(config: Any = None) -> optax.GradientTransformation:
    """Adam(lr, eps=adam_eps) preceded by a global-norm clip when `max_grad_norm` > 0."""
    cfg = as_ppo_config(config)
    tx = optax.adam(cfg.lr, eps=cfg.adam_eps)
    if cfg.max_grad_norm is not None and cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx


def create_agent_state(params: Any, config: Any = None) -> AgentState:
    """Initial `AgentState` for policy `params` (jittable, vmappable over stacked params)."""
    return AgentState(
        params=params, opt_state=make_optimizer(config).init(params), step=jnp.zeros((), jnp.int32)
    )


def gae_advantages(
    r_t: jax.Array, done_t: jax.Array, v_t: jax.Array, v_T: jax.Array, gamma: float, lambda_: float
) -> tuple[jax.Array, jax.Array]:
    """Truncated GAE for one environment (Schulman et al. 2016, Eq. 16).

    A_t = sum_k (gamma lambda)^k prod(1 - done) delta_(t+k), delta_t = r_t + gamma (1 - done_t)
    v_(t+1) - v_t, with v_T the bootstrap value after the last step.

    Args: r_t, done_t, v_t: f32 [T]; v_T: f32 []. Returns (adv_t, target_t = adv_t + v_t), [T].
    """
    chex.assert_rank([r_t, done_t, v_t, v_T], [1, 1, 1, 0])
    discount_t = gamma * (1.0 - done_t.astype(jnp.float32))
    values = jnp.concatenate([v_t, v_T[None]]).astype(jnp.float32)
    adv_t = rlax.truncated_generalized_advantage_estimation(
        r_t.astype(jnp.float32), discount_t, lambda_, values
    )
    return adv_t, adv_t + v_t


def discounted_returns(
    r_t: jax.Array, done_t: jax.Array, v_T: jax.Array, gamma: float
) -> jax.Array:
    """G_t = r_t + gamma (1 - done_t) G_(t+1), G_T = v_T, for one environment: f32 [T]."""
    chex.assert_rank([r_t, done_t, v_T], [1, 1, 0])
    discount_t = gamma * (1.0 - done_t.astype(jnp.float32))
    return rlax.discounted_returns(r_t.astype(jnp.float32), discount_t, v_T.astype(jnp.float32))


def estimate_advantages(
    reward: jax.Array, done: jax.Array, value: jax.Array, last_value: jax.Array, config: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Advantages and value targets of a [T, N_envs] batch (before advantage normalisation).

    Args: reward, done, value: [T, N_envs]; last_value: [N_envs] bootstrap (0 = episode ended).
    Returns (adv, target), f32 [T, N_envs]. "reference": G normalised over the whole batch,
    (G - mean) / (std + 1e-7); adv = G_norm - value; target = G_norm.
    """
    cfg = as_ppo_config(config)
    chex.assert_rank([reward, done, value, last_value], [2, 2, 2, 1])
    if cfg.advantage == "gae":
        fn = lambda r, d, v, v_last: gae_advantages(r, d, v, v_last, cfg.gamma, cfg.gae_lambda)
        return jax.vmap(fn, in_axes=(1, 1, 1, 0), out_axes=1)(reward, done, value, last_value)
    fn = lambda r, d, v_last: discounted_returns(r, d, v_last, cfg.gamma)
    returns = jax.vmap(fn, in_axes=(1, 1, 0), out_axes=1)(reward, done, last_value)
    returns = (returns - jnp.mean(returns)) / (jnp.std(returns) + 1e-7)
    return returns - value, returns


def ppo_loss(
    log_prob_t: jax.Array,
    old_log_prob_t: jax.Array,
    adv_t: jax.Array,
    value_t: jax.Array,
    target_t: jax.Array,
    entropy_t: jax.Array,
    clip_eps: float,
    vf_coef: float,
    ent_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip loss over a flat batch (Schulman et al. 2017, Eq. 7 and 9), all inputs f32 [B].

    loss = -mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + vf_coef mean((v - target)^2)
           - ent_coef mean(entropy), rho = exp(log_prob - old_log_prob); targets and advantages
    are constants. Returns (loss, {"pg_loss", "value_loss", "entropy", "approx_kl", "clip_frac"}).
    """
    chex.assert_rank([log_prob_t, old_log_prob_t, adv_t, value_t, target_t, entropy_t], 1)
    ratio_t = jnp.exp(log_prob_t - old_log_prob_t)
    pg_loss = rlax.clipped_surrogate_pg_loss(ratio_t, adv_t, clip_eps)
    value_loss = jnp.mean(jnp.square(value_t - jax.lax.stop_gradient(target_t)))
    entropy = jnp.mean(entropy_t)
    loss = pg_loss + vf_coef * value_loss - ent_coef * entropy
    aux = {
        "pg_loss": pg_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        "approx_kl": jnp.mean(old_log_prob_t - log_prob_t),
        "clip_frac": jnp.mean((jnp.abs(ratio_t - 1.0) > clip_eps).astype(jnp.float32)),
    }
    return loss, aux


def make_ppo_update(policy_apply: Any, config: Any = None) -> Callable:
    """Builds the PPO update (REFERENCE.md Sec. 4; purejaxrl-style, jittable and vmappable).

    Args:
      policy_apply: `Policy` or its `action_log_prob(params, obs, action) -> (log_prob, entropy,
        value)` (unbatched; vmapped over the minibatch here).
      config: `PPOConfig`, mapping or ConfigDict (see `PPOConfig`).

    Returns:
      update(agent_state, trajectory, key, last_value=None) -> (agent_state, metrics), where
      `trajectory` is a `types.Transition` (or anything with obs, action, log_prob, value, reward,
      done) whose leaves are [T, N_envs, ...]; `last_value` f32 [N_envs] bootstraps after the last
      step (None -> 0, i.e. every env ends there). n_epochs passes, each over a fresh permutation
      from `key`, split into n_minibatches Adam steps. A minibatch step whose loss or gradient is
      non-finite is skipped (params and optimizer state kept). metrics: means over all steps of
      loss, pg_loss, value_loss, entropy, approx_kl, clip_frac, grad_norm; adv_mean, adv_std (raw);
      nan_skipped (int32, 1 if any step was skipped) and nan_skipped_steps (int32 count).
    """
    cfg = as_ppo_config(config)
    log_prob_fn = policy_apply.action_log_prob if isinstance(policy_apply, Policy) else policy_apply
    tx = make_optimizer(cfg)

    def loss_fn(params, batch):
        obs, action, old_log_prob, adv, target = batch
        log_prob, entropy, value = jax.vmap(log_prob_fn, in_axes=(None, 0, 0))(params, obs, action)
        return ppo_loss(
            log_prob,
            old_log_prob,
            adv,
            value,
            target,
            entropy,
            cfg.clip_eps,
            cfg.vf_coef,
            cfg.ent_coef,
        )

    def minibatch_step(carry, batch):
        params, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        grad_norm = optax.tree.norm(grads)
        # A NaN/inf anywhere in the gradient makes its global norm non-finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = dict(aux, loss=loss, grad_norm=grad_norm, skipped=~finite)
        return (params, opt_state), metrics

    def update(agent_state: AgentState, trajectory: Any, key: jax.Array, last_value=None):
        reward = jnp.asarray(trajectory.reward, jnp.float32)
        chex.assert_rank(reward, 2)
        n_steps, n_envs = reward.shape
        batch_size = n_steps * n_envs
        if batch_size % cfg.n_minibatches:
            raise ValueError(
                f"n_minibatches={cfg.n_minibatches} must divide T * N_envs = {batch_size}; "
                "change ppo.n_minibatches or the rollout length"
            )
        if last_value is None:
            last_value = jnp.zeros((n_envs,), jnp.float32)
        value = jnp.asarray(trajectory.value, jnp.float32)
        done = jnp.asarray(trajectory.done, jnp.float32)
        adv, target = estimate_advantages(reward, done, value, jnp.asarray(last_value), cfg)
        adv_mean, adv_std = jnp.mean(adv), jnp.std(adv)
        if cfg.normalize_advantages:
            adv = (adv - adv_mean) / (adv_std + 1e-8)
        flat = lambda x: jnp.reshape(x, (batch_size,) + jnp.shape(x)[2:])
        batch = jax.tree.map(
            flat, (trajectory.obs, trajectory.action, trajectory.log_prob, adv, target)
        )
        mb_size = batch_size // cfg.n_minibatches

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, batch_size)
            shuffle = lambda x: jnp.reshape(x[perm], (cfg.n_minibatches, mb_size) + x.shape[1:])
            return jax.lax.scan(minibatch_step, carry, jax.tree.map(shuffle, batch))

        carry = (agent_state.params, agent_state.opt_state)
        (params, opt_state), metrics = jax.lax.scan(
            epoch, carry, jax.random.split(key, cfg.n_epochs)
        )
        skipped = metrics.pop("skipped")
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["adv_mean"] = adv_mean
        metrics["adv_std"] = adv_std
        metrics["nan_skipped_steps"] = jnp.sum(skipped).astype(jnp.int32)
        metrics["nan_skipped"] = jnp.any(skipped).astype(jnp.int32)
        new_state = AgentState(params=params, opt_state=opt_state, step=agent_state.step + 1)
        return new_state, metrics

    return update
