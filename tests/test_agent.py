"""Tests of sculpt_jax.agent: sampling, exact log-prob recomputation, masking and the PPO update."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax import agent as A
from sculpt_jax import gnn
from sculpt_jax import graph as G
from sculpt_jax.types import Transition

_path = pathlib.Path(__file__).with_name("test_graph.py")
_mod_spec = importlib.util.spec_from_file_location("_sculpt_graph_fixtures_agent", _path)
fixtures = importlib.util.module_from_spec(_mod_spec)
_mod_spec.loader.exec_module(fixtures)

P = 6
T, N_ENVS = 3, 2
SIZES = dict(hidden=16, n_layers=1, n_heads=2, edge_dim=8, mlp_hidden=16)


def fast_init(init_fn, *args, seed=0):
    """Params shaped like `init_fn(*args)`, filled on the host (skips compiling Flax inits)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        std = 1.0 / np.sqrt(s.shape[0]) if name == "kernel" else 1.0
        return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init_fn, *args))


@pytest.fixture(scope="module")
def env():
    """Tiny graph spec with a hand-set importance order, its observation and the order."""
    spec = G.build_graph_spec(fixtures.tiny_layer_graph())
    params = fixtures.tiny_params()
    k = np.zeros((3, 3, 3, 4), np.float32)
    k[0, 0, 0] = [3.0, 1.0, 4.0, 2.0]  # conv0 weakest-first: filters 1, 3, 0, 2
    params["params"]["conv0"]["kernel"] = jnp.asarray(k)
    obs = jax.jit(G.make_observation, static_argnums=0)(spec, params, G.initial_pattern_ids(spec))
    order = np.asarray(G.importance_order(spec, params))
    return spec, obs, order


_HEAD_RUNS = {}


def _run_head(env, head):
    """Samples 64 actions and recomputes their log-probs (one compile per head, cached)."""
    if head not in _HEAD_RUNS:
        _HEAD_RUNS[head] = _sample_and_recompute(env, head)
    return _HEAD_RUNS[head]


def _sample_and_recompute(env, head):
    spec, obs, order = env
    policy = A.make_policy(spec, head, order=order, **SIZES)
    params = fast_init(policy.init, jax.random.PRNGKey(0))

    @jax.jit
    def run(params, keys):
        def one(key):
            action, log_prob, value, ids = policy.sample_action(params, obs, key)
            lp2, entropy, value2 = policy.action_log_prob(params, obs, action)
            return action, log_prob, value, ids, lp2, entropy, value2

        out = policy.apply(params, obs)
        return jax.vmap(one)(keys), out

    results = run(params, jax.random.split(jax.random.PRNGKey(1), 64))
    return spec, order, results, policy, run


@pytest.mark.parametrize("head", gnn.LEGACY_HEADS)
def test_sampled_log_prob_is_recomputed_exactly(env, head):
    spec, order, (samples, out), _, _ = _run_head(env, head)
    action, log_prob, value, ids, lp2, entropy, value2 = samples
    np.testing.assert_allclose(lp2, log_prob, atol=1e-5, rtol=0)
    np.testing.assert_allclose(value2, value, atol=1e-6)
    ids = np.asarray(ids)
    np.testing.assert_array_equal(ids, np.asarray(action["ids"]))
    # Non-action nodes (feature maps, padding) get -1; the dense head only 0 (remove) or 5 (keep).
    assert (ids[:, ~spec.action_mask] == -1).all()
    assert np.isin(ids[:, spec.layer_nodes[2]], [0, 5]).all()
    assert ((ids[:, spec.action_mask] >= 0) & (ids[:, spec.action_mask] < P)).all()
    if head == "paper":
        assert action["sample"].shape == (64, P)
        np.testing.assert_allclose(entropy, A.gaussian_entropy(P, 0.2), rtol=1e-6)
        mean = np.asarray(out["mean"])
        z = (np.asarray(action["sample"]) - mean) / 0.2
        want = np.sum(-0.5 * z**2 - np.log(0.2) - 0.5 * np.log(2 * np.pi), axis=1)
        np.testing.assert_allclose(log_prob, want, rtol=1e-5, atol=1e-5)
    if head in ("paper", "per_group"):
        # Importance placement: along conv0's weakest-first order the ids never decrease.
        layer0 = ids[:, order[:4]]
        assert (np.diff(layer0, axis=1) >= 0).all()
        np.testing.assert_array_equal(order[:4], spec.layer_nodes[0][[1, 3, 0, 2]])


@pytest.mark.parametrize("head", ["per_group", "per_filter"])
def test_padding_and_invalid_patterns_get_zero_mass(env, head):
    spec, _, (samples, out), _, _ = _run_head(env, head)
    probs = np.asarray(A.categorical_probs(out["logits"], jnp.asarray(spec.action_mask)))
    assert (probs[~spec.action_mask] == 0.0).all()  # padding + feature-map rows: no mass
    assert (probs[~spec.valid] == 0.0).all()  # ids 1..4 on the dense (1x1-like) head: no mass
    assert (probs[spec.valid] > 0.0).all()
    np.testing.assert_allclose(probs[spec.action_mask].sum(1), 1.0, rtol=1e-6)
    # The log-prob of a sample is the sum over action nodes of log p(id).
    log_probs = np.log(np.where(probs > 0, probs, 1.0))
    ids = np.asarray(samples[3])[0]
    nodes = np.flatnonzero(spec.action_mask)
    np.testing.assert_allclose(
        samples[1][0], log_probs[nodes, ids[nodes]].sum(), rtol=1e-5, atol=1e-5
    )
    if head == "per_group":
        # Filters of one layer share one distribution, so placement keeps the log-prob exact.
        g = probs[spec.layer_nodes[0]]
        np.testing.assert_array_equal(g, np.broadcast_to(g[0], g.shape))


# ----------------------------------------------------------------------------------------------
# PPO on a hand-made trajectory with a stub policy (golden numbers from numpy).


def stub_log_prob(params, obs, action):
    """A 2-feature logistic policy: log_prob of a binary action, constant entropy, linear value."""
    logit = params["w"] @ obs
    log_prob = logit * action - jnp.logaddexp(0.0, logit)
    return log_prob, params["e"] * jnp.ones(()), params["v"] @ obs


STUB_PARAMS = {
    "w": jnp.array([0.3, -0.2]),
    "v": jnp.array([0.5, 0.1]),
    "e": jnp.array(0.7),
}
OBS = np.array(
    [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.5]], [[0.5, -1.0], [-1.0, 2.0]]], np.float32
)  # [T, N_envs, 2]
ACTION = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
OLD_LOG_PROB = np.array([[-0.5, -0.9], [-0.6, -0.4], [-0.8, -0.3]], np.float32)
OLD_VALUE = np.array([[0.2, -0.1], [0.4, 0.0], [0.1, 0.3]], np.float32)
REWARD = np.array([[1.0, -1.0], [0.5, 2.0], [-0.5, 1.0]], np.float32)
DONE = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
LAST_VALUE = np.array([0.3, -0.2], np.float32)


def stub_trajectory(reward=REWARD):
    return Transition(
        obs=jnp.asarray(OBS),
        action=jnp.asarray(ACTION),
        log_prob=jnp.asarray(OLD_LOG_PROB),
        value=jnp.asarray(OLD_VALUE),
        reward=jnp.asarray(reward),
        done=jnp.asarray(DONE),
        info={},
    )


def numpy_ppo_loss(cfg):
    gamma, lam = cfg.gamma, cfg.gae_lambda
    adv = np.zeros((T, N_ENVS))
    ret = np.zeros((T, N_ENVS))
    for e in range(N_ENVS):
        a, g = 0.0, LAST_VALUE[e]
        for t in reversed(range(T)):
            nv = OLD_VALUE[t + 1, e] if t < T - 1 else LAST_VALUE[e]
            cont = 1.0 - DONE[t, e]
            delta = REWARD[t, e] + gamma * cont * nv - OLD_VALUE[t, e]
            a = delta + gamma * lam * cont * a
            adv[t, e] = a
            g = REWARD[t, e] + gamma * cont * g
            ret[t, e] = g
    if cfg.advantage == "gae":
        target = adv + OLD_VALUE
    else:
        target = (ret - ret.mean()) / (ret.std() + 1e-7)
        adv = target - OLD_VALUE
    if cfg.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    w, v, e = (np.asarray(STUB_PARAMS[k], np.float64) for k in ("w", "v", "e"))
    logit = OBS @ w
    log_prob = logit * ACTION - np.logaddexp(0.0, logit)
    ratio = np.exp(log_prob - OLD_LOG_PROB)
    clipped = np.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg = -np.mean(np.minimum(ratio * adv, clipped * adv))
    vl = np.mean((OBS @ v - target) ** 2)
    loss = pg + cfg.vf_coef * vl - cfg.ent_coef * e
    return loss, pg, vl


@pytest.mark.parametrize(
    "cfg",
    [
        A.PPOConfig(n_epochs=1, n_minibatches=1, ent_coef=0.01, clip_eps=0.1),
        A.PPOConfig(n_epochs=1, n_minibatches=1, advantage="reference", normalize_advantages=False),
    ],
    ids=["gae", "reference"],
)
def test_ppo_loss_golden_vs_numpy(cfg):
    update = jax.jit(A.make_ppo_update(stub_log_prob, cfg))
    state = A.create_agent_state(STUB_PARAMS, cfg)
    new_state, metrics = update(state, stub_trajectory(), jax.random.PRNGKey(0), LAST_VALUE)
    loss, pg, vl = numpy_ppo_loss(cfg)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["value_loss"], vl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], 0.7, rtol=1e-6)
    assert int(metrics["nan_skipped"]) == 0 and int(new_state.step) == 1
    assert not np.allclose(new_state.params["w"], STUB_PARAMS["w"])


def test_estimate_advantages_is_per_env_gae():
    adv, target = A.estimate_advantages(
        jnp.asarray(REWARD), jnp.asarray(DONE), jnp.asarray(OLD_VALUE), jnp.asarray(LAST_VALUE)
    )
    for e in range(N_ENVS):
        a, tgt = A.gae_advantages(
            jnp.asarray(REWARD[:, e]),
            jnp.asarray(DONE[:, e]),
            jnp.asarray(OLD_VALUE[:, e]),
            jnp.asarray(LAST_VALUE[e]),
            0.9,
            0.95,
        )
        np.testing.assert_allclose(adv[:, e], a, rtol=1e-6)
        np.testing.assert_allclose(target[:, e], tgt, rtol=1e-6)
    # Hand value, env 0, last step: delta = -0.5 + 0.9 * 0.3 - 0.1 = -0.33.
    np.testing.assert_allclose(adv[2, 0], -0.33, rtol=1e-5)
    with pytest.raises(AssertionError):  # chex rank assert
        A.gae_advantages(jnp.zeros((3, 2)), jnp.zeros(3), jnp.zeros(3), jnp.zeros(()), 0.9, 0.9)


def test_nan_guard_skips_update():
    cfg = A.PPOConfig(n_epochs=2, n_minibatches=3)
    update = jax.jit(A.make_ppo_update(stub_log_prob, cfg))
    state = A.create_agent_state(STUB_PARAMS, cfg)
    bad = REWARD.copy()
    bad[1, 0] = np.nan
    new_state, metrics = update(state, stub_trajectory(bad), jax.random.PRNGKey(0))
    assert int(metrics["nan_skipped"]) == 1
    assert int(metrics["nan_skipped_steps"]) == 6
    for k in STUB_PARAMS:
        np.testing.assert_array_equal(new_state.params[k], STUB_PARAMS[k])
    leaves = zip(
        jax.tree.leaves(new_state.opt_state), jax.tree.leaves(state.opt_state), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 1
    with pytest.raises(ValueError, match="n_minibatches"):
        A.make_ppo_update(stub_log_prob, A.PPOConfig(n_minibatches=4))(
            state, stub_trajectory(), jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="advantage"):
        A.as_ppo_config({"advantage": "mc"})


# ----------------------------------------------------------------------------------------------
# PPO with the GNN policy: vmap over seeds, loss decrease, gradients into the edge embedding.


@pytest.fixture(scope="module")
def gnn_ppo(env):
    """Two seeds' per_group policies, their agent states and [T, N_envs] trajectories."""
    spec, obs, _ = env
    _, _, _, policy, run = _run_head(env, "per_group")  # reuses the compiled sampler
    # adam_eps 1e-4: near-zero gradients (e.g. of attention-logit terms a softmax almost ignores)
    # are rounding noise that Adam with eps 1e-8 would blow up to full lr-sized steps, which
    # would make batched and unbatched runs differ by more than rounding.
    cfg = A.PPOConfig(n_epochs=2, n_minibatches=2, adam_eps=1e-4)
    states, trajs = [], []
    for seed in range(2):
        params = fast_init(policy.init, jax.random.PRNGKey(0), seed=seed)
        (action, log_prob, value, ids, *_), _ = run(
            params, jax.random.split(jax.random.key(seed), 64)
        )
        action, log_prob, value, ids = (
            jax.tree.map(lambda x: x[: T * N_ENVS], y) for y in (action, log_prob, value, ids)
        )
        # Reward: fraction of conv0 filters given pattern 0 (made up, but deterministic).
        reward = jnp.mean((ids[:, spec.layer_nodes[0]] == 0).astype(jnp.float32), axis=1)
        obs_b = jax.tree.map(lambda x: jnp.broadcast_to(x, (T * N_ENVS,) + x.shape), obs)
        traj = Transition(obs_b, action, log_prob, value, reward, jnp.zeros_like(reward), {})
        trajs.append(jax.tree.map(lambda x: x.reshape((T, N_ENVS) + x.shape[1:]), traj))
        states.append(A.create_agent_state(params, cfg))
    stack = lambda *xs: jnp.stack(xs)
    update = A.make_ppo_update(policy, cfg)
    return jax.tree.map(stack, *states), jax.tree.map(stack, *trajs), update, jax.jit(update)


def test_update_vmapped_over_seeds_matches_per_seed_calls(gnn_ppo):
    states, trajs, update, jupdate = gnn_ppo
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    states_v, metrics_v = jax.jit(jax.vmap(update))(states, trajs, keys)
    assert not np.allclose(metrics_v["loss"][0], metrics_v["loss"][1])  # seeds differ
    for i in range(2):
        pick = lambda x, i=i: x[i]
        state_i, metrics_i = jupdate(jax.tree.map(pick, states), jax.tree.map(pick, trajs), keys[i])
        np.testing.assert_allclose(metrics_v["loss"][i], metrics_i["loss"], rtol=1e-4, atol=1e-5)
        # Batched and unbatched matmuls round differently; far below one Adam step (lr 1e-3).
        for a, b in zip(
            jax.tree.leaves(jax.tree.map(pick, states_v.params)),
            jax.tree.leaves(state_i.params),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_update_decreases_loss_and_trains_edge_embedding(gnn_ppo):
    states, trajs, _, jupdate = gnn_ppo
    state = jax.tree.map(lambda x: x[0], states)
    traj = jax.tree.map(lambda x: x[0], trajs)
    table0 = np.asarray(state.params["params"]["edge_embed"]["embedding"])
    losses = []
    for i in range(8):
        state, metrics = jupdate(state, traj, jax.random.PRNGKey(i))
        assert int(metrics["nan_skipped"]) == 0
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    assert int(state.step) == 8
    table = np.asarray(state.params["params"]["edge_embed"]["embedding"])
    spec = G.build_graph_spec(fixtures.tiny_layer_graph())
    used = np.unique(np.asarray(traj.obs.edges["type"])[0, 0, : spec.n_real_edges])
    assert np.all(np.abs(table[used] - table0[used]).sum(1) > 0)  # trained by the PPO loss
