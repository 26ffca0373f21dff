"""Masks from pattern ids, importance placement, apply/validate, and the optax wrapper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_factory import conv_layer, dense_layer  # tests/ helper

from sculpt_jax import masking, patterns
from sculpt_jax.tree_util import map_with_path
from sculpt_jax.types import InputSource, LayerGraph

REF = patterns.get_library("reference6")


def make_graph(layers, total_params):
    return LayerGraph(
        tuple(layers), (4, 4, 2), (), tuple((i,) for i in range(len(layers))), 0, total_params
    )


class ConvBN(nn.Module):
    """conv1 (3x3, 2->4, no bias) -> bn1 -> relu -> conv2 (1x1, 4->3, bias) -> head (dense 3->2)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        y = nn.BatchNorm(use_running_average=True, name="bn1")(y)
        self.sow("intermediates", "bn1_out", y)
        y = nn.relu(y)
        y = nn.Conv(3, (1, 1), name="conv2")(y)
        self.sow("intermediates", "conv2_out", y)
        return nn.Dense(2, name="head")(jnp.mean(y, axis=(1, 2)))


def convbn_graph():
    l0 = conv_layer(0, "conv1", 2, 4, affine=("bn1",))
    l1 = conv_layer(1, "conv2", 4, 3, k=1, bias=True, sources=(InputSource(0, (0, 1, 2, 3)),))
    l2 = dense_layer(2, "head", 3, 2, sources=(InputSource(1, (0, 1, 2)),))
    return make_graph([l0, l1, l2], 72 + 8 + 12 + 3 + 6 + 2)


def numpy_variables(model, x, seed):
    """Variables with `model.init`'s structure filled from numpy (no eager jax RNG: fast on CPU):
    kernels N(0, 1), BN scale in [1, 2), biases / BN means N(0, 1), BN var in [0.5, 1.5)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def make(path, s):
        if path[-1] in ("scale", "var"):
            return jnp.asarray(1.0 - 0.5 * (path[-1] == "var") + rng.random(s.shape), s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape), s.dtype)

    return map_with_path(make, shapes)


@pytest.fixture(scope="module")
def convbn():
    model = ConvBN()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 2)), jnp.float32)
    # non-trivial BN statistics and affine params so a zero channel is not zero by accident
    variables = numpy_variables(model, x, 1)
    return model, variables, x, convbn_graph()


# ----------------------------------------------------------------------------------------------
# ones / apply / validate


def test_ones_masks_mirror_params(convbn):
    _, variables, _, _ = convbn
    m = masking.ones_masks(variables)
    assert jax.tree.structure(m) == jax.tree.structure(variables["params"])
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(variables["params"]), strict=True):
        assert a.shape == b.shape and a.dtype == jnp.float32 and bool(jnp.all(a == 1))
    assert jax.tree.structure(masking.ones_masks(variables["params"])) == jax.tree.structure(m)


def test_apply_masks_and_errors(convbn):
    _, variables, _, _ = convbn
    params = variables["params"]
    m = masking.ones_masks(params)
    m["conv1"]["kernel"] = m["conv1"]["kernel"].at[0, 0, 0, 0].set(0.0)
    out = masking.apply_masks(params, m)
    assert float(out["conv1"]["kernel"][0, 0, 0, 0]) == 0.0
    np.testing.assert_array_equal(out["conv1"]["kernel"][1:], params["conv1"]["kernel"][1:])
    # variables in, variables out, batch_stats untouched
    vout = masking.apply_masks(variables, m)
    assert vout["batch_stats"] is variables["batch_stats"]
    np.testing.assert_array_equal(vout["params"]["conv1"]["kernel"], out["conv1"]["kernel"])
    # same under jit
    jout = jax.jit(masking.apply_masks)(params, m)
    np.testing.assert_array_equal(jout["conv1"]["kernel"], out["conv1"]["kernel"])

    bad = {**m, "conv2": {"kernel": m["conv2"]["kernel"]}}  # missing conv2/bias
    with pytest.raises(ValueError, match="conv2/bias"):
        masking.apply_masks(params, bad)
    bad = {**m, "conv2": {**m["conv2"], "kernel": jnp.ones((1, 1, 4, 4))}}
    with pytest.raises(ValueError, match=r"conv2/kernel.*shape"):
        masking.apply_masks(params, bad)


def test_validate_masks(convbn):
    _, variables, _, _ = convbn
    m = masking.ones_masks(variables)
    masking.validate_masks(variables, m)
    m["bn1"]["scale"] = m["bn1"]["scale"].at[2].set(0.5)
    with pytest.raises(ValueError, match=r"bn1/scale.*0\.5.*\(2,\)"):
        masking.validate_masks(variables, m)


# ----------------------------------------------------------------------------------------------
# pattern ids -> masks


def test_pattern_masks_placement_and_nonzeros():
    """3x3 conv: mask[:, :, c, f] == pattern of filter f for every input channel c; nonzeros per
    filter == kept_cells * C_in; in a torch OIHW layout the same pattern lands on axes (2, 3)."""
    layer = conv_layer(0, "c", 5, 6)
    graph = make_graph([layer], 3 * 3 * 5 * 6)
    params = {"c": {"kernel": jnp.ones((3, 3, 5, 6))}}
    ids = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)
    m = masking.pattern_ids_to_masks(graph, params, {0: ids}, "reference6")["c"]["kernel"]
    for f in range(6):
        for c in range(5):
            np.testing.assert_array_equal(m[:, :, c, f], REF.masks[f])
        assert int(jnp.sum(m[..., f] != 0)) == REF.kept_cells[f] * 5

    oihw = layer.__class__(
        **{
            **layer.__dict__,
            "kernel_shape": (6, 5, 3, 3),
            "kernel_spatial_axes": (2, 3),
            "kernel_in_axes": (1,),
            "kernel_out_axes": (0,),
        }
    )
    g2 = make_graph([oihw], 270)
    m2 = masking.pattern_ids_to_masks(g2, {"c": {"kernel": jnp.ones((6, 5, 3, 3))}}, (ids,))
    np.testing.assert_array_equal(m2["c"]["kernel"], jnp.transpose(m, (3, 2, 0, 1)))


def test_keep_remove_only_layers():
    """1x1 conv and dense: pattern 0 zeroes the whole filter, any other id keeps it whole."""
    l0 = conv_layer(0, "c", 3, 4, k=1, bias=True)
    l1 = dense_layer(1, "d", 4, 3, sources=(InputSource(0, (0, 1, 2, 3)),))
    graph = make_graph([l0, l1], 12 + 4 + 12 + 3)
    params = {
        "c": {"kernel": jnp.ones((1, 1, 3, 4)), "bias": jnp.ones(4)},
        "d": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    }
    m = masking.pattern_ids_to_masks(graph, params, {0: [0, 3, 5, -1], 1: [5, 0, 2]})
    np.testing.assert_array_equal(m["c"]["kernel"][0, 0], [[0, 1, 1, 1]] * 3)
    np.testing.assert_array_equal(m["c"]["bias"], [0, 1, 1, 1])
    np.testing.assert_array_equal(m["d"]["kernel"], [[1, 0, 1]] * 4)
    np.testing.assert_array_equal(m["d"]["bias"], [1, 0, 1])


def test_removed_filter_zero_after_bn_in_flax_forward(convbn):
    """Pattern 0 on conv1 filter 1 zeroes bn1 scale/bias[1]; bn1's output channel 1 is exactly 0
    (eval mode, non-zero running mean), while the other channels are not."""
    model, variables, x, graph = convbn
    ids = {0: jnp.array([5, 0, 3, 1], jnp.int32)}
    m = masking.pattern_ids_to_masks(graph, variables, ids, "reference6")
    np.testing.assert_array_equal(m["bn1"]["scale"], [1, 0, 1, 1])
    np.testing.assert_array_equal(m["bn1"]["bias"], [1, 0, 1, 1])
    np.testing.assert_array_equal(m["conv2"]["kernel"], 1)  # untouched layers keep everything
    mv = masking.apply_masks(variables, m)
    _, state = model.apply(mv, x, mutable=["intermediates"])
    bn1 = state["intermediates"]["bn1_out"][0]
    assert bool(jnp.all(bn1[..., 1] == 0.0))
    assert bool(jnp.all(jnp.abs(bn1[..., [0, 2, 3]]).sum(axis=(0, 1, 2)) > 0))


def test_residual_add_keeps_channel_alive():
    """A removed filter feeding a residual add: its own output channel is exactly 0, the summed
    stream channel stays alive through the identity shortcut (module docstring semantics)."""

    class Res(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Conv(2, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv")(x)
            a = nn.BatchNorm(use_running_average=True, name="bn")(a)
            self.sow("intermediates", "branch", a)
            return a + x

    model = Res()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 4, 2)), jnp.float32)
    v = numpy_variables(model, x, 4)
    graph = make_graph([conv_layer(0, "conv", 2, 2, affine=("bn",))], 36 + 4)

    @jax.jit
    def forward(v):
        m = masking.pattern_ids_to_masks(graph, v, {0: jnp.array([0, 5])})
        return model.apply(masking.apply_masks(v, m), x, mutable=["intermediates"])

    out, st = forward(v)
    branch = st["intermediates"]["branch"][0]
    assert bool(jnp.all(branch[..., 0] == 0.0)) and bool(jnp.any(branch[..., 1] != 0.0))
    np.testing.assert_array_equal(out[..., 0], x[..., 0])  # stream channel alive, = shortcut


def test_figure8_per_kernel_and_vit6_region():
    layer = conv_layer(0, "c", 2, 3)
    graph = make_graph([layer], 54)
    params = {"c": {"kernel": jnp.ones((3, 3, 2, 3))}}
    fig = patterns.get_library("figure8")
    ids = jnp.array([[0, 7], [8, 3], [2, 2]], jnp.int32)  # [F, I]
    m = masking.pattern_ids_to_masks(graph, params, {0: ids}, "figure8")["c"]["kernel"]
    for f in range(3):
        for c in range(2):
            np.testing.assert_array_equal(m[:, :, c, f], fig.masks[int(ids[f, c])])

    d = dense_layer(0, "out", 6, 9)  # flax kernel (in=6, out=9)
    g = make_graph([d], 63)
    p = {"out": {"kernel": jnp.ones((6, 9)), "bias": jnp.ones(9)}}
    m = masking.pattern_ids_to_masks(g, p, {0: jnp.int32(2)}, "vit6")  # zero first 2/3 of rows
    np.testing.assert_array_equal(
        m["out"]["kernel"], np.concatenate([np.zeros((6, 6)), np.ones((6, 3))], axis=1)
    )
    np.testing.assert_array_equal(m["out"]["bias"], [0] * 6 + [1] * 3)  # dead outputs' bias too
    m = masking.pattern_ids_to_masks(g, p, {0: 3}, "vit6")  # zero first 1/3 of input columns
    np.testing.assert_array_equal(m["out"]["kernel"][:2], 0)
    np.testing.assert_array_equal(m["out"]["kernel"][2:], 1)
    np.testing.assert_array_equal(m["out"]["bias"], 1)
    m = masking.pattern_ids_to_masks(g, p, {0: jnp.full((9,), 3)}, "vit6")  # broadcast layer id
    np.testing.assert_array_equal(m["out"]["kernel"][:2], 0)
    with pytest.raises(ValueError, match="expected a scalar"):
        masking.pattern_ids_to_masks(g, p, {0: jnp.zeros(4, jnp.int32)}, "vit6")


def test_bad_ids_errors():
    graph = make_graph([conv_layer(0, "c", 2, 3)], 54)
    params = {"c": {"kernel": jnp.ones((3, 3, 2, 3))}}
    m = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([-1, 0, 7])})["c"]["kernel"]
    np.testing.assert_array_equal(jnp.sum(m, axis=(0, 1, 2)), [18, 0, 18])  # out of range: keep
    with pytest.raises(ValueError, match=r"expected \[3\]"):
        masking.pattern_ids_to_masks(graph, params, {0: jnp.zeros(4, jnp.int32)})
    with pytest.raises(ValueError, match="out of range"):
        masking.pattern_ids_to_masks(graph, params, {1: jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match="one entry per layer"):
        masking.pattern_ids_to_masks(graph, params, (None, None))
    with pytest.raises(KeyError, match="params/c/kernel not found"):
        masking.pattern_ids_to_masks(graph, {"d": 1}, {0: jnp.zeros(3, jnp.int32)})


def test_pattern_masks_jit_no_retrace(convbn):
    _, variables, _, graph = convbn
    traces = []

    @jax.jit
    def f(ids0, ids1):
        traces.append(1)
        return masking.pattern_ids_to_masks(graph, variables["params"], {0: ids0, 1: ids1})

    a = f(jnp.array([0, 1, 2, 3]), jnp.array([5, 5, 0]))
    b = f(jnp.array([5, 4, 3, 2]), jnp.array([0, 5, 5]))
    eager = masking.pattern_ids_to_masks(
        graph, variables, {0: jnp.array([5, 4, 3, 2]), 1: jnp.array([0, 5, 5])}
    )
    assert len(traces) == 1
    for u, w in zip(jax.tree.leaves(b), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(u, w)
    assert float(jnp.sum(a["conv1"]["kernel"])) != float(jnp.sum(b["conv1"]["kernel"]))


# ----------------------------------------------------------------------------------------------
# placement and actions


def _kernel_with_norms(norms):
    """3x3x1xF kernel whose filter f has L2 norm norms[f] (one non-zero cell)."""
    k = np.zeros((3, 3, 1, len(norms)), np.float32)
    k[1, 1, 0, :] = norms
    return jnp.asarray(k)


def test_place_by_importance_golden():
    layer = conv_layer(0, "c", 1, 4)
    kernel = _kernel_with_norms([3.0, 1.0, 4.0, 2.0])
    # weakest -> strongest: f1, f3, f0, f2; sorted ids 0, 1, 3, 5
    got = masking.place_by_importance(kernel, layer, jnp.array([5, 0, 3, 1]))
    np.testing.assert_array_equal(got, [3, 0, 5, 1])
    got = jax.jit(masking.place_by_importance, static_argnums=1)(
        kernel, layer, jnp.array([5, 0, 3, 1])
    )
    np.testing.assert_array_equal(got, [3, 0, 5, 1])
    # ties: lower index first
    got = masking.place_by_importance(
        _kernel_with_norms([1.0, 1.0, 1.0]), conv_layer(0, "c", 1, 3), jnp.array([2, 1, 0])
    )
    np.testing.assert_array_equal(got, [0, 1, 2])


def test_sample_and_fraction_actions():
    l0 = conv_layer(0, "c3", 1, 4)
    l1 = conv_layer(1, "c1", 4, 4, k=1, sources=(InputSource(0, (0, 1, 2, 3)),))
    graph = make_graph([l0, l1], 36 + 16)
    params = {
        "c3": {"kernel": _kernel_with_norms([3.0, 1.0, 4.0, 2.0])},
        "c1": {"kernel": jnp.arange(1.0, 17.0).reshape(1, 1, 4, 4)},
    }
    sample = jax.jit(masking.sample_pattern_ids, static_argnums=(1, 4))
    key = jax.random.key(7)
    # only pattern 3 has mass: 3x3 layer all 3; the 1x1 layer cannot use 3 -> all keep (5)
    ids = sample(key, graph, params, jnp.eye(6)[3], "reference6")
    np.testing.assert_array_equal(ids[0], [3] * 4)
    np.testing.assert_array_equal(ids[1], [5] * 4)
    # uniform probabilities: never an invalid pattern on the 1x1 layer
    probs = jnp.full((6,), 1 / 6)
    for s in range(5):
        ids = sample(jax.random.key(s), graph, params, probs, "reference6")
        assert set(np.asarray(ids[1]).tolist()) <= {0, 5}
        # placement: ids sorted by the filters' norm order
        order = np.argsort([3.0, 1.0, 4.0, 2.0])
        assert np.all(np.diff(np.asarray(ids[0])[order]) >= 0)
    # per-group probabilities with a layer left out
    ids = jax.jit(
        lambda k, p: masking.sample_pattern_ids(k, graph, params, p, layer_groups=(0, -1))
    )(key, jnp.eye(6)[jnp.array([2, 0])])
    assert set(ids) == {0} and np.all(np.asarray(ids[0]) == 2)

    # deterministic fractions: 1/2 remove, 1/4 pattern 3, 1/4 keep on 4 filters
    fr = jnp.array([0.5, 0, 0, 0.25, 0, 0.25])
    ids = jax.jit(lambda f: masking.actions_to_pattern_ids(graph, params, f))(fr)  # dispatcher
    np.testing.assert_array_equal(ids[0], [3, 0, 5, 0])  # weakest f1, f3 removed; f0 -> 3; f2 keep
    np.testing.assert_array_equal(ids[1], [0, 0, 0, 5])  # 1x1: 3 invalid -> 2/3 remove, 1/3 keep


def test_filter_actions_validity_masked():
    l0 = conv_layer(0, "c3", 1, 4)
    l1 = conv_layer(1, "c1", 4, 4, k=1, sources=(InputSource(0, (0, 1, 2, 3)),))
    graph = make_graph([l0, l1], 52)
    out = masking.filter_actions_to_pattern_ids(
        graph, {0: jnp.array([0, 1, 4, 9]), 1: jnp.array([0, 1, 4, -1])}
    )
    np.testing.assert_array_equal(out[0], [0, 1, 4, 5])  # 9 out of range -> keep
    np.testing.assert_array_equal(out[1], [0, 5, 5, 5])  # 1x1: only 0/5 valid
    np.testing.assert_array_equal(
        masking.actions_to_pattern_ids(graph, None, (jnp.array([2, 2, 2, 2]), None))[0], [2] * 4
    )


# ----------------------------------------------------------------------------------------------
# optax wrapper


def _toy_problem():
    rng = np.random.default_rng(11)
    params = {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
        "dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
    }
    params["dense"]["bias"] = jnp.zeros(3)
    masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.4, jnp.float32), params)
    target = jax.tree.map(lambda p: p + 1.0, params)

    def loss(p):
        return sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
        )

    return params, masks, loss


def _train(opt, params, loss, n=20):
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(n):
        params, state = step(params, state)
    assert len(traces) == 1
    return params, state, step, traces


def _assert_exact(params0, params, masks):
    for p0, p, m in zip(
        jax.tree.leaves(params0), jax.tree.leaves(params), jax.tree.leaves(masks), strict=True
    ):
        p, m = np.asarray(p), np.asarray(m)
        assert np.all(p[m == 0] == 0.0)  # exactly zero
        assert np.all(np.abs(p[m == 1] - np.asarray(p0)[m == 1]) > 1e-4)  # unmasked ones moved


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.chain(optax.add_decayed_weights(5e-2), optax.sgd(0.05, momentum=0.9)),
        lambda: optax.adamw(0.05, weight_decay=0.1),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.sgd(optax.piecewise_constant_schedule(0.1, {10: 0.1}), momentum=0.9),
        ),
    ],
    ids=["sgd_momentum_wd", "adamw", "chain_clip_schedule"],
)
def test_masked_optimizer_keeps_zeros(make_opt):
    params0, masks, loss = _toy_problem()
    params = masking.apply_masks(params0, masks)
    new, state, _, _ = _train(masking.masked(make_opt(), masks), params, loss)
    _assert_exact(params0, new, masks)
    assert isinstance(state, masking.MaskedState)


def test_masked_inside_chain_and_unmasked_start():
    """masked() as a chain element after clipping; params not pre-masked are zero after 1 step."""
    params0, masks, loss = _toy_problem()
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        masking.masked(
            optax.adamw(optax.cosine_decay_schedule(0.05, 20), weight_decay=1e-2), masks
        ),
    )
    new, state, _, _ = _train(opt, params0, loss)
    _assert_exact(params0, new, masks)
    np.testing.assert_array_equal(
        masking.masks_from_state(state)["conv"]["kernel"], masks["conv"]["kernel"]
    )


def test_masked_is_exact_only_last_and_check_exact_says_so():
    # masked() returns -p at pruned entries; a transform after it changes that (here halves it),
    # so pruned weights are not zero. check_exact proves the position with one probe update.
    params0, masks, _ = _toy_problem()
    inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
    last = optax.chain(optax.clip(1.0), masking.masked(inner, masks))
    for good in (masking.masked(inner, masks), last):
        masking.check_exact(good, params0, masks)
    bad = optax.chain(masking.masked(inner, masks), optax.scale(0.5))
    with pytest.raises(ValueError, match="must be the last transform"):
        masking.check_exact(bad, params0, masks)
    with pytest.raises(ValueError, match="must be the last transform"):
        masking.check_exact(inner, params0, masks)  # not masked at all


def test_update_masks_no_recompile():
    params0, masks, loss = _toy_problem()
    opt = masking.masked(
        optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9)), masks
    )
    params, state, step, traces = _train(opt, masking.apply_masks(params0, masks), loss, n=3)
    fewer = jax.tree.map(lambda m: m.at[..., 0].set(0.0) if m.ndim > 1 else m, masks)
    state = masking.update_masks(state, fewer)
    for _ in range(3):  # momentum still holds non-zero velocity for the newly masked entries
        params, state = step(params, state)
    _assert_exact(params0, params, fewer)
    assert len(traces) == 1  # swapping masks did not recompile the step
    np.testing.assert_array_equal(
        masking.masks_from_state(state)["dense"]["kernel"], fewer["dense"]["kernel"]
    )
    with pytest.raises(ValueError, match="no MaskedState"):
        masking.update_masks(optax.sgd(0.1).init(params), fewer)
    with pytest.raises(ValueError, match="dense/bias"):
        masking.update_masks(state, {**fewer, "dense": {"kernel": fewer["dense"]["kernel"]}})
