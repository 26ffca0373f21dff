"""Tests for sculpt_jax.trace: hand-built models with golden LayerGraphs, the zoo, errors, FLOPs."""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sculpt_jax.trace import (
    TraceError,
    TraceNotImplementedError,
    nnx_apply_fn,
    trace_model,
    trace_nnx,
    valid_macs,
)
from sculpt_jax.types import InputSource

KEY = jax.random.key(0)


def _trace(model: nn.Module, shape: tuple[int, ...], **kw):
    """Traces `model` on abstract variables (shapes only: no init compile)."""
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    variables = jax.eval_shape(model.init, KEY, x)
    return trace_model(model.apply, variables, x, **kw), variables


# ------------------------------------------------------------------------------------------
# Hand-built model, checked field by field
# ------------------------------------------------------------------------------------------


class HandNet(nn.Module):
    """conv-BN-relu, conv, residual add, strided 1x1 conv, concat, flatten, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.Conv(4, (3, 3), padding=1, name="conv_a")(x)  # L0: [B,8,8,3] -> [B,8,8,4]
        a = nn.BatchNorm(use_running_average=not train, name="bn_a")(a)
        a = nn.relu(a)
        b = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv_b")(a)  # L1
        s = a + b  # residual: L0 and L1 coupled
        c = nn.Conv(2, (1, 1), strides=2, padding=0, name="conv_c")(s)  # L2: [B,4,4,2]
        s = s[:, ::2, ::2, :]  # [B,4,4,4]
        cat = jnp.concatenate([s, c], axis=-1)  # [B,4,4,6]
        flat = cat.reshape(cat.shape[0], -1)  # 96 features, (h, w, c) row-major
        return nn.Dense(5, name="head")(flat)  # L3


def test_hand_built_graph_field_by_field():
    g, _ = _trace(HandNet(), (8, 8, 3))
    assert g.n_layers == 4
    assert g.input_shape == (8, 8, 3)
    l0, l1, l2, l3 = g.layers

    assert [layer.index for layer in g.layers] == [0, 1, 2, 3]
    assert [layer.name for layer in g.layers] == ["conv_a", "conv_b", "conv_c", "head"]
    assert [layer.kind for layer in g.layers] == ["conv", "conv", "conv", "dense"]

    # L0: conv_a, own bias then BN scale and bias (not the batch_stats mean / var)
    assert l0.kernel_path == ("params", "conv_a", "kernel")
    assert l0.affine_paths == (
        ("params", "conv_a", "bias"),
        ("params", "bn_a", "scale"),
        ("params", "bn_a", "bias"),
    )
    assert l0.kernel_shape == (3, 3, 3, 4)
    assert (l0.kernel_spatial_axes, l0.kernel_in_axes, l0.kernel_out_axes) == ((0, 1), (2,), (3,))
    assert (l0.in_features, l0.out_features, l0.groups) == (3, 4, 1)
    assert (l0.kernel_size, l0.strides, l0.dilation) == ((3, 3), (1, 1), (1, 1))
    assert l0.padding == ((1, 1), (1, 1))
    assert (l0.in_spatial, l0.out_spatial, l0.n_positions) == ((8, 8), (8, 8), 64)
    assert l0.macs == 22 * 22 * 3 * 4  # in-bounds taps only
    assert l0.sources == (InputSource(-1, (0, 0, 0), "seq"),)
    assert l0.depth == 0
    conv_a_line = _line_of('name="conv_a"')
    assert l0.source_line.endswith(f"test_trace.py:{conv_a_line}")

    # L1: conv_b, no bias, no BN
    assert l1.affine_paths == ()
    assert l1.kernel_shape == (3, 3, 4, 4)
    assert l1.macs == 22 * 22 * 4 * 4
    assert l1.sources == (InputSource(0, (0, 1, 2, 3), "seq"),)
    assert l1.depth == 1

    # L2: strided 1x1 conv on the residual sum
    assert l2.affine_paths == (("params", "conv_c", "bias"),)
    assert (l2.strides, l2.padding, l2.kernel_size) == ((2, 2), ((0, 0), (0, 0)), (1, 1))
    assert (l2.in_spatial, l2.out_spatial, l2.n_positions) == ((8, 8), (4, 4), 16)
    assert l2.macs == 16 * 1 * 4 * 2
    assert l2.sources == (
        InputSource(0, (0, 1, 2, 3), "residual"),
        InputSource(1, (0, 1, 2, 3), "residual"),
    )
    assert l2.depth == 2

    # L3: dense on the flattened concat: feature f = 6 * position + channel
    assert l3.kernel_shape == (96, 5)
    assert (l3.kernel_spatial_axes, l3.kernel_in_axes, l3.kernel_out_axes) == ((), (0,), (1,))
    assert (l3.in_features, l3.out_features, l3.n_positions, l3.macs) == (96, 5, 1, 480)
    assert l3.affine_paths == (("params", "head", "bias"),)
    assert (l3.kernel_size, l3.strides, l3.padding, l3.in_spatial) == ((), (), (), ())
    stream = tuple(c if c < 4 else -1 for _ in range(16) for c in range(6))
    branch = tuple(c - 4 if c >= 4 else -1 for _ in range(16) for c in range(6))
    assert l3.sources == (
        InputSource(0, stream, "residual"),
        InputSource(1, stream, "residual"),
        InputSource(2, branch, "concat"),
    )
    assert l3.depth == 3

    assert g.output_sources == (InputSource(3, (0, 1, 2, 3, 4), "seq"),)
    assert g.coupled_groups == ((0, 1), (2,), (3,))
    assert g.edges() == (
        (-1, 0, "seq"),
        (0, 1, "seq"),
        (0, 2, "residual"),
        (1, 2, "residual"),
        (0, 3, "residual"),
        (1, 3, "residual"),
        (2, 3, "concat"),
    )
    assert g.total_params == (108 + 4) + 8 + 144 + (8 + 2) + (480 + 5)
    # per example: conv_a bias, BN sub/mul/add, relu, residual add on [8,8,4] = 6 * 256;
    # conv_c bias on [4,4,2] = 32; head bias = 5 (BN's rsqrt(var+eps)*scale is params-only)
    assert g.other_flops == 6 * 256 + 32 + 5
    assert g.dense_flops == 2 * (5808 + 7744 + 128 + 480) + g.other_flops  # 22*22 in-bounds taps


def _line_of(snippet: str) -> int:
    """1-based line number of the unique line of this file containing `snippet`."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()
    matches = [i for i, text in enumerate(lines) if snippet in text and "_line_of" not in text]
    assert len(matches) == 1, snippet
    return matches[0] + 1


def test_macs_count_only_in_bounds_taps():
    g, _ = _trace(HandNet(), (8, 8, 3))
    # 3x3 pad 1 on 8: per dim taps 2 + 6*3 + 2 = 22 of 24
    assert g.layers[0].macs == valid_macs(g.layers[0]) == 22 * 22 * 3 * 4
    # per cell: a corner cell reads in-bounds input at 7x7 of the 8x8 outputs, the centre at all 64
    cells = g.layers[0].cell_positions
    assert len(cells) == 9 and cells[0] == 49 and cells[4] == 64 and sum(cells) == 22 * 22
    assert valid_macs(g.layers[2]) == g.layers[2].macs  # 1x1, no padding
    assert valid_macs(g.layers[3]) == g.layers[3].macs  # dense


def test_dense_general_kernel_roles_and_transposed_kernel():
    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            w = self.param("w_oi", nn.initializers.lecun_normal(), (6, 4))  # stored (out, in)
            y = x @ w.T  # kernel reaches dot_general transposed: in axis 1, out axis 0
            y = nn.DenseGeneral((2, 3), name="proj")(y)  # (6,) -> (2, 3), kernel (6, 2, 3)
            y = nn.DenseGeneral(5, axis=(-2, -1), name="out")(y)  # kernel (2, 3, 5)
            return y

    g, _ = _trace(Heads(), (7, 4))
    w, proj, out = g.layers
    assert w.name == "" and w.kernel_path == ("params", "w_oi")
    assert (w.kernel_in_axes, w.kernel_out_axes, w.in_features, w.out_features) == (
        (1,),
        (0,),
        4,
        6,
    )
    assert (w.n_positions, w.macs) == (7, 7 * 4 * 6)
    assert (proj.kernel_in_axes, proj.kernel_out_axes, proj.out_features) == ((0,), (1, 2), 6)
    assert proj.affine_paths == (("params", "proj", "bias"),)  # 2-D bias (2, 3)
    assert proj.sources == (InputSource(0, tuple(range(6)), "seq"),)
    assert (out.kernel_in_axes, out.kernel_out_axes, out.in_features) == ((0, 1), (2,), 6)
    assert out.sources == (InputSource(1, tuple(range(6)), "seq"),)
    assert g.output_sources == (InputSource(2, tuple(range(5)), "seq"),)


def test_static_gather_permutes_channels_and_layernorm_mixes():
    class Perm(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = nn.Dense(4, name="a")(x)
            y = y[..., jnp.array([2, 0, 3, 1])]  # gather with constant indices
            z = nn.Dense(3, name="b")(y)
            n = nn.LayerNorm(name="ln")(y)  # mean over features mixes channels
            return nn.Dense(2, name="c")(jnp.concatenate([z, n], -1))

    g, _ = _trace(Perm(), (5,))
    a, b, c = g.layers
    assert b.sources == (InputSource(0, (2, 0, 3, 1), "seq"),)
    # LN output = (y - mean) * rstd * scale + bias: producer 0 plus always-alive on features 3..6
    assert c.sources == (
        InputSource(-1, (-1, -1, -1, 0, 0, 0, 0), "residual"),
        InputSource(0, (-1, -1, -1, 2, 0, 3, 1), "residual"),
        InputSource(1, (0, 1, 2, -1, -1, -1, -1), "concat"),
    )
    assert a.affine_paths == (("params", "a", "bias"),)  # LN scale/bias are not per-filter


def test_dynamic_slices():
    class Dyn(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = nn.Dense(4, name="a")(x)  # [B, T, 4]
            i = jnp.argmax(y[0, :, 0])
            t = lax.dynamic_slice_in_dim(y, i, 1, axis=1)[:, 0]  # data-dependent token: 0..3
            u = lax.dynamic_slice_in_dim(y, 1, 2, axis=2)[:, 0]  # static channels 1, 2
            z = lax.dynamic_update_slice(y, jnp.zeros((1, 1, 2)), (0, 1, 2))[:, 1]  # 0, 1, -, -
            return nn.Dense(2, name="b")(jnp.concatenate([t, u, z], -1))

    g, _ = _trace(Dyn(), (3, 5))
    assert g.layers[1].sources == (InputSource(0, (0, 1, 2, 3, 1, 2, 0, 1, -1, -1), "concat"),)


def test_scan_and_cond_over_activations():
    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = nn.Dense(3, name="a")(x)  # [B, T, 3]
            ys = jnp.swapaxes(y, 0, 1)
            c, _ = lax.scan(lambda c, t: (jnp.maximum(c, t), c), jnp.zeros_like(ys[0]), ys)
            c = lax.cond(c.sum() > 0, lambda v: v * 2.0, lambda v: v - 1.0, c)
            return nn.Dense(2, name="b")(c)

    g, _ = _trace(Loop(), (4, 5))
    assert g.layers[1].sources == (InputSource(0, (0, 1, 2), "seq"),)

    class DenseInScan(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            dense = nn.Dense(5, name="d")
            w = self.param("w", nn.initializers.ones, (5, 5))
            c, _ = lax.scan(lambda c, _: (c @ w, None), dense(x), None, length=3)
            return c

    with pytest.raises(TraceNotImplementedError, match="scan"):
        _trace(DenseInScan(), (5,))


def test_unsupported_primitive_names_op_and_line():
    class Sorty(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = nn.Dense(4, name="a")(x)
            y = jnp.sort(y, axis=-1)  # sorting channels: no static channel map
            return nn.Dense(2, name="b")(y)

    with pytest.raises(TraceError, match="sort") as err:
        _trace(Sorty(), (3,))
    assert f"test_trace.py:{_line_of('jnp.sort(y, axis=-1)')}" in str(err.value)

    class Cum(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return lax.cumsum(nn.Dense(4, name="a")(x), axis=1)

    with pytest.raises(TraceError, match="cumsum"):
        _trace(Cum(), (3,))


def test_transposed_conv_is_rejected():
    class Up(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.ConvTranspose(2, (2, 2), strides=(2, 2), name="up")(x)

    with pytest.raises(TraceError, match="lhs_dilation"):
        _trace(Up(), (4, 4, 1))


def _conv(x, w):
    dims = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)  # line: conv


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Conv(4, (3, 3), name="conv")(x)), None  # line: scan


class Scanned(nn.Module):  # big_vision-style layers stacked with nn.scan
    @nn.compact
    def __call__(self, x, train=False):
        blocks = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=3)  # fmt: skip
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(3)(x.mean((1, 2)))


class Stacked(nn.Module):  # one leaf holds three kernels, indexed w[i]
    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("w", nn.initializers.lecun_normal(), (3, 3, 3, 4, 4))
        for i in range(3):
            x = nn.relu(_conv(x, w[i]))
        return nn.Dense(3)(x.mean((1, 2)))


class Standardised(nn.Module):  # weight standardisation as in BiT
    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 4, 8))
        w = (w - w.mean((0, 1, 2))) / (w.std((0, 1, 2)) + 1e-5)
        return nn.Dense(3)(nn.relu(_conv(x, w)).mean((1, 2)))


class WeightNormed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(nn.relu(nn.WeightNorm(nn.Conv(8, (3, 3)))(x)).mean((1, 2)))


@pytest.mark.parametrize("model, line", [(Scanned, "scan"), (Stacked, "conv"),
                                         (Standardised, "conv"), (WeightNormed, None)])
def test_layers_the_tracer_cannot_prune_are_rejected_never_dropped(model, line):
    # before, each traced to a graph holding only the Dense head: the convs vanished silently
    with pytest.raises(TraceError, match="cannot be pruned as a layer") as err:
        _trace(model(), (8, 8, 4))
    msg = str(err.value)
    assert "conv_general_dilated" in msg and "Fix: give each conv/dense layer its own" in msg
    if line:  # the user's line (WeightNorm: flax's own)
        assert f"test_trace.py:{_line_of(f'# line: {line}')}" in msg, msg


def test_remat_layers_are_traced_pruned_and_compacted():
    from sculpt_jax import compaction, flops, masking

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.remat(nn.Conv)(8, (3, 3), name="conv")(x))
            return nn.Dense(3, name="head")(x.mean((1, 2)))

    model = Remat()
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    variables = model.init(KEY, x)
    g = trace_model(model.apply, variables, x)
    assert [(layer.kind, layer.kernel_path) for layer in g.layers] == [
        ("conv", ("params", "conv", "kernel")), ("dense", ("params", "head", "kernel"))]
    masks = masking.ones_masks(variables)
    masks["conv"]["kernel"] = masks["conv"]["kernel"].at[..., :3].set(0.0)
    c = flops.count_exact(g, masks)
    # 3 filters x 4 inputs x 22^2 in-bounds taps (3x3 SAME on 8x8), and 3 of the head's inputs
    assert c["masked_macs"] == c["dense_macs"] - 3 * 4 * 22 * 22 - 3 * 3
    fn, cv, info = compaction.compact(model.apply, variables, g, masks, x)
    np.testing.assert_allclose(fn(cv, x), model.apply(masking.apply_masks(variables, masks), x),
                               atol=1e-5)  # fmt: skip
    assert info["layers"][0]["out_after"] == 5


def test_abstract_variables_and_bad_input():
    model = HandNet()
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape)), KEY)
    real = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)  # concrete leaves
    g_real = trace_model(model.apply, real, np.ones((3, 8, 8, 3), np.float32))
    assert trace_model(model.apply, abstract, x) == g_real
    with pytest.raises(ValueError, match="batch axis"):
        trace_model(model.apply, abstract, 3.0)


# ------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------


def test_trace_nnx_matches_linen_conventions():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.convs = nnx.List(
                [nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.Conv(4, 4, (3, 3), rngs=rngs)]
            )
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            a = self.convs[0](x)
            y = nnx.relu(self.bn(self.convs[1](a)) + a)
            return self.fc(y.mean((1, 2)))

    # abstract construction, then deterministic values (no eager init compiles)
    module = nnx.eval_shape(lambda: Block(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    _, values = nnx.split(module)
    values = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(s.dtype) + 0.5, values)
    nnx.update(module, values)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    g, graphdef, state = trace_nnx(module, x)
    assert set(state) == {"params", "batch_stats"}
    assert [layer.kernel_path for layer in g.layers] == [
        ("params", "convs", "0", "kernel"),
        ("params", "convs", "1", "kernel"),
        ("params", "fc", "kernel"),
    ]
    assert [layer.name for layer in g.layers] == ["convs/0", "convs/1", "fc"]
    assert g.layers[1].affine_paths == (
        ("params", "convs", "1", "bias"),
        ("params", "bn", "scale"),
        ("params", "bn", "bias"),
    )
    assert g.coupled_groups == ((0, 1), (2,))
    assert g.layers[2].sources == (
        InputSource(0, (0, 1, 2, 3), "residual"),
        InputSource(1, (0, 1, 2, 3), "residual"),
    )
    module.eval()
    apply_fn = nnx_apply_fn(graphdef)
    ours, ref = jax.jit(lambda s, x: (apply_fn(s, x), module(x)))(state, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(ref).max()) > 0


# ------------------------------------------------------------------------------------------
# The model zoo
# ------------------------------------------------------------------------------------------


def _zoo(name: str):
    """(model, abstract variables, abstract batch-1 input) of a zoo model (skips without zoo)."""
    models = pytest.importorskip("sculpt_jax.models", reason="model zoo not available yet")
    model = models.get_model(name)
    spec = models.model_spec(name)
    x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape)), KEY)
    return model, variables, x


@functools.cache
def _zoo_graph(name: str):
    model, variables, x = _zoo(name)
    return trace_model(model.apply, variables, x)


@pytest.fixture(scope="module")
def resnet20():
    return _zoo_graph("resnet20")


def test_resnet20_layers(resnet20):
    g = resnet20
    convs = [layer for layer in g.layers if layer.kind == "conv"]
    assert len(convs) == 19 and g.n_layers == 20 and g.layers[-1].name == "head"
    assert g.layers[0].name == "stem_conv"
    assert g.layers[0].affine_paths == (
        ("params", "stem_bn", "scale"),
        ("params", "stem_bn", "bias"),
    )
    assert all(len(layer.affine_paths) == 2 for layer in convs)
    assert g.layers[-1].affine_paths == (("params", "head", "bias"),)
    assert g.total_params == 269_722
    assert [layer.depth for layer in g.layers] == list(range(20))
    assert g.layers[7].name == "stage2_block0/conv1"
    assert (g.layers[7].strides, g.layers[7].out_spatial) == ((2, 2), (16, 16))
    assert g.output_sources == (InputSource(19, tuple(range(10)), "seq"),)


def test_resnet20_option_a_residual_structure(resnet20):
    g = resnet20
    stream = (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)  # stem + every block's conv2
    # Option A pads stage s's stream into the middle channels of stage s+1, where it is summed
    # with stage s+1's conv2 outputs, so all stream producers form ONE coupled group.
    assert g.coupled_groups == tuple(
        sorted([stream] + [(i,) for i in range(20) if i not in stream])
    )
    for layer in g.layers:
        if layer.name.endswith("conv2"):  # conv2 reads its own block's conv1 only
            assert layer.sources == (
                InputSource(layer.index - 1, tuple(range(layer.in_features)), "seq"),
            )
    assert g.layers[1].sources == (InputSource(0, tuple(range(16)), "seq"),)
    # stage2_block1/conv1 reads the sum of the padded stage-1 stream and stage2_block0/conv2
    pad16 = tuple([-1] * 8 + list(range(16)) + [-1] * 8)
    assert g.layers[9].sources == tuple(
        [InputSource(p, pad16, "residual") for p in (0, 2, 4, 6)]
        + [InputSource(8, tuple(range(32)), "residual")]
    )
    # head: stage-1 producers at channels 24..39, stage-2 at 16..47, stage-3 everywhere
    head = g.layers[19].sources
    assert [s.producer for s in head] == list(stream)
    assert all(s.kind == "residual" for s in head)
    assert head[0].channels == tuple([-1] * 24 + list(range(16)) + [-1] * 24)
    assert head[4].channels == tuple([-1] * 16 + list(range(32)) + [-1] * 16)
    assert head[7].channels == tuple(range(64))


def test_resnet20_b_projection_shortcuts():
    g = _zoo_graph("resnet20_b")
    names = [layer.name for layer in g.layers]
    sc = [i for i, n in enumerate(names) if "shortcut_conv" in n]
    assert [names[i] for i in sc] == ["stage2_block0/shortcut_conv", "stage3_block0/shortcut_conv"]
    assert g.n_layers == 22
    multi = [grp for grp in g.coupled_groups if len(grp) > 1]
    expect = []
    for stage in (1, 2, 3):
        grp = [names.index(f"stage{stage}_block{b}/conv2") for b in range(3)]
        grp.append(0 if stage == 1 else names.index(f"stage{stage}_block0/shortcut_conv"))
        expect.append(tuple(sorted(grp)))
    assert multi == expect
    s2 = g.layers[sc[0]]
    assert (s2.kernel_size, s2.strides, s2.affine_paths[0][-2]) == ((1, 1), (2, 2), "shortcut_bn")


def test_mobilenet_v2_depthwise_groups():
    g = _zoo_graph("mobilenet_v2")
    dw = [layer for layer in g.layers if "dw" in layer.name]
    assert len(dw) == 17
    for layer in dw:
        c = layer.in_features
        assert layer.groups == c == layer.out_features and layer.kernel_shape == (3, 3, 1, c)
        assert layer.macs == sum(layer.cell_positions) * c <= layer.n_positions * 9 * c
        assert layer.sources[0].channels == tuple(range(c))
    # inverted residuals couple the projection convs of equal-width blocks
    for grp in g.coupled_groups:
        if len(grp) > 1:
            assert all(g.layers[i].name.endswith("project_conv") for i in grp)


def test_vgg16_is_a_chain():
    g = _zoo_graph("vgg16")
    kinds = [layer.kind for layer in g.layers]
    assert kinds.count("conv") == 13 and kinds[:13] == ["conv"] * 13
    assert all(k == "dense" for k in kinds[13:])
    assert g.coupled_groups == tuple((i,) for i in range(g.n_layers))
    for layer in g.layers[1:]:
        assert [(s.producer, s.kind) for s in layer.sources] == [(layer.index - 1, "seq")]
    assert [layer.depth for layer in g.layers] == list(range(g.n_layers))


def test_vit_small_attention_and_mlp():
    g = _zoo_graph("vit_small")
    by_name = {layer.name: layer for layer in g.layers}
    d = 192
    assert g.n_layers == 1 + 6 * 6 + 1
    for i in range(6):
        q = by_name[f"block{i}/attn/query"]
        v = by_name[f"block{i}/attn/value"]
        out = by_name[f"block{i}/attn/out"]
        fc1, fc2 = by_name[f"block{i}/mlp_fc1"], by_name[f"block{i}/mlp_fc2"]
        assert q.kernel_shape == (d, 3, 64)
        assert (q.kernel_in_axes, q.kernel_out_axes, q.out_features) == ((0,), (1, 2), d)
        assert q.affine_paths == ((*q.kernel_path[:-1], "bias"),)
        assert q.n_positions == 65
        assert (out.kernel_in_axes, out.kernel_out_axes, out.in_features) == ((0, 1), (2,), d)
        # softmax(q.k^T) is always alive; v's channels survive the contraction over keys
        assert [(s.producer, s.kind) for s in out.sources] == [
            (-1, "residual"),
            (v.index, "residual"),
        ]
        assert out.sources[1].channels == tuple(range(d))
        assert (fc1.kernel_in_axes, fc1.kernel_out_axes, fc1.out_features) == ((0,), (1,), 768)
        assert fc2.sources == (InputSource(fc1.index, tuple(range(768)), "seq"),)
    stream = tuple(
        sorted(
            [0]
            + [by_name[f"block{i}/{n}"].index for i in range(6) for n in ("attn/out", "mlp_fc2")]
        )
    )
    assert stream in g.coupled_groups
    assert g.layers[0].kind == "conv" and g.layers[0].strides == (4, 4)


# ------------------------------------------------------------------------------------------
# FLOPs against XLA and tracing time
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "resnet20_b", "vgg16", "mobilenet_v2", "vit_small"])
def test_flops_match_xla_cost_analysis(name):
    model, abstract, x = _zoo(name)
    g = _zoo_graph(name)
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    cost = (
        jax.jit(model.apply).lower(variables, np.zeros(x.shape, x.dtype)).compile().cost_analysis()
    )
    xla = cost["flops"] + cost.get("transcendentals", 0.0)
    # Like XLA, Layer.macs counts only in-bounds taps of padded convs.
    assert g.dense_flops == 2 * g.dense_macs + g.other_flops
    assert abs(g.dense_flops / xla - 1) < 0.02, (g.dense_flops, xla)


@pytest.mark.parametrize("name", ["resnet50", "vit_b16"])
def test_large_model_structure(name):
    """ResNet-50: 53 convs + 1 dense, each stage's projection shortcut coupled with its blocks'
    conv3; ViT-B/16: patch conv, q/k/v/out and MLP denses of 12 blocks, the residual stream
    (patch embedding, every attn/out and mlp_fc2) one coupled group. Timing: benchmarks/trace_graph.py."""
    model, variables, x = _zoo(name)
    g = trace_model(model.apply, variables, x)
    kinds = [layer.kind for layer in g.layers]
    big = [grp for grp in g.coupled_groups if len(grp) > 1]
    names = lambda grp: {g.layers[i].name for i in grp}  # noqa: E731
    if name == "resnet50":
        assert kinds.count("conv") == 53 and kinds.count("dense") == 1
        assert [len(grp) for grp in big] == [4, 5, 7, 4]  # 1 shortcut + 3/4/6/3 blocks' conv3
        for s, grp in enumerate(big, start=1):
            assert f"stage{s}_block0/shortcut_conv" in names(grp)
            assert all(n.endswith(("conv3", "shortcut_conv")) for n in names(grp))
    else:
        assert kinds.count("conv") == 1 and kinds.count("dense") == 73
        assert [len(grp) for grp in big] == [25]
        assert names(big[0]) == {"patch_embed"} | {
            f"block{b}/{n}" for b in range(12) for n in ("attn/out", "mlp_fc2")
        }
        q, out = g.layers[1], g.layers[4]
        assert (q.name, q.kernel_in_axes, q.kernel_out_axes) == ("block0/attn/query", (0,), (1, 2))
        assert (out.name, out.kernel_in_axes, out.kernel_out_axes) == (
            "block0/attn/out",
            (0, 1),
            (2,),
        )
    assert g.n_layers == {"resnet50": 54, "vit_b16": 74}[name]
