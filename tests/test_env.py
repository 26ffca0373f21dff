"""The pruning environment: reward rule, evaluation modes, gating, masks, no retrace."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax import env as env_lib
from sculpt_jax import flops, graph


def _env(tiny_setup, calib=False, **cfg):
    t = tiny_setup
    config = env_lib.EnvConfig(**{"target": 0.3, "band": 0.1, **cfg})
    return env_lib.make_env(t["model"].apply, t["variables"], t["spec"], t["images"], t["labels"],
                            library=t["library"], config=config,
                            calib_images=t["calib"] if calib else None)  # fmt: skip


def test_band_reward_table():
    cfg = env_lib.EnvConfig(target=0.5, band=0.05, max_episode_steps=3)
    red = jnp.array([0.5, 0.56, 0.44, 0.30, 0.30, 0.52])
    acc = jnp.array([0.8, 0.8, 0.9, 0.7, 0.7, 0.6])
    t = jnp.array([0, 0, 1, 0, 2, 2])
    r, done, band = env_lib.band_reward(red, acc, t, cfg)
    # in band -> 100*acc, done; out of band -> acc-1, not done; out of band at step 3 -> -100, done
    np.testing.assert_allclose(r, [80.0, -0.2, -0.1, -0.3, -100.0, 60.0], rtol=1e-6)
    np.testing.assert_array_equal(done, [True, False, False, False, True, True])
    np.testing.assert_array_equal(band, [True, False, False, False, False, True])
    gated = env_lib.EnvConfig(target=0.5, band=0.05, reward="gated")
    r, done, _ = env_lib.band_reward(red[:4], jnp.array([0.8, jnp.nan, jnp.nan, jnp.nan]),
                                     t[:4], gated)  # fmt: skip
    np.testing.assert_allclose(r, [80.0, -1.06, -1.06, -1.2], rtol=1e-5)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_target_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="target FLOPs reduction must be in"):
        env_lib.EnvConfig(target=bad)


def test_model_with_nothing_prunable_is_rejected():
    spec = types.SimpleNamespace(layer_graph=types.SimpleNamespace(n_layers=0))
    with pytest.raises(ValueError, match="no prunable layers"):
        env_lib.make_env(lambda v, x, train=False: x, {"params": {}}, spec, np.zeros((2, 1)),
                         np.zeros((2,)))  # fmt: skip


def test_keep_all_candidate_scores_the_dense_model(tiny_setup):
    t = tiny_setup
    e = _env(tiny_setup)
    ids = jnp.asarray(graph.initial_pattern_ids(t["spec"]))[None]
    info = jax.jit(e.evaluate)(e.consts, ids)
    logits = t["model"].apply(t["variables"], t["images"])
    dense_acc = float(np.mean(np.argmax(logits, -1) == t["labels"]))
    assert float(info["reduction"][0]) == pytest.approx(0.0, abs=1e-7)
    assert float(info["accuracy"][0]) == pytest.approx(dense_acc, abs=1e-6)


def test_map_and_vmap_modes_agree_and_gating_skips_forward(tiny_setup):
    t = tiny_setup
    spec = t["spec"]
    rng = np.random.default_rng(1)
    ids = np.where(spec.action_mask[None], rng.integers(0, 6, size=(3, spec.n_nodes)), -1)
    ids = np.where(spec.valid[np.arange(spec.n_nodes), np.clip(ids, 0, 5)], ids, 5)
    ids = np.where(spec.action_mask[None], ids, -1).astype(np.int32)
    e_map = _env(tiny_setup, eval_mode="map")
    e_vmap = _env(tiny_setup, eval_mode="vmap")
    a = jax.jit(e_map.evaluate)(e_map.consts, ids)
    b = jax.jit(e_vmap.evaluate)(e_vmap.consts, ids)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)
    np.testing.assert_allclose(a["reduction"], b["reduction"], atol=1e-6)
    gate = jnp.array([True, False, True])
    g = jax.jit(e_map.evaluate)(e_map.consts, ids, gate)
    assert np.isnan(g["accuracy"][1]) and not np.asarray(g["evaluated"])[1]
    np.testing.assert_allclose(
        np.asarray(g["accuracy"])[[0, 2]], np.asarray(a["accuracy"])[[0, 2]], atol=1e-6
    )
    # The reduction is the exact count of the candidate's masks.
    for k in range(3):
        exact = flops.count_exact(t["graph"], e_map.masks_of(jnp.asarray(ids[k])))
        assert float(a["reduction"][k]) == pytest.approx(exact["flops_reduction"], abs=1e-5)


def test_bn_momentum_probe_and_recalibration(tiny_setup):
    t = tiny_setup
    m = env_lib.probe_bn_momentum(t["model"].apply, t["variables"], jnp.asarray(t["calib"][0]))
    assert all(abs(v - 0.9) < 1e-5 for v in jax.tree.leaves(m))
    recal = env_lib.make_bn_recalibrate(t["model"].apply, t["variables"], t["calib"])
    stats = recal(t["variables"]["params"], jnp.asarray(t["calib"][:1]))
    # One batch: the recalibrated stats are that batch's statistics, e.g. the stem BN mean.
    _, upd = t["model"].apply(
        dict(t["variables"], batch_stats=jax.tree.map(jnp.zeros_like, t["variables"]["batch_stats"])),
        jnp.asarray(t["calib"][0]), train=True, mutable=["batch_stats"])  # fmt: skip
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(upd["batch_stats"]), strict=True):
        np.testing.assert_allclose(a, np.asarray(b) / 0.1, rtol=1e-4, atol=1e-5)


def test_step_does_not_retrace_and_resets_finished_episodes(tiny_setup):
    t = tiny_setup
    e = _env(tiny_setup, max_episode_steps=2)
    traces = []

    def step(consts, states, ids):
        traces.append(1)
        return e.step(consts, states, ids)

    step_j = jax.jit(step)
    states = jax.vmap(lambda _: e.reset())(jnp.arange(2))
    keep = jnp.asarray(graph.initial_pattern_ids(t["spec"]))
    ids = jnp.stack([keep, keep])  # 0% reduction: out of band, twice -> forced end at step 2
    states, r1, d1, _ = step_j(e.consts, states, ids)
    states, r2, d2, _ = step_j(e.consts, states, ids)
    assert len(traces) == 1
    assert not np.any(d1) and np.all(d2)
    np.testing.assert_allclose(r2, -100.0)
    np.testing.assert_array_equal(states.t, [0, 0])
    np.testing.assert_array_equal(states.episode, [1, 1])
