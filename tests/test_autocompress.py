"""AutoCompress: structured projections, annealing, ADMM, purification, progressive rounds."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sculpt_jax import flops, masking, trace
from sculpt_jax import patterns as pat
from sculpt_jax.search import admm, anneal
from sculpt_jax.search import autocompress as ac
from sculpt_jax.tree_util import get_at

# ----------------------------------------------------------------------------------------------
# Projections on hand-made tensors.


def _layer(tiny_setup, i=1):
    return tiny_setup["graph"].layers[i]  # stage1_block0/conv1: kernel (3, 3, 4, 4)


def test_project_filters_keeps_exactly_top_k_by_norm(tiny_setup):
    layer = _layer(tiny_setup)
    scales = np.array([3.0, 1.0, 4.0, 2.0], np.float32)
    kernel = np.ones((3, 3, 4, 4), np.float32) * scales  # filter norms proportional to scales
    proj, m = jax.jit(admm.project_filters, static_argnums=1)(kernel, layer, 0.5)
    kept = np.asarray(m).reshape(-1, 4).max(0)
    np.testing.assert_array_equal(kept, [1, 0, 1, 0])  # the two largest: filters 2 and 0
    assert np.all(np.asarray(m).reshape(-1, 4)[:, [0, 2]] == 1)
    np.testing.assert_array_equal(np.asarray(proj), kernel * np.asarray(m))
    # 0.75 -> 3 filters; ties broken towards the lower index; at least one filter is kept.
    tie = np.ones((3, 3, 4, 4), np.float32)
    m3 = np.asarray(admm.project_filters(tie, layer, 0.5)[1]).reshape(-1, 4).max(0)
    np.testing.assert_array_equal(m3, [1, 1, 0, 0])
    m0 = np.asarray(admm.project_filters(kernel, layer, 0.0)[1]).reshape(-1, 4).max(0)
    np.testing.assert_array_equal(m0, [0, 0, 1, 0])


def test_project_columns_keeps_exactly_top_k_by_norm(tiny_setup):
    layer = _layer(tiny_setup)
    rng = np.random.default_rng(0)
    col_norm = rng.permutation(36).astype(np.float32) + 1.0  # distinct column scales
    canon = np.ones((9, 4, 4), np.float32) * col_norm.reshape(9, 4, 1)
    kernel = np.asarray(pat.canonical_to_kernel(jnp.asarray(canon), layer))
    _, m = admm.project_columns(kernel, layer, 10 / 36)
    mc = np.asarray(pat.kernel_to_canonical(m, layer))
    assert np.all(mc == mc[:, :, :1])  # a column is all filters at one (cell, input)
    kept = mc[:, :, 0].reshape(-1) > 0
    np.testing.assert_array_equal(np.sort(np.nonzero(kept)[0]), np.sort(np.argsort(-col_norm)[:10]))


def test_scheme_masks_zero_affine_of_removed_filters(tiny_setup):
    t = tiny_setup
    g = t["graph"]
    rates = np.full((6,), 0.5, np.float32)
    m = admm.scheme_masks_jit(g, t["variables"], rates, "filter", admm.default_layers(g))
    masking.validate_masks(t["variables"]["params"], m)
    c = flops.count_exact(g, m)
    for li in admm.default_layers(g):
        layer = g.layers[li]
        canon = np.asarray(pat.kernel_to_canonical(get_at(m, layer.kernel_path[1:]), layer))
        alive = canon.reshape(-1, layer.out_features).max(0)
        assert alive.sum() == round(0.5 * layer.out_features)
        for ap in layer.affine_paths:
            np.testing.assert_array_equal(np.asarray(get_at(m, ap[1:])), alive)
    assert 0 < c["flops_reduction"] < 1


def test_rate_to_pattern_fractions_golden():
    f = np.asarray(admm.rate_to_pattern_fractions(0.5))
    np.testing.assert_allclose(f, [0.0, 0.25, 0.25, 0.25, 0.25, 0.0], atol=1e-6)
    lib = pat.get_library("reference6")
    for r in (0.0, 0.2, 0.5, 0.9, 1.0):
        f = np.asarray(admm.rate_to_pattern_fractions(r))
        assert f.sum() == pytest.approx(1.0, abs=1e-6)
        assert float(f @ np.asarray(lib.pruned_fraction)) == pytest.approx(r, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Annealing.


def test_acceptance_and_cooling_golden_values():
    p = np.asarray(anneal.acceptance_probability(jnp.array([-3.0, 0.0, 2.0, 10.0]), 100.0))
    np.testing.assert_allclose(p, [1.0, 1.0, math.exp(-0.02), math.exp(-0.1)], rtol=1e-6)
    temps = anneal.temperatures(100.0, 20.0, 0.9)
    assert len(temps) == 16
    assert temps[:3] == pytest.approx((100.0, 90.0, 81.0))
    assert temps[-1] == pytest.approx(100 * 0.9**15)  # 20.59 > 20; 0.9**16 * 100 = 18.5 stops
    with pytest.raises(ValueError, match="t0 > t_stop"):
        anneal.temperatures(10.0, 20.0)


def test_guidance_more_weights_never_smaller_rate(tiny_setup):
    r = np.asarray(anneal.guide_rates([0.5, 0.1, 0.3, 0.7], [10, 30, 20, 10]))
    np.testing.assert_allclose(r, [0.1, 0.7, 0.5, 0.3])  # ties (10, 10): lower index first
    g = tiny_setup["graph"]
    layers = admm.default_layers(g)
    wc = np.array([g.layers[i].params for i in layers])
    rng = np.random.default_rng(3)
    for _ in range(5):
        out = np.asarray(anneal.guide_rates(rng.uniform(size=len(layers)), wc))
        for a in range(len(wc)):
            for b in range(len(wc)):
                if wc[a] > wc[b]:
                    assert out[a] >= out[b]


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_hard_constraint_meets_exact_target(tiny_setup, kind):
    t = tiny_setup
    g = t["graph"]
    constrain = anneal.make_constraint(g, scheme="column", target_kind=kind)
    wc = [g.layers[i].params for i in admm.default_layers(g)]
    rates0 = anneal.guide_rates(np.linspace(0.1, 0.6, 6), wc)
    for target in (0.3, 0.5):
        ones = masking.ones_masks(t["variables"])
        rates, red, m = constrain(t["variables"], ones, rates0, jnp.zeros(6), jnp.float32(target))
        exact = flops.count_exact(g, m)[f"{kind}_reduction"]
        assert exact == pytest.approx(float(red), abs=1e-5)
        assert target <= exact + 1e-6 and exact - target < 0.02
        r = np.asarray(rates)
        assert all(r[a] >= r[b] for a in range(6) for b in range(6) if wc[a] > wc[b])


def test_anneal_is_deterministic_and_keeps_the_best():
    def energy(r):
        return float(np.sum((np.asarray(r) - 0.3) ** 2)), {}

    def project(r):
        return np.clip(np.asarray(r), 0.0, 0.9)

    runs = [
        anneal.anneal(
            jax.random.PRNGKey(7),
            energy,
            project,
            np.full(3, 0.8),
            [1, 2, 3],
            moves_per_temperature=2,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["n_evals"] == 1 + 16 * 2
    best = runs[0]["best"][0]
    assert best["energy"] == min(h["energy"] for h in runs[0]["history"] + [{"energy": 0.75}])
    assert np.all(np.diff(best["rates"]) >= 0)  # guided: weight counts ascending


# ----------------------------------------------------------------------------------------------
# Purification, ADMM, rounds.


def test_purification_leaves_outputs_unchanged(tiny_setup):
    t = tiny_setup
    g, v = t["graph"], t["variables"]
    c1 = np.ones((9, 4, 4), np.float32)
    c1[:, :, 0] = 0.0  # remove filter 0 of layer 1 -> layer 2's input 0 is dead
    c2 = np.ones((9, 4, 4), np.float32)
    c2[:, 1, :] = 0.0  # layer 2 reads nothing of input 1 -> layer 1's filter 1 is unread
    c6 = np.asarray(admm.layer_scheme_mask(get_at(v["params"], ("stage3_block0", "conv2",
                                                                "kernel")), g.layers[6], 0.6,
                                           "column"))  # fmt: skip
    masks = admm.masks_from_canonical(g, v, {1: c1, 2: c2, 6: c6})
    pure = ac.purify(g, masks)
    out = jax.jit(lambda m: t["model"].apply(masking.apply_masks(v, m), t["images"]))
    np.testing.assert_allclose(np.asarray(out(pure)), np.asarray(out(masks)), atol=1e-5, rtol=0)
    p1 = pure["stage1_block0"]
    k2 = np.asarray(p1["conv2"]["kernel"])
    assert np.all(k2[:, :, 0, :] == 0)  # rule (a): entries reading a dead feature
    assert np.all(np.asarray(p1["conv1"]["kernel"])[..., 1] == 0)  # rule (b): unread filter
    assert np.asarray(p1["bn1"]["scale"])[1] == 0 and np.asarray(p1["bn1"]["bias"])[1] == 0
    before, after = flops.count_exact(g, masks), flops.count_exact(g, pure)
    assert after["masked_params"] < before["masked_params"]
    assert after["masked_flops"] <= before["masked_flops"]
    again = ac.purify(g, pure)  # a fixed point
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(pure),
                                                    strict=True))  # fmt: skip


def test_admm_reduces_residual_and_prunes_to_projected_support(tiny_setup):
    t = tiny_setup
    g, v = t["graph"], t["variables"]
    rates = np.full((6,), 0.5, np.float32)
    out = admm.run_admm(
        t["model"].apply, v, g, rates, t["images"], t["labels"], scheme="column", rho=10.0,
        iterations=4, steps_per_iteration=3, lr=0.01, batch_size=32,
    )  # fmt: skip
    res = out["residuals"]
    assert res[-1] < 0.25 * res[0], res  # W is pulled onto the structured set Z - U
    masks, params = out["masks"], out["variables"]["params"]
    for j, li in enumerate(admm.default_layers(g)):
        layer = g.layers[li]
        mk = np.asarray(get_at(masks, layer.kernel_path[1:]))
        np.testing.assert_array_equal(np.asarray(out["z"][j]) != 0, mk != 0)  # Z's support
        assert np.all(np.asarray(get_at(params, layer.kernel_path[1:]))[mk == 0] == 0)
        cols = np.asarray(pat.kernel_to_canonical(mk, layer)).max(-1)  # [K, I] kept columns
        assert cols.sum() == round(0.5 * cols.size)


def test_admm_w_steps_never_regrow_what_earlier_rounds_pruned(tiny_setup):
    # The pruned entries of prev_masks stay exactly zero through the W-steps, so U never drifts
    # there (U <- U + W - Z with W = Z = 0); before, W regrew under the CE gradient until the end.
    t = tiny_setup
    g, v = t["graph"], t["variables"]
    prev = admm.scheme_masks_jit(g, v["params"], np.full((6,), 0.3, np.float32), scheme="filter")
    out = admm.run_admm(
        t["model"].apply, v, g, np.full((6,), 0.5, np.float32), t["images"], t["labels"],
        scheme="column", prev_masks=prev, rho=1.0, iterations=3, steps_per_iteration=3, lr=0.05,
    )  # fmt: skip
    for j, li in enumerate(admm.default_layers(g)):
        path = g.layers[li].kernel_path[1:]
        pruned = np.asarray(get_at(prev, path)) == 0
        assert pruned.any()
        np.testing.assert_array_equal(np.asarray(out["u"][j])[pruned], 0.0)
        np.testing.assert_array_equal(np.asarray(get_at(out["masks"], path))[pruned], 0.0)


def test_progressive_targets_compound():
    s, rounds = 0.6, 3
    p = ac.per_round_target(s, rounds)
    assert p == pytest.approx(1 - 0.4 ** (1 / 3))
    assert (1 - p) ** rounds == pytest.approx(1 - s)
    ts = ac.round_targets(s, rounds)
    assert ts[-1] == pytest.approx(s) and ts[0] == pytest.approx(p)
    for a, b in zip(ts, ts[1:], strict=False):  # each round removes p of what is left
        assert (1 - b) / (1 - a) == pytest.approx(1 - p)


def test_run_autocompress_end_to_end(tiny_setup):
    t = tiny_setup
    cands = ac.run_autocompress(
        t["model"].apply, t["variables"], t["graph"], (t["images"], t["labels"]), target=0.4,
        rounds=2, t0=100.0, t_stop=80.0, admm_iterations=1, admm_steps=2, scheme="column",
        rho=10.0, admm_lr=0.01,  # the settings compiled by the tests above (reused)
        reward_images=t["images"], reward_labels=t["labels"], top_k=2, progress=False, seed=3,
    )  # fmt: skip
    assert cands and [c["accuracy"] for c in cands] == sorted(
        [c["accuracy"] for c in cands], reverse=True
    )
    for c in cands:
        masking.validate_masks(t["variables"]["params"], c["masks"])
        assert c["flops_reduction"] == pytest.approx(
            flops.count_exact(t["graph"], c["masks"])["flops_reduction"]
        )
        assert c["flops_reduction"] >= 0.4 - 0.03
        assert c["rates"].shape == (t["graph"].n_layers,) and c["rates"][0] == 0.0
        assert {"reference_reduction", "params_reduction", "seed"} <= set(c)
        assert c["n_evals"] == 2 * (1 + 3)  # 2 rounds x (start + 3 temperatures: 100, 90, 81)


def test_pattern_scheme_matches_rate_and_bad_inputs_are_rejected(tiny_setup):
    t = tiny_setup
    g = t["graph"]
    layers = admm.default_layers(g)
    m = admm.scheme_masks_jit(g, t["variables"], np.full((6,), 0.5, np.float32), "pattern", layers)
    for li in layers:
        layer = g.layers[li]
        canon = np.asarray(pat.kernel_to_canonical(get_at(m, layer.kernel_path[1:]), layer))
        # per filter one reference6 pattern (broadcast over inputs); mean pruned fraction 1/2
        assert np.all(canon == canon[:, :1, :])
        assert canon.mean() == pytest.approx(0.5, abs=1 / layer.out_features)  # half pruned
    with pytest.raises(ValueError, match="unknown pruning scheme"):
        admm.scheme_masks(g, t["variables"], np.zeros(6), "channels")
    with pytest.raises(ValueError, match="target must be in"):
        ac.round_targets(1.2, 3)


def test_unreachable_target_is_refused_before_any_work(tiny_setup, monkeypatch):
    # Only column pruning at <= 20% per layer cannot remove 60% of the FLOPs: one error naming
    # the maximum and the fixes, before annealing or ADMM start (it used to return a model short
    # of the target without a word).
    t = tiny_setup
    monkeypatch.setattr(ac.anneal, "anneal", lambda *a, **k: pytest.fail("annealing started"))
    with pytest.raises(ValueError, match=r"cannot reach a flops reduction of 0.6.*max_rate 0.2"):
        ac.run_autocompress(
            t["model"].apply, t["variables"], t["graph"], (t["images"], t["labels"]), target=0.6,
            scheme="column", max_rate=0.2, reward_images=t["images"], reward_labels=t["labels"],
            progress=False,
        )  # fmt: skip


class _TwoOutputNet(nn.Module):
    """conv1 -> `act` -> conv2 -> (dense logits, and conv1's output as a second output)."""

    act: str

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(6, (3, 3), use_bias=True, name="conv1")(x)
        a = {"sigmoid": nn.sigmoid, "relu_plus_1": lambda z: nn.relu(z) + 1.0, "relu": nn.relu}
        y = nn.Conv(6, (3, 3), name="conv2")(a[self.act](h))
        return nn.Dense(4)(y.mean((1, 2))), h.mean((1, 2))


@pytest.mark.parametrize("act, nonzero", [("sigmoid", True), ("relu_plus_1", True), ("relu", False)])
def test_purification_is_output_preserving_after_nonlinearities_and_with_two_outputs(act, nonzero):
    # A removed conv1 filter reaches conv2 as sigmoid(0) = 0.5 or relu(0) + 1 = 1, not zero:
    # conv2's entries reading it are not redundant. And conv1's filters feed the second output, so
    # none is "unread". (Both used to change the outputs by 0.29-0.58.)
    model = _TwoOutputNet(act)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = model.init(jax.random.key(1), x)
    g = trace.trace_model(model.apply, v, x)
    assert g.layers[1].nonzero_dead_sources == ((0,) if nonzero else ())
    assert {s.producer for s in g.output_sources} >= {0, 2}
    c0 = np.ones((9, 3, 6), np.float32)
    c0[..., :2] = 0.0  # conv1 filters 0 and 1 removed
    c1 = np.ones((9, 6, 6), np.float32)
    c1[:, 3, :] = 0.0  # conv2 reads nothing of conv1's channel 3 (which still feeds output 2)
    masks = admm.masks_from_canonical(g, v, {0: c0, 1: c1})
    pure = ac.purify(g, masks)
    out = jax.jit(lambda m: model.apply(masking.apply_masks(v, m), x))
    for o_pure, o_masks in zip(out(pure), out(masks), strict=True):
        np.testing.assert_allclose(np.asarray(o_pure), np.asarray(o_masks), atol=1e-5, rtol=0)
    k2 = np.asarray(pure["conv2"]["kernel"])
    assert np.all(k2[:, :, :2, :] != 0) == nonzero  # rule (a) only where the channel is zero
    assert np.all(np.asarray(pure["conv1"]["kernel"])[..., 3] != 0)  # read by output 2: kept
