"""Tests of the model zoo (`sculpt_jax.models`): exact param counts, shapes, BN modes, shortcuts.

Big models are only shape-evaluated (`jax.eval_shape`, one cached trace per model): nothing large
is materialised or compiled.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax.models import get_model, init_model, list_models, model_spec
from sculpt_jax.models.resnet_cifar import BasicBlock, pad_shortcut
from sculpt_jax.models.vgg import VGG, VGG_TINY_CFG
from sculpt_jax.tree_util import flatten_with_paths, map_with_path

KEY = jax.random.key(0)
TINY = (
    "resnet8_tiny",
    "vgg_tiny",
    "mobilenet_v1_tiny",
    "mobilenet_v2_tiny",
    "resnet50_tiny",
    "vit_tiny",
)


@functools.cache
def _abstract(name: str, kwargs: tuple = (), num_classes: int | None = None):
    """(logits ShapeDtypeStruct, abstract variables) of `name` at batch 2: one trace, cached."""
    model = get_model(name, num_classes, **dict(kwargs))
    x = jax.ShapeDtypeStruct((2, *model_spec(name).input_shape), jnp.float32)
    return jax.eval_shape(lambda k, x: model.init_with_output(k, x, train=False), KEY, x)


def _abstract_vars(name: str, **kwargs):
    return _abstract(name, tuple(sorted(kwargs.items())))[1]


def _n_params(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def _cifar_resnet_hand_count(n: int, num_classes: int = 10, option: str = "A") -> int:
    """Hand count of He et al.'s CIFAR ResNet-(6n+2): 3x3 convs, BN (scale+bias), dense head."""
    convs = 3 * 9 * 16  # stem
    convs += 2 * n * 9 * 16 * 16  # stage 1
    convs += 9 * 16 * 32 + (2 * n - 1) * 9 * 32 * 32  # stage 2
    convs += 9 * 32 * 64 + (2 * n - 1) * 9 * 64 * 64  # stage 3
    bn = 2 * (16 + 2 * n * (16 + 32 + 64))
    head = 64 * num_classes + num_classes
    shortcut = (16 * 32 + 2 * 32 + 32 * 64 + 2 * 64) if option == "B" else 0
    return convs + bn + head + shortcut


# --- exact parameter counts ---------------------------------------------------------------------


# CIFAR ResNets, option A (parameter-free shortcuts, as in the paper / akamaster's reference, whose
# own count prints 269,722 for ResNet-20 = the published "0.27M"). The often-quoted 272,474 /
# 855,770 / 1,730,714 are the option-B counts: + 2,752 = 1x1 convs 16*32 + 32*64 and their BN.
@pytest.mark.parametrize(
    "name, n, expected",
    [
        ("resnet20", 3, 269_722),
        ("resnet56", 9, 853_018),
        ("resnet110", 18, 1_727_962),
        ("resnet20_b", 3, 272_474),
        ("resnet56_b", 9, 855_770),
        ("resnet110_b", 18, 1_730_714),
    ],
)
def test_cifar_resnet_param_counts(name, n, expected):
    v = _abstract_vars(name)
    option = "B" if name.endswith("_b") else "A"
    assert _cifar_resnet_hand_count(n, option=option) == expected
    assert _n_params(v) == expected


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet50", {}, 25_557_032),  # torchvision resnet50
        ("mobilenet_v2_imagenet", {}, 3_504_872),  # torchvision mobilenet_v2
        ("mobilenet_v1_imagenet", {}, 4_231_976),  # Howard et al. 2017, 4.2M
        ("vit_b16", {}, 86_567_656),  # torchvision vit_b_16
        ("vgg16_imagenet", {"conv_bias": True}, 138_365_992),  # torchvision vgg16_bn
        ("vgg16_imagenet", {}, 138_365_992 - 4_224),  # bias-free convs before BN (house style)
    ],
)
def test_imagenet_param_counts(name, kwargs, expected):
    v = _abstract_vars(name, **kwargs)
    assert _n_params(v) == expected


def test_vit_b16_attention_out_projection_is_separate_leaf():
    v = _abstract_vars("vit_b16")
    flat = flatten_with_paths(v)
    assert flat[("params", "block0", "attn", "out", "kernel")].shape == (12, 64, 768)
    assert flat[("params", "block11", "attn", "query", "kernel")].shape == (768, 12, 64)
    assert flat[("params", "pos_embedding")].shape == (1, 197, 768)
    assert flat[("params", "patch_embed", "kernel")].shape == (16, 16, 3, 768)


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_shape_evaluates(name):
    spec = model_spec(name)
    assert spec.name == name and len(spec.input_shape) == 3
    out, v = _abstract(name)
    assert out.shape == (2, spec.num_classes) and out.dtype == jnp.float32
    assert set(v) <= {"params", "batch_stats"} and _n_params(v) > 0
    assert v["params"]["head"]["kernel"].shape[-1] == spec.num_classes


@pytest.mark.parametrize(
    "name, head_in",
    [
        ("vgg16", 512),  # CIFAR VGG head: global pool of 1x1x512 -> classes
        ("resnet8_tiny", 16),
        ("mobilenet_v1_tiny", 32),
        ("mobilenet_v2_tiny", 32),
        ("resnet50_tiny", 32),
        ("vit_tiny", 16),
    ],
)
def test_num_classes_override_changes_only_the_head(name, head_in):
    out, v = _abstract(name, (), 7)
    _, v10 = _abstract(name)
    assert out.shape == (2, 7)
    assert v["params"]["head"]["kernel"].shape == (head_in, 7)
    assert _n_params(v10) - _n_params(v) == 3 * (head_in + 1)


def test_registry_names_and_spec():
    names = list_models()
    expected = {f"resnet{d}{s}" for d in (20, 32, 44, 56, 110) for s in ("", "_b")}
    expected |= {"vgg16", "vgg19", "vgg16_imagenet", "vgg19_imagenet", "mobilenet_v1"}
    expected |= {"mobilenet_v2", "mobilenet_v1_imagenet", "mobilenet_v2_imagenet", "resnet50"}
    expected |= {"vit_b16", "vit_small", *TINY}
    assert set(names) == expected and names == sorted(names)
    spec = model_spec("ResNet20")
    assert (spec.family, spec.input_shape, spec.num_classes) == ("resnet_cifar", (32, 32, 3), 10)
    assert model_spec("vit_b16").input_shape == (224, 224, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_classes = 100
    assert get_model("resnet20").shortcut == "A" and get_model("resnet20_b").shortcut == "B"
    assert get_model("resnet20", shortcut="B").shortcut == "B"


def test_unknown_name_lists_close_matches_first():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as err:
        get_model("resnet21")
    listed = str(err.value).split("closest first): ")[1].split(", ")
    assert listed[0] in ("resnet20", "resnet32") and sorted(listed) == list_models()
    with pytest.raises(ValueError, match="mobilenet_v2"):
        model_spec("mobilenetv2")


def test_bad_num_classes_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet20", num_classes=0)


# --- forward behaviour on the tiny models (each test compiles at most one jitted function) ------


def _fill(abstract, seed: int = 0):
    """Concrete variables for an abstract variables tree, from numpy (no XLA RNG compile).

    BN / LN scale and running var -> 1, biases and running mean -> 0, other leaves
    N(0, 1 / fan_in) with fan_in = prod(shape[:-1]).
    """
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if path[-1] in ("scale", "var"):
            return np.ones(a.shape, np.float32)
        if path[-1] in ("bias", "mean"):
            return np.zeros(a.shape, np.float32)
        fan_in = max(1, int(np.prod(a.shape[:-1])))
        return (rng.normal(size=a.shape) / np.sqrt(fan_in)).astype(np.float32)

    return map_with_path(leaf, abstract)


@functools.cache
def _tiny_vars(name: str):
    """Concrete variables of tiny model `name` at its spec input shape (numpy-filled, cached)."""
    return _fill(_abstract(name)[1])


def _inputs(shape, seed=0, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


def test_init_model_matches_abstract_shapes_and_is_deterministic():
    """The one real (RNG-compiling) init of the file: jitted, train=False, keyed."""
    model = get_model("resnet8_tiny")
    partitionable = bool(jax.config.jax_threefry_partitionable)
    v = init_model(model, KEY, (32, 32, 3), batch=2)
    assert jax.config.jax_threefry_partitionable == partitionable  # init_model's switch is scoped
    abstract = _abstract("resnet8_tiny")[1]
    assert jax.tree.structure(v) == jax.tree.structure(abstract)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(abstract), strict=True):
        assert a.shape == b.shape and a.dtype == jnp.float32
    bn = v["params"]["stage1_block0"]["bn1"]
    np.testing.assert_array_equal(bn["scale"], np.ones(4))
    np.testing.assert_array_equal(bn["bias"], np.zeros(4))
    np.testing.assert_array_equal(v["batch_stats"]["stem_bn"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(v["batch_stats"]["stem_bn"]["var"], np.ones(4))
    # He-normal (fan_in) conv kernels: std sqrt(2 / (3 * 3 * 16)) for the 16 -> 16 stage-3 convs.
    k = np.asarray(v["params"]["stage3_block0"]["conv2"]["kernel"])
    assert abs(k.std() / np.sqrt(2 / (9 * 16)) - 1) < 0.1
    v_again = init_model(model, KEY, (32, 32, 3), batch=2)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_again), strict=True):
        np.testing.assert_array_equal(a, b)
    v_other = init_model(model, jax.random.key(1), (32, 32, 3), batch=2)
    assert not np.array_equal(k, v_other["params"]["stage3_block0"]["conv2"]["kernel"])


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_and_determinism(name):
    spec = model_spec(name)
    model = get_model(name)
    v = _tiny_vars(name)
    assert jax.tree.leaves(v["params"])[0].dtype == jnp.float32
    x = _inputs((3, *spec.input_shape), seed=1)
    n_traces = []

    @jax.jit
    def forward(v, x):
        n_traces.append(1)
        return model.apply(v, x), model.apply(v, x[:1])

    y, y1 = forward(v, x)
    assert y.shape == (3, 10) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    # Same shapes: no retrace, bit-identical output.
    np.testing.assert_array_equal(np.asarray(forward(v, x)[0]), np.asarray(y))
    assert len(n_traces) == 1
    # Eval mode is per-example: the first example's logits do not depend on the others.
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        "resnet20",
        "resnet20_b",
        "resnet8_tiny",
        "vgg16",
        "vgg19",
        "vgg_tiny",
        "mobilenet_v1",
        "mobilenet_v2",
        "mobilenet_v1_tiny",
        "mobilenet_v2_tiny",
        "vit_small",
        "vit_tiny",
    ],
)
def test_cifar_models_take_small_grayscale_input(name):
    """The digits dataset is 8x8x1: CIFAR-style models must not hard-code 32x32x3."""
    model = get_model(name)
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    out, v = jax.eval_shape(lambda k, x: model.init_with_output(k, x), KEY, x)
    assert out.shape == (2, 10)
    _, v32 = _abstract(name)  # only the first layer's C_in (and ViT's pos-emb length) change
    diff = {
        p for p, a in flatten_with_paths(v).items() if a.shape != flatten_with_paths(v32)[p].shape
    }
    allowed = {("params", "stem_conv", "kernel"), ("params", "conv1_1", "kernel")}
    allowed |= {("params", "patch_embed", "kernel"), ("params", "pos_embedding")}
    assert diff and diff <= allowed


def test_vit_rejects_input_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        jax.eval_shape(lambda k: init_model(get_model("vit_tiny"), k, (12, 12, 3)), KEY)


def test_batchnorm_train_updates_stats_eval_uses_them():
    model = get_model("resnet8_tiny")
    v = _tiny_vars("resnet8_tiny")
    x = _inputs((4, 32, 32, 3), seed=2, scale=2.0, shift=1.0)

    @jax.jit
    def run(v, x):
        y_train, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        h = jax.lax.conv_general_dilated(
            x,
            v["params"]["stem_conv"]["kernel"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y_train, updates, model.apply(v, x, train=False), h

    y_train, updates, y_eval, h = jax.device_get(run(v, x))
    # Golden: running stats = 0.9 * init + 0.1 * batch stats of the stem conv output.
    stem = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stem["mean"], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4)
    # Every BN layer's stats moved.
    moved = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), v["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(moved)) and len(jax.tree.leaves(moved)) == 2 * 7
    # Eval mode uses the running stats, train mode the batch stats: the logits differ.
    assert not np.allclose(y_eval, y_train, atol=1e-4)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(v, x, train=True)  # train without mutable=["batch_stats"] must fail


def test_option_a_shortcut_is_parameter_free_option_b_has_projections():
    va = _abstract_vars("resnet8_tiny")
    vb = _abstract_vars("resnet8_tiny", shortcut="B")
    assert set(va["params"]["stage2_block0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert set(va["batch_stats"]["stage2_block0"]) == {"bn1", "bn2"}
    assert set(vb["params"]["stage2_block0"]) == {
        *("conv1", "bn1", "conv2", "bn2"),
        *("shortcut_conv", "shortcut_bn"),
    }
    assert vb["params"]["stage2_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 4, 8)
    assert vb["params"]["stage3_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 8, 16)
    assert "bias" not in vb["params"]["stage3_block0"]["shortcut_conv"]
    assert "shortcut_conv" not in vb["params"]["stage1_block0"]  # identity where shapes match
    assert _n_params(vb) - _n_params(va) == (4 * 8 + 2 * 8) + (8 * 16 + 2 * 16)


def test_pad_shortcut_subsamples_and_centres_channels():
    x = np.arange(1 * 4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)
    y = np.asarray(pad_shortcut(x, 6, 2))
    assert y.shape == (1, 2, 2, 6)
    np.testing.assert_array_equal(y[..., 2:4], x[:, ::2, ::2, :])
    assert np.abs(y[..., :2]).sum() + np.abs(y[..., 4:]).sum() == 0.0
    # odd sizes: ceil(H / 2), like a padded stride-2 conv
    np.testing.assert_array_equal(pad_shortcut(x[:, :3, :3], 2, 2), x[:, :3:2, :3:2])
    with pytest.raises(ValueError, match="shortcut='B'"):
        pad_shortcut(x, 1, 1)


def test_option_a_block_with_zeroed_branch_is_padded_identity():
    """With the residual branch's last BN scale zeroed, a downsampling block is relu(shortcut)."""
    block = BasicBlock(8, 2, "A")
    x = _inputs((2, 6, 6, 4), seed=3)

    v = _fill(jax.eval_shape(block.init, KEY, x))
    v["params"]["bn2"]["scale"] = np.zeros(8, np.float32)

    @jax.jit
    def run(v, x):
        return block.apply(v, x), nn.relu(pad_shortcut(x, 8, 2))

    y, expected = run(v, x)
    assert y.shape == (2, 3, 3, 8)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_convs_are_traceable_param_ops():
    """Each conv is one conv_general_dilated on a param-leaf kernel (what trace.py relies on)."""
    model = get_model("resnet8_tiny")
    v = _abstract_vars("resnet8_tiny")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(v, x))
    flat = flatten_with_paths(v)
    kernels = [p for p in flat if p[-1] == "kernel" and p[-2] != "head"]
    assert jaxpr.count("conv_general_dilated[") == len(kernels) == 7  # stem + 3 x 2; A adds none
    assert ("params", "stage1_block0", "conv1", "kernel") in flat
    assert ("params", "stem_conv", "bias") not in flat  # bias-free convs before BN
    assert flat[("params", "head", "bias")].shape == (10,)


def test_mobilenet_depthwise_kernels():
    flat = flatten_with_paths(_abstract_vars("mobilenet_v2_imagenet"))
    assert flat[("params", "block1", "dw_conv", "kernel")].shape == (3, 3, 1, 96)
    assert ("params", "block0", "expand_conv", "kernel") not in flat  # t = 1: no expansion
    assert flat[("params", "last_conv", "kernel")].shape == (1, 1, 320, 1280)
    flat1 = flatten_with_paths(_abstract_vars("mobilenet_v1_imagenet"))
    assert flat1[("params", "block12", "dw_conv", "kernel")].shape == (3, 3, 1, 1024)


def test_vgg_imagenet_head_dropout_only_in_training():
    model = VGG(cfg=VGG_TINY_CFG, head_type="imagenet", hidden=8, num_classes=5)
    x = _inputs((2, 28, 28, 3), seed=4)

    v = jax.eval_shape(lambda k: model.init(k, x), KEY)
    assert v["params"]["fc1"]["kernel"].shape == (7 * 7 * 16, 8)  # 28 / 2 / 2 = 7

    @jax.jit
    def run(v, x, key):
        k0, k1 = jax.random.split(key)
        train = lambda k: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k}
        )[0]
        return model.apply(v, x), model.apply(v, x), train(k0), train(k1)

    e1, e2, t0, t1 = run(_fill(v), x, KEY)
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(np.asarray(t0), np.asarray(t1))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), v)


def test_bad_model_keyword_rejected():
    with pytest.raises(ValueError, match="bad keyword for model 'resnet20'.*ResNetCIFAR"):
        get_model("resnet20", widht=3)
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
        jax.eval_shape(lambda k: init_model(get_model("resnet20", shortcut="C"), k, (8, 8, 1)), KEY)


def test_register_model_makes_a_user_model_nameable():
    import flax.linen as nn

    from sculpt_jax import models

    class Tiny(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(self.num_classes)(nn.Conv(4, (3, 3))(x).mean((1, 2)))

    models.register_model("my_tiny", Tiny, input_shape=(8, 8, 1), num_classes=7,
                          description="a test model")  # fmt: skip
    try:
        spec = model_spec("MY_TINY")
        assert (spec.family, spec.input_shape, spec.num_classes) == ("user", (8, 8, 1), 7)
        model = get_model("my_tiny")
        assert isinstance(model, Tiny) and model.num_classes == 7
        assert get_model("my_tiny", num_classes=3).num_classes == 3
        assert "my_tiny" in list_models()
        with pytest.raises(ValueError, match="is a zoo model"):
            models.register_model("resnet20", Tiny, input_shape=(8, 8, 1), num_classes=7)
    finally:
        models._REGISTRY.pop("my_tiny", None)
