"""The compiled searches: every proposal method (the mixture policy, random, uniform, CEM, annealing,
magnitude) evaluates only on-budget candidates, at the same budget, resumes bit-identically and
never retraces; successive halving scores exactly; the legacy band-rule PPO is kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sculpt_jax import bandit, decode, flops
from sculpt_jax import env as env_lib
from sculpt_jax import graph as graph_lib
from sculpt_jax.search import propose, runner

SMALL = ml_collections.ConfigDict(dict(sigma=0.2, hidden=16, gnn_layers=1, heads=2))
KW = dict(iterations=2, n_seeds=2, n_envs=2, n_steps=3, top_k=2, progress=False)


def _tiny_env(t, config):
    """The tiny model's environment on 64 reward images."""
    return env_lib.make_env(
        t["model"].apply, t["variables"], t["spec"], t["images"][:64], t["labels"][:64],
        library=t["library"], calib_images=t["calib"][:1], config=config,
    )  # fmt: skip


@pytest.fixture(scope="module")
def search_env(tiny_setup):
    t = tiny_setup
    e = _tiny_env(t, env_lib.EnvConfig(target=0.55, band=0.15))
    policy = runner.policy_for(e, "per_group", t["variables"], SMALL)
    return e, policy


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_legacy_ppo_search_finds_in_band_resumes_bit_identically_and_never_retraces(
    search_env, tiny_setup, tmp_path
):
    e, policy = search_env
    full = runner.run_search(e, "ppo", workdir=str(tmp_path / "a"), policy=policy, **KW)
    assert full.n_evals == 2 * 2 * 3 * 2 and full.iterations_run == 2
    assert full.best, "no in-band candidate in a wide band"
    for cand in full.best:  # in band, and the stored reduction is the exact count
        assert abs(cand["reduction"] - 0.55) <= 0.15 + 1e-6
        exact = flops.count_exact(tiny_setup["graph"], e.masks_of(jnp.asarray(cand["pattern_ids"])))
        assert cand["flops_reduction"] == pytest.approx(exact["flops_reduction"], abs=1e-5)
        assert 0.0 <= cand["accuracy"] <= 1.0
    accs = [c["accuracy"] for c in full.best]
    assert accs == sorted(accs, reverse=True)
    assert len(full.history[-1]["best_accuracy_per_seed"]) == 2

    # Killed after one iteration, then resumed: bit-identical to the uninterrupted run.
    wd = str(tmp_path / "b")
    part = runner.run_search(e, "ppo", workdir=wd, policy=policy, stop_after=1, **KW)
    assert part.iterations_run == 1
    rest = runner.run_search(e, "ppo", workdir=wd, policy=policy, **KW)
    assert rest.iterations_run == 1
    assert _leaves_equal(rest.state, full.state)
    assert [h["iteration"] for h in rest.history] == [1, 2]

    # One compiled iteration served all three runs.
    _, iter_fn = runner.compiled_search(
        e, "ppo", n_seeds=2, order=np.asarray(e.spec.action_nodes), policy=policy,
        ppo_config=None, n_envs=2, n_steps=3, top_k=2, budget=2 * 3 * 2, library="reference6",
        decoder=None, proposal=None,
    )  # fmt: skip
    assert iter_fn._cache_size() == 1

    with pytest.raises(ValueError, match="other settings"):
        runner.run_search(e, "ppo", workdir=wd, policy=policy, **dict(KW, n_steps=2))


TOL = 0.05  # resnet8_tiny has 4-16 filters per layer: one filter moves the count by ~1%
PKW = dict(iterations=2, n_envs=4, n_steps=2, top_k=2, progress=False)


@pytest.fixture(scope="module")
def proposal_setup(tiny_setup):
    t = tiny_setup
    e = _tiny_env(t, env_lib.EnvConfig(target=0.5, eval_batch_size=32))
    order = np.asarray(graph_lib.importance_order(t["spec"], t["variables"]))
    d = decode.make_decoder(t["spec"], order, t["library"], target=0.5, tolerance=TOL)
    policy = bandit.make_mixture_policy(t["spec"], d.action_mask, hidden=16, n_layers=1,
                                        n_heads=2, mlp_hidden=32)  # fmt: skip
    return e, d, policy, order


@pytest.mark.parametrize("method", propose.METHODS)
def test_every_method_evaluates_on_budget_at_the_same_budget(proposal_setup, tiny_setup,
                                                             tmp_path, method):  # fmt: skip
    e, d, policy, order = proposal_setup
    res = runner.run_search(e, method, workdir=str(tmp_path / method), order=order, decoder=d,
                            policy=policy if method == "ppo" else None, **PKW)  # fmt: skip
    assert res.n_evals == 2 * 4 * 2
    assert res.history[-1]["on_budget_rate"] == 1.0 and res.n_in_band == res.n_evals
    assert res.best and len(res.best) == 2
    for cand in res.best:
        assert abs(cand["reduction"] - 0.5) <= TOL + 1e-6
        exact = flops.count_exact(tiny_setup["graph"], e.masks_of(jnp.asarray(cand["pattern_ids"])))
        assert cand["flops_reduction"] == pytest.approx(exact["flops_reduction"], abs=1e-5)
    if method == "ppo":
        assert res.history[-1]["kl_mean"] <= bandit.BanditConfig().target_kl + 1e-5


def test_proposal_search_resumes_bit_identically_and_never_retraces(proposal_setup, tmp_path):
    e, d, policy, order = proposal_setup
    kw = dict(PKW, n_seeds=2, order=order, decoder=d, policy=policy)
    full = runner.run_search(e, "ppo", workdir=str(tmp_path / "a"), **kw)
    wd = str(tmp_path / "b")
    assert runner.run_search(e, "ppo", workdir=wd, stop_after=1, **kw).iterations_run == 1
    rest = runner.run_search(e, "ppo", workdir=wd, **kw)
    assert rest.iterations_run == 1 and _leaves_equal(rest.state, full.state)
    _, iter_fn = runner.compiled_search(
        e, "ppo", n_seeds=2, order=order, policy=policy, ppo_config=None, n_envs=4, n_steps=2,
        top_k=2, budget=2 * 4 * 2, library="reference6", decoder=d, proposal=None,
    )  # fmt: skip
    assert iter_fn._cache_size() == 1


def test_uniform_starts_from_the_uniform_allocation(proposal_setup):
    e, d, _, _ = proposal_setup
    cfg = propose.ProposalConfig(n_envs=4)
    m = propose.make_method("uniform", d, cfg)
    props, _ = m.propose({}, None, jax.random.PRNGKey(0), jnp.int32(0))
    assert np.all(np.asarray(props[0]) == 0.0) and np.any(np.asarray(props[1]) != 0.0)
    assert np.all(np.asarray(props[:, 1:]) == 0.0)  # one shared row: the same mixture everywhere


def test_successive_halving_scores_exactly(tiny_setup):
    t = tiny_setup
    make = lambda **kw: env_lib.make_env(
        t["model"].apply, t["variables"], t["spec"], t["images"], t["labels"],
        library=t["library"], calib_images=t["calib"][:1],
        config=env_lib.EnvConfig(target=0.5, eval_batch_size=32, **kw),
    )  # fmt: skip
    full, staged = make(), make(halving_images=32, halving_keep=0.5)
    first = env_lib.make_env(t["model"].apply, t["variables"], t["spec"], t["images"][:32],
                             t["labels"][:32], library=t["library"], calib_images=t["calib"][:1],
                             config=env_lib.EnvConfig(target=0.5, eval_batch_size=32))  # fmt: skip
    rng = np.random.default_rng(0)
    valid = np.asarray(t["spec"].valid)
    ids = np.where(t["spec"].action_mask[None],
                   np.argmax(rng.random((6, *valid.shape)) * valid, -1), -1).astype(np.int32)
    ids = jnp.asarray(ids)
    got = jax.jit(staged.evaluate_staged)(staged.consts, ids)
    want_full = jax.jit(full.evaluate)(full.consts, ids)["accuracy"]
    want_first = jax.jit(first.evaluate)(first.consts, ids)["accuracy"]
    promoted = np.asarray(got["promoted"])
    assert promoted.sum() == 3  # ceil(0.5 * 6)
    np.testing.assert_allclose(np.asarray(got["accuracy"])[promoted], np.asarray(want_full)[promoted],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got["accuracy"])[~promoted],
                               np.asarray(want_first)[~promoted], atol=1e-6)  # fmt: skip
    assert np.asarray(want_first)[promoted].min() >= np.asarray(want_first)[~promoted].max()
    np.testing.assert_array_equal(got["images"], np.where(promoted, 96, 32))


def test_joint_search_trains_one_policy_on_two_models_on_budget(proposal_setup):
    """`make_joint_search`: two models (the tiny ResNet and a tiny VGG) in one compiled program,
    every candidate of each on its own budget, each model's trust region held, the shared GNN
    fitted to both."""
    from conftest import traced_model

    e1, d1, p1, _ = proposal_setup
    t = traced_model("vgg_tiny", (32, 32, 3), seed=1)
    model, v, spec, lib = t["model"], t["variables"], t["spec"], t["library"]
    rng = np.random.default_rng(1)
    images = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
    e2 = env_lib.make_env(model.apply, v, spec, images, rng.integers(0, 10, 64).astype(np.int32),
                          library=lib, calib_images=images[None, :32],
                          config=env_lib.EnvConfig(target=0.5, eval_batch_size=32))  # fmt: skip
    d2 = decode.make_decoder(spec, graph_lib.importance_order(spec, v), lib, target=0.5,
                             tolerance=TOL)  # fmt: skip
    p2 = bandit.make_mixture_policy(spec, d2.action_mask, hidden=16, n_layers=1, n_heads=2,
                                    mlp_hidden=32)  # fmt: skip
    cfg = propose.ProposalConfig(n_envs=4, n_steps=1, top_k=2)
    init, iterate = propose.make_joint_search([e1, e2], [d1, d2], [p1, p2], cfg)
    iterate = jax.jit(iterate)
    state = init(jax.random.PRNGKey(0))
    consts = [e1.consts, e2.consts]
    for _ in range(2):
        state, out = iterate(consts, state)
    m = {k: np.asarray(x) for k, x in out["metrics"].items()}
    assert m["on_budget_rate"].tolist() == [1.0, 1.0] and m["in_band_rate"].tolist() == [1.0, 1.0]
    assert np.all(m["kl_mean"] <= bandit.BanditConfig().target_kl + 1e-4) and np.all(m["kl_mean"] > 0)
    assert np.asarray(state.n_evals).tolist() == [8, 8] and iterate._cache_size() == 1
    for best in state.best:
        assert np.all(np.abs(np.asarray(best.reduction) - 0.5) <= TOL + 1e-6)
    # the shared GNN was fitted to both models' improved means (it moved from its init)
    g0 = init(jax.random.PRNGKey(0)).agent.params["gnn"]
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state.agent.params["gnn"]), jax.tree.leaves(g0), strict=True)]  # fmt: skip
    assert max(moved) > 1e-3
