"""Exact dense/masked MACs, FLOPs, params and the labelled reference formula (sculpt_jax.flops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from layer_factory import conv_layer, dense_layer  # tests/ helper

from sculpt_jax import compaction, flops, masking, patterns, trace
from sculpt_jax.tree_util import map_with_path
from sculpt_jax.types import InputSource, Layer, LayerGraph


def seq(producer, n):
    return (InputSource(producer, tuple(range(n))),)


def make_graph(layers, total_params, other_flops=0):
    return LayerGraph(
        tuple(layers),
        (4, 4, 2),
        (),
        tuple((i,) for i in range(len(layers))),
        other_flops,
        total_params,
    )


def shapes_params(graph, extra=None):
    """An abstract params tree holding every kernel and affine leaf of `graph`."""
    tree = {}
    for layer in graph.layers:
        tree.setdefault(layer.kernel_path[1], {})[layer.kernel_path[2]] = jnp.zeros(
            layer.kernel_shape
        )
        for ap in layer.affine_paths:
            tree.setdefault(ap[1], {})[ap[2]] = jnp.zeros((layer.out_features,))
    return tree


# Tiny two-conv model, input 4x4x2:
#   conv1 3x3 2->3, pad 1, stride 1 -> 4x4x3, then bn1 (scale, bias)
#   conv2 3x3 3->2, pad 1, stride 2 -> 2x2x2, own bias
# dense MACs: conv1 16 pos * 9 cells * 2 in * 3 out = 864; conv2 4 * 9 * 3 * 2 = 216; total 1080
# params: conv1 54 + bn1 6 + conv2 54 + bias 2 = 116 (nothing else)
TINY = make_graph(
    [
        conv_layer(0, "conv1", 2, 3, affine=("bn1",)),
        conv_layer(1, "conv2", 3, 2, stride=2, bias=True, sources=seq(0, 3)),
    ],
    total_params=116,
    other_flops=100,
)


def test_tiny_dense_golden():
    c = flops.count(TINY)
    assert float(c["dense_macs"]) == 1080 == float(c["masked_macs"])
    assert float(c["dense_flops"]) == 2 * 1080 + 100 == float(c["masked_flops"])
    assert int(c["dense_params"]) == 116 == int(c["masked_params"])
    np.testing.assert_array_equal(c["layer_dense_macs"], [864, 216])
    assert float(c["flops_reduction"]) == 0.0


def test_tiny_masked_golden_removed_filter_removes_downstream_work():
    # conv1 ids [0, 3, 5]: filter 0 removed, filter 1 keeps 6 cells, filter 2 keeps 9
    # conv2 ids [5, 2]:    filter 0 keeps 9 cells, filter 1 keeps 3 (000/000/111)
    # conv1 MACs: 16 * (0 + 6*2 + 9*2) = 480
    # conv2 MACs: input channel 0 is dead -> 2 alive inputs: 4 * (9*2 + 3*2) = 96
    # total 576; FLOPs 2*576 + 100 = 1252
    # params: conv1 kernel 0 + 12 + 18 = 30; bn1 2 alive filters * 2 = 4;
    #         conv2 kernel 9*3 + 3*3 = 36 (entries reading the dead channel still count); bias 2
    #         -> 72
    params = shapes_params(TINY)
    m = masking.pattern_ids_to_masks(TINY, params, {0: jnp.array([0, 3, 5]), 1: jnp.array([5, 2])})
    c = flops.count(TINY, m)
    assert float(c["masked_macs"]) == 576.0
    np.testing.assert_array_equal(c["layer_masked_macs"], [480, 96])
    np.testing.assert_array_equal(c["layer_masked_cells"], [30, 24])
    np.testing.assert_array_equal(c["layer_alive_filters"], [2, 2])
    assert float(c["masked_flops"]) == 1252.0
    assert int(c["masked_params"]) == 72
    np.testing.assert_allclose(c["flops_reduction"], 1 - 1252 / 2260, rtol=1e-6)
    np.testing.assert_allclose(c["params_reduction"], 1 - 72 / 116, rtol=1e-6)
    ex = flops.count_exact(TINY, m)
    assert (ex["masked_macs"], ex["masked_flops"], ex["masked_params"]) == (576, 1252, 72)
    assert isinstance(ex["masked_macs"], int)
    # variables-level masks are accepted too
    c2 = flops.count(TINY, {"params": m})
    assert float(c2["masked_macs"]) == 576.0


def test_grouped_and_depthwise_counting():
    # producer: 1x1 conv 2->4 on 4x4 (16 positions); consumers on the same 4 channels
    prod = conv_layer(0, "p", 2, 4, k=1)
    grouped = conv_layer(1, "g", 4, 4, groups=2, sources=seq(0, 4))  # filter f reads 2*(f//2)+j
    depthwise = conv_layer(2, "dw", 4, 4, groups=4, sources=seq(0, 4))  # filter f reads f
    mult2 = conv_layer(3, "m2", 2, 4, groups=2, sources=(InputSource(0, (0, 1)),))  # f reads f//2
    graph = make_graph([prod, grouped, depthwise, mult2], 8 + 72 + 36 + 36)
    params = shapes_params(graph)
    c = flops.count(graph)
    np.testing.assert_array_equal(c["layer_dense_macs"], [128, 16 * 9 * 2 * 4, 16 * 9 * 4, 16 * 36])
    # remove producer filter 0 (1x1: keep/remove only) and filter 1
    m = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([0, 0, 5, 5])})
    c = flops.count(graph, m)
    # grouped: filters 0, 1 read inputs {0, 1} (both dead), filters 2, 3 read {2, 3}: 2*18 cells
    # depthwise: filters 2, 3 alive: 2*9; mult2 reads channels 0, 1 only: all dead -> 0
    np.testing.assert_array_equal(c["layer_masked_cells"], [2 * 2, 36, 18, 0])
    m = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([0, 5, 5, 5])})
    c = flops.count(graph, m)
    # grouped: filters 0, 1 lose one of two inputs: 9 + 9 + 18 + 18 = 54
    # mult2: input 0 <- channel 0 (dead) feeds filters 0, 1; input 1 alive feeds 2, 3: 18 cells
    np.testing.assert_array_equal(c["layer_masked_cells"], [3 * 2, 54, 27, 18])
    np.testing.assert_array_equal(c["layer_masked_macs"], [96, 864, 432, 288])


def test_residual_add_keeps_channel_alive_and_option_a_padding():
    # a and b (3x3, 2->2) are summed channel-wise and feed c; d reads an option-A padded stream:
    # its features 0 and 3 are zero padding (not fed), 1 and 2 come from a's channels 0 and 1.
    a = conv_layer(0, "a", 2, 2)
    b = conv_layer(1, "b", 2, 2)
    c = conv_layer(
        2,
        "c",
        2,
        1,
        sources=(InputSource(0, (0, 1), "residual"), InputSource(1, (0, 1), "residual")),
    )
    d = conv_layer(3, "d", 4, 1, k=1, sources=(InputSource(0, (-1, 0, 1, -1), "residual"),))
    graph = make_graph([a, b, c, d], 36 * 2 + 18 + 4)
    params = shapes_params(graph)
    m = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([0, 5])})
    cnt = flops.count(graph, m)
    # c: both stream channels alive (channel 0 through b) -> 18 cells; d: padding is never alive,
    # a's channel 0 dead -> only feature 2 alive -> 1 cell
    np.testing.assert_array_equal(cnt["layer_masked_cells"], [9 * 2, 18 * 2, 18, 1])
    m = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([0, 5]), 1: jnp.array([0, 5])})
    cnt = flops.count(graph, m)
    np.testing.assert_array_equal(cnt["layer_masked_cells"], [18, 18, 9, 1])


def test_masked_never_exceeds_dense_random():
    graph = make_graph(
        [
            conv_layer(0, "a", 2, 6, affine=("bn",)),
            conv_layer(1, "b", 6, 4, sources=seq(0, 6)),
            dense_layer(2, "h", 4, 3, sources=seq(1, 4)),
        ],
        108 + 12 + 216 + 15,
    )
    params = shapes_params(graph)
    f = jax.jit(
        lambda k: flops.count(
            graph,
            masking.pattern_ids_to_masks(
                graph,
                params,
                {
                    0: jax.random.randint(k, (6,), 0, 6),
                    1: jax.random.randint(jax.random.fold_in(k, 1), (4,), 0, 6),
                    2: jax.random.randint(jax.random.fold_in(k, 2), (3,), 0, 6),
                },
            ),
        )
    )
    for s in range(8):
        c = f(jax.random.key(s))
        assert float(c["masked_macs"]) <= float(c["dense_macs"])
        assert float(c["masked_flops"]) <= float(c["dense_flops"])
        assert int(c["masked_params"]) <= int(c["dense_params"])
        assert np.all(np.asarray(c["layer_masked_macs"]) <= np.asarray(c["layer_dense_macs"]))


def test_count_does_not_retrace(monkeypatch):
    graph = make_graph(
        [conv_layer(0, "x", 2, 5), conv_layer(1, "y", 5, 3, sources=seq(0, 5))], 90 + 135
    )
    calls = []
    real = flops._layer_counts

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(flops, "_layer_counts", counting)
    params = shapes_params(graph)
    m1 = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([0, 1, 2, 3, 4])})
    m2 = masking.pattern_ids_to_masks(graph, params, {0: jnp.array([5, 5, 5, 3, 0])})
    c1 = flops.count(graph, m1)
    n = len(calls)
    c2 = flops.make_counter(graph)(m2)
    assert n == 2 and len(calls) == n  # traced once (one call per layer), not again
    assert float(c1["masked_macs"]) != float(c2["masked_macs"])


def test_graph_consistency_errors():
    bad = conv_layer(0, "x", 2, 5)
    bad = Layer(**{**bad.__dict__, "macs": bad.macs + 1})
    with pytest.raises(ValueError, match="macs="):
        flops.count(make_graph([bad], 90))
    with pytest.raises(ValueError, match="total_params"):
        flops.count(make_graph([conv_layer(0, "x", 2, 5)], 10))


# ----------------------------------------------------------------------------------------------
# Reference formula


def test_reference_formula_small_golden():
    # two 3x3 convs; F = H_out W_out (C_in (2*9-1) + 1) C_out / g
    # conv1: 16 * (2*17 + 1) * 3 = 1680; conv2: 4 * (3*17 + 1) * 2 = 416
    assert flops.reference_conv_flops(TINY.layers[0]) == 1680
    assert flops.reference_conv_flops(TINY.layers[1]) == 416
    # r0 = mean(1/3, 1/3, 0) = 2/9; r1 = mean(2/3, 0) = 1/3
    # P = 1680 * 2/9 + 416 * (2/9 + 1/3 - 2/27) = 373.33 + 200.30 = 573.63 -> / 2096
    ids = {0: jnp.array([3, 4, 5]), 1: jnp.array([1, 5])}
    want = (1680 * 2 / 9 + 416 * (2 / 9 + 1 / 3 - 2 / 27)) / 2096
    np.testing.assert_allclose(flops.reference_flops_reduction(TINY, ids), want, rtol=1e-6)
    m = masking.pattern_ids_to_masks(TINY, shapes_params(TINY), ids)
    np.testing.assert_allclose(flops.reference_flops_reduction(TINY, m), want, rtol=1e-6)
    jitted = jax.jit(flops.reference_flops_reduction, static_argnums=(0, 2))
    np.testing.assert_allclose(jitted(TINY, ids, "reference6"), want, rtol=1e-6)


def resnet_cifar_graph(n_blocks=9, widths=(16, 32, 64), hw=32, n_classes=10):
    """Hand-built LayerGraph of a CIFAR ResNet-(6n+2), option A (stem, 2 convs per block, head);
    sources are sequential (all filters stay alive in the tests using it)."""
    layers = [conv_layer(0, "stem_conv", 3, widths[0], hw=hw, affine=("stem_bn",))]
    cin = widths[0]
    for s, w in enumerate(widths):
        for b in range(n_blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            name = f"stage{s + 1}_block{b}"
            i = len(layers)
            layers.append(
                conv_layer(
                    i,
                    f"{name}_conv1",
                    cin,
                    w,
                    hw=hw,
                    stride=stride,
                    affine=(f"{name}_bn1",),
                    sources=seq(i - 1, cin),
                )
            )
            hw = layers[-1].out_spatial[0]
            layers.append(
                conv_layer(
                    i + 1, f"{name}_conv2", w, w, hw=hw, affine=(f"{name}_bn2",), sources=seq(i, w)
                )
            )
            cin = w
    layers.append(
        dense_layer(len(layers), "head", cin, n_classes, sources=seq(len(layers) - 1, cin))
    )
    total = sum(la.params + 2 * la.out_features for la in layers[:-1]) + cin * n_classes + n_classes
    return make_graph(layers, total)


def _third_pattern_ids(graph):
    """Every 3x3 conv filter on a 1/3 pattern (ids 3 and 4 alternating)."""
    return {
        la.index: jnp.asarray(3 + np.arange(la.out_features) % 2, jnp.int32)
        for la in graph.layers
        if la.kind == "conv" and la.kernel_size == (3, 3)
    }


def _check_worked_example(graph, params=None):
    """Reference formula ~55.5% vs true 3x3-conv MAC reduction 1/3. With `params`, the masks come
    from `pattern_ids_to_masks` (one jitted pipeline); without, they are built in numpy."""
    ids = _third_pattern_ids(graph)
    assert len(ids) == 55
    if params is None:
        lib = patterns.get_library("reference6")
        m = {}
        for la in graph.layers:
            km = np.ones(la.kernel_shape, np.float32)
            if la.index in ids:
                km = np.broadcast_to(
                    np.moveaxis(lib.masks[np.asarray(ids[la.index])], 0, -1)[:, :, None, :],
                    la.kernel_shape,
                )
            m.setdefault(la.kernel_path[1], {})[la.kernel_path[2]] = km
        ref = flops.reference_flops_reduction(graph, ids)
        c = flops.count(graph, m)
    else:

        @jax.jit
        def pipeline(ids):
            m = masking.pattern_ids_to_masks(graph, params, ids)
            ref = flops.reference_flops_reduction(graph, ids, "reference6")
            ref_m = flops.reference_flops_reduction(graph, m)
            return ref, ref_m, flops.count(graph, m)

        ref, ref_m, c = pipeline(ids)
        assert abs(float(ref_m) - float(ref)) < 1e-5
    ref = float(ref)
    assert abs(ref - 0.555) <= 0.005, ref
    conv = np.array(sorted(ids))
    dense = float(np.sum(np.asarray(c["layer_dense_macs"])[conv]))
    masked = float(np.sum(np.asarray(c["layer_masked_macs"])[conv]))
    # A third of every 3x3 kernel's taps is gone...
    cells = float(np.sum(np.asarray(c["layer_masked_cells"])[conv]))
    all_cells = sum(9 * graph.layers[i].in_features * graph.layers[i].out_features for i in conv)
    np.testing.assert_allclose(1 - cells / all_cells, 1 / 3, atol=1e-6)
    # ...and of the in-bounds work (MACs) a bit less where the pruned edge row/column reads zero
    # padding at the borders ((n-1)/(3n-2) per stride-1 layer on n x n, e.g. 31/94 at 32x32).
    true = 1 - masked / dense
    if all(not graph.layers[i].cell_positions for i in conv):
        np.testing.assert_allclose(true, 1 / 3, atol=1e-6)
    else:
        assert 0.31 < true < 1 / 3, true
    assert float(c["macs_reduction"]) < 0.34
    return ref, c


def test_reference_worked_example_resnet56_hand_graph():
    """REFERENCE.md section 6: reference formula 55.5% vs true 33.3% of 3x3 conv MACs."""
    graph = resnet_cifar_graph()
    assert len(graph.layers) == 56
    _check_worked_example(graph)


def test_reference_worked_example_resnet56_traced():
    trace = _trace_or_skip()
    from sculpt_jax.models import get_model

    model = get_model("resnet56")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    graph = trace.trace_model(model.apply, variables, jnp.zeros((1, 32, 32, 3)))
    assert len([la for la in graph.layers if la.kind == "conv"]) == 55
    _, c = _check_worked_example(graph, variables)
    assert int(c["dense_params"]) == sum(int(x.size) for x in jax.tree.leaves(variables["params"]))


def numpy_variables(model, input_shape, seed=0):
    """Variables of a zoo model from numpy (init_model's jitted init compiles slowly on CPU):
    kernels N(0, 0.3^2), BN scale/var 1, biases/means 0."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape))))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = path[-1]
        if name == "kernel":
            return jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)
        return (
            jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)
        )

    return map_with_path(make, shapes)


def _trace_or_skip():
    trace = pytest.importorskip("sculpt_jax.trace", reason="sculpt_jax.trace not written yet")
    if not hasattr(trace, "trace_model"):
        pytest.skip("sculpt_jax.trace.trace_model not available yet")
    return trace


def test_alive_features_match_real_forward_zeros():
    """Traced resnet8_tiny: every input feature `alive_features` calls dead is exactly zero in the
    masked model's forward pass, and every alive one is not (residual adds keep channels alive)."""
    import flax.linen as nn

    trace = _trace_or_skip()
    from sculpt_jax.models import get_model

    model = get_model("resnet8_tiny")
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 16, 16, 3)), jnp.float32)
    variables = numpy_variables(model, (16, 16, 3))
    graph = trace.trace_model(model.apply, variables, x[:1])
    dense = flops.count(graph)
    assert float(dense["dense_macs"]) == graph.dense_macs
    assert int(dense["dense_params"]) == sum(x.size for x in jax.tree.leaves(variables["params"]))

    by_name = {la.name: la.index for la in graph.layers}
    stem, b1c2 = by_name["stem_conv"], by_name["stage1_block0/conv2"]
    ids = {
        stem: jnp.array([0, 0, 5, 3]),  # stream channels 0, 1 lose the stem addend
        b1c2: jnp.array([0, 5, 2, 5]),  # channel 0 loses the block addend too -> dead; 1 alive
        by_name["stage2_block0/conv1"]: jnp.array([0, 1, 2, 3, 4, 5, 0, 0]),
        by_name["head"]: jnp.array([0] + [5] * 9),
    }

    @jax.jit
    def pipeline(ids):
        m = masking.pattern_ids_to_masks(graph, variables, ids)
        inputs = {}

        def record(next_fun, args, kwargs, context):
            if (
                isinstance(context.module, (nn.Conv, nn.Dense))
                and context.method_name == "__call__"
            ):
                inputs["/".join(context.module.scope.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(masking.apply_masks(variables, m), x)
        return flops.alive_features(graph, m)[1], inputs, flops.count(graph, m)

    alive_in, inputs, c = pipeline(ids)
    s2c1 = by_name["stage2_block0/conv1"]
    np.testing.assert_array_equal(alive_in[s2c1], [False, True, True, True])
    n_alive = n_nonzero = 0
    for la in graph.layers:
        feats = np.asarray(inputs[la.name]).reshape(-1, la.in_features)
        dead = ~np.asarray(alive_in[la.index])
        assert np.all(feats[:, dead] == 0.0), la.name
        n_alive += int(np.sum(~dead))
        n_nonzero += int(np.sum(np.any(feats[:, ~dead] != 0.0, axis=0)))  # ReLU may zero a few
    assert n_nonzero >= 0.8 * n_alive
    s2_in = np.asarray(inputs["stage2_block0/conv1"])
    assert np.all(s2_in[..., 0] == 0.0) and np.any(s2_in[..., 1] != 0.0)  # residual keeps ch 1
    assert float(c["masked_macs"]) < float(c["dense_macs"])


@pytest.mark.parametrize("name, hand", [("resnet20", 40_551_040), ("resnet56", 125_485_696),
                                        ("vgg16", 313_201_664)])  # fmt: skip
def test_conventional_macs_equal_hand_counts(name, hand):
    # the literature's convention (thop / fvcore): every tap incl. zero padding, convs + dense.
    # ResNet-20 by hand: stem 1024*9*3*16 + 6 * 1024*9*16*16 + 256*9*16*32 + 5 * 256*9*32*32
    # + 64*9*32*64 + 5 * 64*9*64*64 + 64*10 = 40,551,040 (the 40.55M of the papers)
    trace = _trace_or_skip()
    from sculpt_jax.models import get_model

    model = get_model(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    graph = trace.trace_model(model.apply, variables, jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                                          jnp.float32))  # fmt: skip
    assert flops.conventional_macs(graph) == hand
    c = flops.count_exact(graph, None)
    assert c["dense_conventional_macs"] == c["masked_conventional_macs"] == hand
    assert c["dense_macs"] < hand  # the exact count skips the taps in the padding
    if name != "resnet20":
        return
    masks = masking.ones_masks(variables)
    stem = graph.layers[0].kernel_path[1:]
    masks[stem[0]][stem[1]] = masks[stem[0]][stem[1]].at[0, 0].set(0.0)  # tap (0, 0), every filter
    c = flops.count_exact(graph, masks)
    assert c["masked_conventional_macs"] == hand - 1024 * 3 * 16  # conventional: every position
    assert c["masked_macs"] == c["dense_macs"] - 31 * 31 * 3 * 16  # exact: in-bounds positions


class _Act(nn.Module):
    """conv -> act -> conv -> mean -> dense: a removed conv1 filter reaches conv2 as act(0)."""

    act: str

    @nn.compact
    def __call__(self, x, train=False):
        act = {"sigmoid": nn.sigmoid, "relu_plus_1": lambda z: nn.relu(z) + 1.0, "relu": nn.relu}
        x = act[self.act](nn.Conv(6, (3, 3))(x))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, (1, 2)))


class _SqueezeExcite(nn.Module):
    """Squeeze-excite gating: a product of the conv stream and sigmoid(dense(mean(stream)))."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        s = nn.sigmoid(nn.Dense(8)(nn.relu(nn.Dense(4)(jnp.mean(x, (1, 2))))))
        x = nn.relu(nn.Conv(6, (3, 3))(x * s[:, None, None, :]))
        return nn.Dense(3)(jnp.mean(x, (1, 2)))


class _Attention(nn.Module):
    """One attention block on the 36 pixels as tokens: q k^T and the weighted sum are products."""

    @nn.compact
    def __call__(self, x, train=False):
        t = nn.Dense(8)(x.reshape(x.shape[0], -1, x.shape[-1]))
        q, k, v = nn.Dense(8)(t), nn.Dense(8)(t), nn.Dense(8)(t)
        w = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(8.0), -1)
        o = nn.Dense(8)(jnp.einsum("bts,bsd->btd", w, v))
        return nn.Dense(3)(jnp.mean(o + t, 1))


@pytest.mark.parametrize(
    "model, nonzero",
    [(_Act("sigmoid"), True), (_Act("relu_plus_1"), True), (_Act("relu"), False),
     (_SqueezeExcite(), True), (_Attention(), False)],
    ids=["sigmoid", "relu_plus_1", "relu", "squeeze_excite", "attention"],
)  # fmt: skip
def test_count_and_compaction_agree_where_removed_channels_are_not_zero(model, nonzero):
    # The exact count's alive inputs of every layer are the inputs compaction keeps (and so the
    # MACs it performs), on models whose removed channels reach the next layer as sigmoid(0) = 0.5
    # or relu(0) + 1 = 1, or feed a product (gating, attention). Before, the count dropped the
    # MACs on sigmoid(0) inputs that the masked and the compact model both perform.
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    v = model.init(jax.random.key(0), x)
    graph = trace.trace_model(model.apply, v, x)
    assert any(ly.nonzero_dead_sources for ly in graph.layers) == nonzero
    for seed in range(2):
        rng = np.random.default_rng(seed)
        ids = {i: jnp.asarray(rng.integers(0, 6, ly.out_features), jnp.int32)
               for i, ly in enumerate(graph.layers)}  # fmt: skip
        masks = masking.pattern_ids_to_masks(graph, v, ids)
        fn, cv, info = compaction.compact(model.apply, v, graph, masks, x)
        ref = model.apply(masking.apply_masks(v, masks), x, train=False)
        np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-5, rtol=0)
        _, input_alive = flops.alive_features(graph, masks)
        kept = {d["index"]: d["in_after"] for d in info["layers"]}
        assert kept == {i: int(np.sum(a)) for i, a in enumerate(input_alive)}, seed
        assert info["params"] == (
            info["masked_params"] - info["dropped_kernel_entries"] - info["dropped_affine_entries"]
        )
        assert not bool(np.all(ids[0] > 0))  # some conv1 filter is removed (pattern 0)
        if nonzero and isinstance(model, _Act):  # conv2 reads all conv1 channels, removed ones too
            assert kept[1] == 6
