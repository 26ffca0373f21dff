"""The low-dimensional GNN policy and its contextual-bandit PPO update (layer 3).

Why a bandit. Every search step prunes a fresh copy of the ORIGINAL model (REFERENCE.md section 5),
so proposals are independent: there is no state to carry and no credit to pass to later steps. The
observation is the model's graph (fixed for a search), the action a per-layer proposal, the reward
the proposal's accuracy on budget. So each update is a one-step problem: no discount, no critic
(its only input is the one fixed observation, so it could learn nothing the batch mean does not
give), advantages from a leave-one-out baseline on standardised rewards.

Policy ("mixture" head, `gnn.ActorCritic`): the GNN reads the graph and emits the mean of a
diagonal Gaussian over `decode`'s proposal ``[L + 1, P]``: a network-wide row of pattern logits
(from the pooled graph embedding) and one row per layer (from that layer's filter nodes), the
keep-all logit fixed at 0 and invalid patterns and the keep-only head without a dimension. The
learnable log-std has one row for the network-wide entries and one shared by all layer rows (so
the policy's parameters do not depend on the model's size and transfer between models). The mean's
last layers start at zero: whatever the seed, the policy's initial mean is the uniform allocation
at the target, and its initial samples are random search's.

Update (Schulman et al. 2017, Eq. 7, with a trust region that holds): epochs x minibatches of Adam
steps on the clipped surrogate ``-mean(min(rho A, clip(rho, 1 +- eps) A))`` (rlax). Every step is
measured against the policy the samples came from by its exact KL(old || new) (closed form: one
fixed observation, diagonal Gaussians) and backtracked into the trust region: scaled to
``0.9 sqrt(limit / KL)`` of itself, then halved until the KL is <= ``target_kl``; a step that
does not fit after the last halving, or that is non-finite, is rejected (and a non-finite one
logged). The limit holds on the two parts of the KL separately (MPO's decoupled KL, Abdolmaleki
et al. 2018): ``target_kl`` on the mean part, ``target_kl_std`` on the std part, so the KL of every
update is at most their sum by construction, and narrowing the noise, which in a hundred
dimensions costs nats fast, cannot use up the budget for moving the mean. The k3 estimator
``mean((rho - 1) - log rho)`` of the same KL from the samples is reported beside it.

All functions are jittable and vmappable over seeds; helpers are unbatched with rank asserts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import rlax

from sculpt_jax import agent as agent_lib
from sculpt_jax import gnn
from sculpt_jax import graph as graph_lib

_LOG_2PI = math.log(2.0 * math.pi)
SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # backtracking factors of a step that leaves the region


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussians over the active dimensions of an [L, P] proposal (unbatched).


def gaussian_log_prob(a, mean, log_std, mask):
    """sum over mask of log N(a; mean, exp(log_std)^2): a, mean, log_std f32 [L, P] -> f32 []."""
    chex.assert_rank([a, mean, log_std], 2)
    z = (a - mean) * jnp.exp(-log_std)
    return jnp.sum(jnp.where(mask, -0.5 * z * z - log_std - 0.5 * _LOG_2PI, 0.0))


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q, mask):
    """KL(p || q) of two diagonal Gaussians over the mask (closed form), f32 [].

    sum log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2.
    """
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    kl = log_std_q - log_std_p + (var_p + jnp.square(mean_p - mean_q)) / (2 * var_q) - 0.5
    return jnp.sum(jnp.where(mask, kl, 0.0))


def gaussian_kl_parts(mean_p, log_std_p, mean_q, log_std_q, mask):
    """(mean part, std part) of KL(p || q), the decoupled KL of MPO (Abdolmaleki et al. 2018):
    the mean part ``sum (m_p - m_q)^2 / (2 s_p^2)`` (std held at p's), the std part the KL between
    N(m_p, s_p) and N(m_p, s_q). Each is >= 0; f32 [] each."""
    mean_kl = gaussian_kl(mean_p, log_std_p, mean_q, log_std_p, mask)
    return mean_kl, gaussian_kl(mean_p, log_std_p, mean_p, log_std_q, mask)


def gaussian_entropy(log_std, mask):
    """Entropy of the diagonal Gaussian over the mask: sum (log s + 0.5 log(2 pi e)), f32 []."""
    return jnp.sum(jnp.where(mask, log_std + 0.5 * (_LOG_2PI + 1.0), 0.0))


class MixturePolicy(NamedTuple):
    """The "mixture" policy of one model (closures over its `GraphSpec` and action mask).

    action_mask: bool [L + 1, P] numpy (the decoder's), n_dims its count.
    init(key, obs=None) -> params.
    dist(params, obs) -> (mean f32 [L + 1, P], log_std f32 [L + 1, P]); inactive entries are 0.
    sample(params, obs, key, n) -> (actions f32 [n, L + 1, P] (0 where inactive), log_prob [n]).
    log_prob(params, obs, actions [n, L + 1, P]) -> f32 [n].
    kl(params_old, params_new, obs) -> KL(old || new) f32 [].
    kl_parts(params_old, params_new, obs) -> (mean part, std part) of it (`gaussian_kl_parts`).
    entropy(params, obs) -> f32 [].
    """

    action_mask: np.ndarray
    n_dims: int
    init: Callable
    dist: Callable
    sample: Callable
    log_prob: Callable
    kl: Callable
    kl_parts: Callable
    entropy: Callable


def make_mixture_policy(
    spec: graph_lib.GraphSpec,
    action_mask: np.ndarray,
    *,
    init_std: float = 1.0,
    init_std_layer: float | None = None,
    min_std: float = 0.05,
    antithetic: bool = True,
    hidden: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    edge_dim: int = 32,
    mlp_hidden: int = 128,
) -> MixturePolicy:
    """Builds the low-dimensional GNN policy (see the module docstring).

    Args:
      spec: the model's `GraphSpec`.
      action_mask: bool [L + 1, P], `decode.Decoder.action_mask` (the entries that matter).
      init_std / init_std_layer: initial standard deviation of the network-wide row / of the
        layer rows (None: init_std); random search samples from the same.
      min_std: floor of the standard deviation (exploration never collapses below it).
      antithetic: sample mirrored pairs ``mean +- std * eps`` (for even n). Each sample is still a
        draw from the policy, but the pair cancels the even-order terms of the reward's response
        to the noise in the advantage (Salimans et al. 2017's mirrored sampling), which in a
        hundred dimensions is most of the variance of the policy-gradient estimate.
      hidden, n_layers, n_heads, edge_dim, mlp_hidden: `gnn.ActorCritic` sizes.
    """
    init_std_layer = init_std if init_std_layer is None else init_std_layer
    if not 0 < min_std <= min(init_std, init_std_layer):
        raise ValueError(f"need 0 < min_std <= the initial stds, got {init_std}, {init_std_layer}, "
                         f"{min_std}")  # fmt: skip
    action_mask = np.asarray(action_mask, bool)
    n_l, n_p = spec.layer_graph.n_layers, spec.n_patterns
    if action_mask.shape != (n_l + 1, n_p):
        raise ValueError(f"action_mask must be [L + 1, P] = {(n_l + 1, n_p)}, got "
                         f"{action_mask.shape}")  # fmt: skip
    model = gnn.ActorCritic(
        n_patterns=n_p, n_edge_types=graph_lib.n_edge_types(spec), n_groups=n_l, head="mixture",
        hidden=hidden, n_layers=n_layers, n_heads=n_heads, edge_dim=edge_dim,
        mlp_hidden=mlp_hidden, init_log_std=(math.log(init_std), math.log(init_std_layer)),
    )  # fmt: skip
    mask = jnp.asarray(action_mask)
    node_layer = np.where(spec.action_mask, spec.node_layer, -1).astype(np.int32)
    log_min = math.log(min_std)

    def statics():
        return (jnp.asarray(spec.node_mask), jnp.asarray(spec.edge_mask),
                jnp.asarray(spec.action_mask), jnp.asarray(spec.valid), jnp.asarray(node_layer))  # fmt: skip

    def init(key, obs=None):
        obs = graph_lib.example_observation(spec) if obs is None else obs
        return model.init(key, obs, *statics())

    def dist(params, obs):
        obs = obs._replace(senders=jnp.asarray(spec.senders), receivers=jnp.asarray(spec.receivers))
        out = model.apply(params, obs, *statics())
        log_std = jnp.maximum(out["log_std"], log_min)
        log_std = jnp.concatenate([log_std[:1], jnp.broadcast_to(log_std[1:], (n_l, n_p))])
        return jnp.where(mask, out["mean"], 0.0), jnp.where(mask, log_std, 0.0)

    def sample(params, obs, key, n: int):
        mean, log_std = dist(params, obs)
        if antithetic and n % 2 == 0:  # mirrored pairs: +-eps (each sample still ~ the policy)
            eps = jax.random.normal(key, (n // 2, n_l + 1, n_p), jnp.float32)
            eps = jnp.concatenate([eps, -eps])
        else:
            eps = jax.random.normal(key, (n, n_l + 1, n_p), jnp.float32)
        actions = jnp.where(mask, mean + jnp.exp(log_std) * eps, 0.0)
        lp = jax.vmap(lambda a: gaussian_log_prob(a, mean, log_std, mask))(actions)
        return actions, lp

    def log_prob(params, obs, actions):
        mean, log_std = dist(params, obs)
        return jax.vmap(lambda a: gaussian_log_prob(a, mean, log_std, mask))(actions)

    def kl(params_old, params_new, obs):
        m_p, s_p = dist(params_old, obs)
        m_q, s_q = dist(params_new, obs)
        return gaussian_kl(m_p, s_p, m_q, s_q, mask)

    def kl_parts(params_old, params_new, obs):
        m_p, s_p = dist(params_old, obs)
        m_q, s_q = dist(params_new, obs)
        return gaussian_kl_parts(m_p, s_p, m_q, s_q, mask)

    def entropy(params, obs):
        return gaussian_entropy(dist(params, obs)[1], mask)

    return MixturePolicy(action_mask, int(action_mask.sum()), init, dist, sample, log_prob, kl,
                         kl_parts, entropy)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The bandit update.


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    """Settings of `make_bandit_update` (see the module docstring).

    lr / adam_eps / max_grad_norm: Adam and a global-norm clip (<= 0: none). n_epochs x
    n_minibatches Adam steps per update over the N samples (n_minibatches must divide N).
    clip_eps: PPO ratio clip. target_kl / target_kl_std: the trust region per update, on the mean
    and the std parts of the exact KL(old || new) (`gaussian_kl_parts`; decoupled as in MPO, so
    that shrinking the exploration noise cannot use up the budget for moving the mean).
    ent_coef: entropy bonus. baseline: "loo" (leave-one-out mean), "mean" or "rank" (`advantages`). fit_lr / fit_steps:
    Adam on the GNN's params when projecting the improved distribution onto the policy.
    """

    lr: float = 0.1
    adam_eps: float = 1e-5
    max_grad_norm: float = 1.0
    n_epochs: int = 8
    n_minibatches: int = 1
    clip_eps: float = 0.2
    target_kl: float = 0.5
    target_kl_std: float = 0.05
    ent_coef: float = 0.0
    baseline: str = "loo"
    fit_lr: float = 0.01
    fit_steps: int = 64

    def __post_init__(self):
        if self.baseline not in ("loo", "mean", "rank"):
            raise ValueError(f"baseline must be 'loo', 'mean' or 'rank', got {self.baseline!r}")
        if not (self.target_kl > 0 and self.target_kl_std > 0):
            raise ValueError(f"target_kl and target_kl_std must be > 0, got {self.target_kl}, "
                             f"{self.target_kl_std}")  # fmt: skip
        if self.lr <= 0 or self.n_epochs < 1 or self.n_minibatches < 1 or self.clip_eps <= 0:
            raise ValueError("need lr > 0, n_epochs >= 1, n_minibatches >= 1 and clip_eps > 0")


def as_bandit_config(config: Any = None) -> BanditConfig:
    """A `BanditConfig` from None, itself, a mapping or a ConfigDict (unknown keys refused)."""
    if config is None or isinstance(config, BanditConfig):
        return config or BanditConfig()
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    names = {f.name for f in dataclasses.fields(BanditConfig)}
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"unknown bandit config keys {sorted(unknown)}; known: {sorted(names)}")
    return BanditConfig(**config)


def make_optimizer(config: Any = None) -> optax.GradientTransformation:
    cfg = as_bandit_config(config)
    tx = optax.adam(cfg.lr, eps=cfg.adam_eps)
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx


def create_agent_state(params: Any, config: Any = None) -> agent_lib.AgentState:
    """Initial learner state (params, Adam state, step 0); jittable, vmappable over seeds."""
    return agent_lib.AgentState(params=params, opt_state=make_optimizer(config).init(params),
                                step=jnp.zeros((), jnp.int32))  # fmt: skip


def advantages(reward: jax.Array, valid: jax.Array, baseline: str = "loo") -> jax.Array:
    """Standardised advantages f32 [N] of N rewards, 0 where `valid` is False.

    "mean": (r - mean) / std over the valid samples; "loo": the leave-one-out baseline
    ``b_i = mean_(j != i) r_j``, i.e. the same times n / (n - 1); "rank": centred ranks scaled to
    unit std (the fitness shaping of natural evolution strategies, Wierstra et al. 2014: only
    the order of the rewards counts, so one lucky score cannot dominate an update).
    """
    chex.assert_rank([reward, valid], 1)
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    r = jnp.where(valid, reward, 0.0)
    mean = jnp.sum(r * w) / n
    std = jnp.sqrt(jnp.sum(jnp.square(r - mean) * w) / n)
    if baseline == "rank":
        big = jnp.where(valid, r, jnp.inf)  # left-out samples rank last and are zeroed below
        ranks = jnp.argsort(jnp.argsort(big)).astype(jnp.float32)
        centred = jnp.where(valid, ranks - (n - 1) / 2, 0.0)
        scale = jnp.sqrt(jnp.sum(jnp.square(centred) * w) / n)
        return jnp.where(valid, centred / (scale + 1e-8), 0.0)
    adv = (r - mean) / (std + 1e-8)
    if baseline == "loo":
        adv = adv * n / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(valid, adv, 0.0)


def _expand_log_std(log_std2, n_rows):
    """[2, P] (network-wide row, layer rows) -> [n_rows, P]."""
    return jnp.concatenate([log_std2[:1], jnp.broadcast_to(log_std2[1:], (n_rows - 1,
                                                                          log_std2.shape[1]))])


def make_bandit_update(policy: MixturePolicy, config: Any = None) -> Callable:
    """Builds ``update(agent_state, obs, actions [N, L + 1, P], log_prob [N], reward [N], key) ->
    (agent_state, metrics)`` (jittable, vmappable; see the module docstring).

    Two steps (the improve-then-project scheme of MPO / V-MPO, Abdolmaleki et al. 2018, Song et
    al. 2020, with PPO's clipped surrogate as the improvement):

    1. improve: n_epochs x n_minibatches Adam steps of the clipped surrogate on the Gaussian's own
       parameters (mean [L + 1, P], log-std [2, P]), starting from the policy's, each step held in
       the trust region part by part (the mean part of KL against the sampling policy is exactly
       quadratic in the mean step, which is scaled to at most target_kl; the log-std step is
       backtracked until the std part is <= target_kl_std);
    2. project: fit_steps Adam steps of the GNN's params on KL(improved || policy), then a
       backtracking line search from the old params towards the fitted ones that keeps the exact
       KL(old || new) parts within the limits.

    Why not PPO on the GNN's params directly: the per-layer means are a linear read-out of GNN
    embeddings that are strongly correlated across similar layers, so a step in parameter space
    spends its KL budget on moving layers together; the improvement in distribution space does
    not, and the fit then finds the closest policy the GNN can express (measured in
    tests/test_bandit.py's known-optimum problem: 25 updates close ~75% of the gap this way and
    ~25% with PPO on the GNN's params).

    Rewards that are not finite (a candidate that could not be scored) are left out. metrics: kl
    (exact KL(old || new)), kl_mean / kl_std (its parts, within the limits), kl_k3 (the sample
    estimator), kl_fit (KL(improved || new), the projection's error), clip_frac, pg_loss,
    entropy, std_mean, accepted_steps / steps, step_scale (mean backtracking scale of the
    improvement, 0 = rejected), line_search (the projection's scale), nan_skipped (1 if a
    non-finite step was skipped), reward_mean / reward_std.
    """
    cfg = as_bandit_config(config)
    tx = make_optimizer(cfg)
    fit_tx = optax.adam(cfg.fit_lr, eps=cfg.adam_eps)
    n_steps = cfg.n_epochs * cfg.n_minibatches
    mask = jnp.asarray(policy.action_mask)
    n_rows = mask.shape[0]
    limits = jnp.asarray([cfg.target_kl, cfg.target_kl_std], jnp.float32)

    def free_dist(phi):
        return jnp.where(mask, phi["mean"], 0.0), jnp.where(mask, _expand_log_std(phi["log_std"],
                                                                                  n_rows), 0.0)

    def free_log_prob(phi, actions):
        mean, log_std = free_dist(phi)
        return jax.vmap(lambda a: gaussian_log_prob(a, mean, log_std, mask))(actions)

    def loss_fn(phi, actions, old_lp, adv, w):
        ratio = jnp.exp(free_log_prob(phi, actions) - old_lp)
        # rlax averages over all N; left-out samples have adv 0, so rescale to the valid ones.
        pg = rlax.clipped_surrogate_pg_loss(ratio, adv, cfg.clip_eps)
        pg = pg * w.shape[0] / jnp.maximum(jnp.sum(w), 1.0)
        ent = gaussian_entropy(free_dist(phi)[1], mask)
        frac = jnp.sum((jnp.abs(ratio - 1) > cfg.clip_eps) * w) / jnp.maximum(jnp.sum(w), 1.0)
        return pg - cfg.ent_coef * ent, {"pg_loss": pg, "clip_frac": frac}

    def within(parts):
        return jnp.all(parts <= limits, axis=-1)

    def improve(old_dist, actions, log_prob, adv, valid, key):
        m0, s0 = old_dist
        rows = jnp.maximum(jnp.sum(mask[1:], 0), 1)  # the layer rows share one log-std per pattern
        phi0 = {"mean": m0, "log_std": jnp.stack([s0[0], jnp.sum(s0[1:], 0) / rows])}
        kl_parts = lambda phi: jnp.stack(gaussian_kl_parts(m0, s0, *free_dist(phi), mask))
        n = adv.shape[0]

        def step(carry, idx):
            phi, opt_state, nan = carry
            batch = (actions[idx], log_prob[idx], adv[idx], valid[idx].astype(jnp.float32))
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(phi, *batch)
            updates, new_opt = tx.update(grads, opt_state, phi)
            # Into the trust region, each part on its own: the mean part of the KL is exactly
            # quadratic in the mean step (scale it to the limit), the std part is backtracked.
            moved = lambda a, b: {"mean": phi["mean"] + a * updates["mean"],
                                  "log_std": phi["log_std"] + b * updates["log_std"]}  # fmt: skip
            km = kl_parts(moved(1.0, 0.0))[0]
            a_mean = jnp.minimum(1.0, 0.999 * jnp.sqrt(cfg.target_kl / jnp.maximum(km, 1e-12)))
            a_mean = jnp.where(kl_parts(moved(a_mean, 0.0))[0] <= cfg.target_kl, a_mean, 0.0)
            ks = kl_parts(moved(0.0, 1.0))[1]
            first = jnp.minimum(1.0, 0.9 * jnp.sqrt(cfg.target_kl_std / jnp.maximum(ks, 1e-12)))
            scales = jnp.concatenate([first * jnp.asarray(SCALES, jnp.float32), jnp.zeros(1)])
            fits = jax.vmap(lambda b: kl_parts(moved(a_mean, b))[1])(scales) <= cfg.target_kl_std
            a_std = scales[jnp.argmax(fits)]  # scale 0 always fits
            finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            ok = finite & jnp.isfinite(km) & jnp.isfinite(ks)
            keep = lambda a, b: jnp.where(ok, a, b)
            phi = jax.tree.map(keep, moved(a_mean, a_std), phi)
            opt_state = jax.tree.map(keep, new_opt, opt_state)
            aux = dict(aux, accepted=ok & (a_mean > 0), step_scale=jnp.where(ok, a_mean, 0.0))
            return (phi, opt_state, nan | ~finite), aux

        keys = jax.random.split(key, cfg.n_epochs)
        idx = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)
        idx = idx.reshape(n_steps, n // cfg.n_minibatches)
        (phi, _, nan), aux = jax.lax.scan(step, (phi0, tx.init(phi0), jnp.bool_(False)), idx)
        return free_dist(phi), nan, aux

    def project(state, obs, target):
        old = state.params
        fit_loss = lambda p: gaussian_kl(*target, *policy.dist(p, obs), mask)

        def fit_step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(fit_loss)(params)
            updates, opt_state_new = fit_tx.update(grads, opt_state, params)
            ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                               optax.apply_updates(params, updates), params)  # fmt: skip
            return (new, opt_state_new), loss

        (fitted, _), _ = jax.lax.scan(fit_step, (old, fit_tx.init(old)), None, cfg.fit_steps)
        blend = lambda a: jax.tree.map(lambda o, f: o + a * (f - o), old, fitted)
        scales = jnp.asarray((1.0,) + SCALES[1:] + (0.0,), jnp.float32)
        parts = jax.vmap(lambda a: jnp.stack(policy.kl_parts(old, blend(a), obs)))(scales)
        ok = within(parts) & jnp.all(jnp.isfinite(parts), axis=-1)
        alpha = scales[jnp.argmax(ok)]  # 0.0 always fits: the old policy
        return blend(alpha), alpha

    def update(state: agent_lib.AgentState, obs, actions, log_prob, reward, key):
        chex.assert_rank([log_prob, reward], 1)
        n = reward.shape[0]
        if n % cfg.n_minibatches:
            raise ValueError(f"n_minibatches={cfg.n_minibatches} must divide the {n} samples")
        valid = jnp.isfinite(reward) & jnp.all(jnp.isfinite(actions), axis=(1, 2))
        adv = advantages(reward, valid, cfg.baseline)
        old = state.params
        old_dist = policy.dist(old, obs)
        target, nan, aux = improve(old_dist, jnp.where(valid[:, None, None], actions, 0.0),
                                   log_prob, adv, valid, key)  # fmt: skip
        params, alpha = project(state, obs, target)
        learn = jnp.sum(valid) >= 2  # an advantage needs two scored samples
        params = jax.tree.map(lambda a, b: jnp.where(learn, a, b), params, old)
        nan = nan | jnp.any(jnp.isfinite(reward) & ~valid)
        new_lp = policy.log_prob(params, obs, jnp.where(valid[:, None, None], actions, 0.0))
        log_ratio = jnp.where(valid, new_lp - log_prob, 0.0)
        w = valid.astype(jnp.float32)
        k3 = jnp.sum((jnp.exp(log_ratio) - 1 - log_ratio) * w) / jnp.maximum(jnp.sum(w), 1.0)
        _, log_std = policy.dist(params, obs)
        r = jnp.where(valid, reward, 0.0)
        r_mean = jnp.sum(r * w) / jnp.maximum(jnp.sum(w), 1.0)
        kl_mean, kl_std = policy.kl_parts(old, params, obs)
        metrics = {
            "kl": policy.kl(old, params, obs),
            "kl_mean": kl_mean,
            "kl_std": kl_std,
            "kl_k3": k3,
            "kl_fit": gaussian_kl(*target, *policy.dist(params, obs), mask),
            "clip_frac": jnp.mean(aux["clip_frac"]),
            "pg_loss": jnp.mean(aux["pg_loss"]),
            "entropy": policy.entropy(params, obs),
            "std_mean": jnp.sum(jnp.exp(log_std) * mask) / max(policy.n_dims, 1),
            "accepted_steps": jnp.sum(aux["accepted"]).astype(jnp.int32),
            "steps": jnp.int32(n_steps),
            "step_scale": jnp.mean(aux["step_scale"]),
            "line_search": alpha,
            "nan_skipped": nan.astype(jnp.int32),
            "reward_mean": r_mean,
            "reward_std": jnp.sqrt(jnp.sum(jnp.square(r - r_mean) * w) / jnp.maximum(jnp.sum(w), 1)),
        }
        new = agent_lib.AgentState(params=params, opt_state=state.opt_state, step=state.step + 1)
        return new, metrics

    return update
