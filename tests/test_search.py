"""The compiled search: PPO finds in-band candidates, resumes bit-identically, never retraces;
baselines share the environment and budget."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sculpt_jax import env as env_lib
from sculpt_jax import flops
from sculpt_jax.search import runner

SMALL = ml_collections.ConfigDict(dict(sigma=0.2, hidden=16, gnn_layers=1, heads=2))
KW = dict(iterations=2, n_seeds=2, n_envs=2, n_steps=3, top_k=2, progress=False)


@pytest.fixture(scope="module")
def search_env(tiny_setup):
    t = tiny_setup
    e = env_lib.make_env(
        t["model"].apply, t["variables"], t["spec"], t["images"][:64], t["labels"][:64],
        library=t["library"], calib_images=t["calib"][:1],
        config=env_lib.EnvConfig(target=0.55, band=0.15),
    )  # fmt: skip
    policy = runner.policy_for(e, "per_group", t["variables"], SMALL)
    return e, policy


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_ppo_search_finds_in_band_resumes_bit_identically_and_never_retraces(
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
    )  # fmt: skip
    assert iter_fn._cache_size() == 1

    with pytest.raises(ValueError, match="other settings"):
        runner.run_search(e, "ppo", workdir=wd, policy=policy, **dict(KW, n_steps=2))


@pytest.mark.parametrize("method", ["random", "uniform", "magnitude"])
def test_baselines_use_the_same_budget_and_report_in_band(search_env, tmp_path, method):
    e, _ = search_env
    kw = dict(KW, n_seeds=1)
    res = runner.run_search(e, method, workdir=str(tmp_path / method), **kw)
    assert res.n_evals == 2 * 3 * 2
    for cand in res.best:
        assert abs(cand["reduction"] - 0.55) <= 0.15 + 1e-6
    if method == "magnitude":  # q sweeps (0, 1]: removing up to every filter crosses the band
        assert res.n_in_band > 0
