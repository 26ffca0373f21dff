"""Physical compaction (sculpt_jax.compaction): compact forward == masked forward, exact param relation,
kernel cropping, export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sculpt_jax import compaction as C
from sculpt_jax import masking, trace
from sculpt_jax.models import get_model, init_model
from sculpt_jax.tree_util import map_with_path
from sculpt_jax.types import ALWAYS_ALIVE

MODELS = {  # name: (input hw, model kwargs)
    "resnet8_tiny": (8, {}),
    "resnet20": (8, {}),
    "mobilenet_v2_tiny": (16, {}),
    "vgg_tiny": (16, {}),
    "vit_tiny": (16, {}),
}
_CACHE: dict = {}


def _perturb(variables, key):
    """Random non-trivial BN statistics / affine params (so fills are not trivially zero)."""

    def f(path, x):
        k = jax.random.fold_in(key, hash(path) % (1 << 30))
        n = jax.random.normal(k, x.shape, x.dtype)
        if path[-1] == "var":
            return 0.5 + jnp.abs(n)
        if x.ndim == 1:
            return x + 0.3 * n
        return x

    return map_with_path(f, variables)


def setup(name):
    if name not in _CACHE:
        hw, kw = MODELS[name]
        model = get_model(name, **kw)
        v = init_model(model, jax.random.key(0), (hw, hw, 3))
        v = _perturb(v, jax.random.key(1))
        x = jax.random.normal(jax.random.key(2), (2, hw, hw, 3), jnp.float32)
        graph = trace.trace_model(model.apply, v, x)
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
        _CACHE[name] = (model, v, x, graph, fwd)
    return _CACHE[name]


def random_pattern_masks(graph, v, seed, low=0):
    rng = np.random.default_rng(seed)
    ids = {
        i: jnp.asarray(rng.integers(low, 6, layer.out_features), jnp.int32)
        for i, layer in enumerate(graph.layers)
    }
    return masking.pattern_ids_to_masks(graph, v, ids)


def structured_masks(graph, v):
    """Whole filters removed: the weakest half of every layer but the head, and filters 0 and 1 of
    EVERY member of each coupled (residual) group, so whole residual-stream channels die."""
    last = graph.n_layers - 1
    ids = {}
    for group in graph.coupled_groups:
        for li in group:
            layer = graph.layers[li]
            f = layer.out_features
            if li == last or f < 4:
                continue
            kernel = masking._kernel_of(v, layer)
            sampled = jnp.asarray([0] * (f // 2) + [5] * (f - f // 2), jnp.int32)
            layer_ids = np.array(masking.place_by_importance(kernel, layer, sampled))
            if len(group) > 1:
                layer_ids[:2] = 0
            ids[li] = jnp.asarray(layer_ids)
    return masking.pattern_ids_to_masks(graph, v, ids)


def check(name, masks, batch=None):
    model, v, x, graph, fwd = setup(name)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x)
    xs = x if batch is None else jax.random.normal(jax.random.key(3), (batch, *x.shape[1:]))
    ref = fwd(masking.apply_masks(v, masks), xs)
    out = fn(cv, xs)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=0)
    # documented exact relation to the exact counter
    assert info["params"] == (
        info["masked_params"] - info["dropped_kernel_entries"] - info["dropped_affine_entries"]
    )
    return fn, cv, info


@pytest.mark.parametrize("name", list(MODELS))
def test_random_patterns_equal_masked_and_params_exact(name):
    _, v, _, graph, _ = setup(name)
    # ids 1..5: no filter removed -> nothing read from a dead channel -> params == exact count
    masks = random_pattern_masks(graph, v, seed=0, low=1)
    _, _, info = check(name, masks)
    assert info["dropped_kernel_entries"] == 0 and info["dropped_affine_entries"] == 0
    assert info["params"] == info["masked_params"]


@pytest.mark.parametrize("name", list(MODELS))
def test_structured_masks_equal_masked_and_shrink(name):
    _, v, _, graph, _ = setup(name)
    masks = structured_masks(graph, v)
    _, cv, info = check(name, masks, batch=3)  # another batch size than the sample's
    assert info["stored_params"] < info["dense_stored_params"]
    pruned = [d for d in info["layers"] if d["out_after"] < d["out_before"]]
    assert pruned, "no layer lost filters"
    if name.startswith("resnet"):
        # a consumer of the residual stream reads fewer channels: stream channels were dropped
        shrunk_stream = [
            d
            for d in info["layers"]
            if any(s.kind == "residual" for s in graph.layers[d["index"]].sources)
            and d["in_after"] < d["in_before"]
        ]
        assert shrunk_stream
        assert info["dropped_kernel_entries"] > 0


def test_mixed_random_patterns_with_removal():
    _, v, _, graph, _ = setup("resnet8_tiny")
    check("resnet8_tiny", random_pattern_masks(graph, v, seed=1, low=0))


def test_option_a_shortcut_channels_dropped_exactly():
    """Option-A zero-padded channels and removed stem filters never reach a conv as width."""
    _, v, _, graph, _ = setup("resnet8_tiny")
    masks = structured_masks(graph, v)
    _, _, info = check("resnet8_tiny", masks)
    by_index = {d["index"]: d for d in info["layers"]}
    for layer in graph.layers:
        d = by_index[layer.index]
        feeders = [s for s in layer.sources if s.producer != ALWAYS_ALIVE]
        if feeders and d["in_after"] < d["in_before"]:
            assert d["kernel_after"][layer.kernel_in_axes[0]] == d["in_after"]


def _primitives(jaxpr, acc=None):
    acc = set() if acc is None else acc
    for e in jaxpr.eqns:
        acc.add(e.primitive.name)
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(sub, "jaxpr"):
                    _primitives(sub.jaxpr, acc)
    return acc


def test_unpruned_compacts_to_dense_ops():
    """Without pruning, option-A shortcuts' zero channels are re-expanded by a pad (as in the
    model), never a gather + select (that cost ~10% of an unpruned ResNet-56 on XLA:CPU)."""
    model, v, x, graph, fwd = setup("resnet20")
    fn, cv, _ = C.compact(model.apply, v, graph, None, x)
    prims = _primitives(jax.make_jaxpr(fn)(cv, x).jaxpr)
    assert "pad" in prims
    assert not {"gather", "select_n"} & prims, prims
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(fwd(v, x)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("idx, target, fill", [
    ([2, 3, 4], range(8), 0.0),        # one run, zero fill: pad
    ([0, 1, 2, 3], range(6), 1.5),     # run at the start, constant nonzero fill: pad
    ([1, 2, 5], [1, 2], 0.0),          # a contiguous subset: slice
    ([1, 3, 4], range(6), 0.0),        # two runs: gather + select
    ([2, 3], range(5), None),          # differing fills: gather + select
])  # fmt: skip
def test_expand_matches_reference(idx, target, fill):
    width, idx, target = 8, np.asarray(idx), np.asarray(list(target))
    fills = np.arange(width, dtype=np.float32) + 1 if fill is None else np.full(width, fill, np.float32)
    val = jax.random.normal(jax.random.key(0), (2, 3, len(idx)))
    full = np.broadcast_to(fills, (2, 3, width)).copy()
    full[..., idx] = np.asarray(val)
    a = C._A(val, C._Rep(2, idx, width, fills))
    np.testing.assert_array_equal(np.asarray(C._expand(a, 2, target)), full[..., target])


@pytest.mark.parametrize("pid, shape", [(3, (3, 2)), (4, (2, 3))])
def test_kernel_cropping(pid, shape):
    _, v, _, graph, _ = setup("vgg_tiny")
    li = next(i for i, la in enumerate(graph.layers) if la.kernel_size == (3, 3) and i > 0)
    layer = graph.layers[li]
    masks = masking.pattern_ids_to_masks(
        graph, v, {li: jnp.full((layer.out_features,), pid, jnp.int32)}
    )
    _, _, info = check("vgg_tiny", masks)
    d = next(d for d in info["layers"] if d["index"] == li)
    assert tuple(d["kernel_after"][:2]) == shape
    assert d["cropped"]
    assert info["params"] == info["masked_params"]
    # without cropping the kernel stays 3x3 and the output is the same
    model, vv, x, _, _ = setup("vgg_tiny")
    fn2, cv2, info2 = C.compact(model.apply, vv, graph, masks, x, crop=False)
    d2 = next(d for d in info2["layers"] if d["index"] == li)
    assert tuple(d2["kernel_after"][:2]) == (3, 3)


@pytest.mark.parametrize("align", [1, 4])  # the pipeline exports with auto_align() (16 on CPU)
def test_export_round_trip(tmp_path, align):
    model, v, x, graph, fwd = setup("resnet8_tiny")
    masks = structured_masks(graph, v)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, align=align)
    ref = fwd(masking.apply_masks(v, masks), x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    C.save_compact(tmp_path / "m", cv, info)
    fn2, cv2, info2 = C.load_compact(tmp_path / "m", model.apply)
    assert sorted(cv2) == sorted(cv)
    for k in cv:
        np.testing.assert_array_equal(cv2[k], cv[k])
    np.testing.assert_array_equal(np.asarray(fn2(cv2, x)), np.asarray(fn(cv, x)))
    assert info2["params"] == info["params"]
    with pytest.raises(FileNotFoundError, match="save_compact"):
        C.load_compact(tmp_path / "nothing", model.apply)


def test_measure_latency_fields():
    _, v, x, _, fwd = setup("resnet8_tiny")
    r = C.measure_latency(lambda v, x: fwd(v, x), v, x, repeats=3, warmup=1)
    assert set(r) >= {"median_ms", "p10", "p90"}
    assert 0 < r["p10"] <= r["median_ms"] <= r["p90"]


@pytest.mark.parametrize("name", ["resnet8_tiny", "vit_tiny"])
def test_compacted_at_batch_one_runs_at_other_batches(name):
    # At batch 1 the jaxpr has no broadcast of ViT's [1, 1, D] class token; at batch > 1 it has:
    # parameter-only equations must not shift the plan's equation numbering.
    model, v, x, graph, fwd = setup(name)
    masks = structured_masks(graph, v)
    fn, cv, _ = C.compact(model.apply, v, graph, masks, x[:1])
    for b in (1, 3):
        xs = jax.random.normal(jax.random.key(b), (b, *x.shape[1:]))
        ref = fwd(masking.apply_masks(v, masks), xs)
        np.testing.assert_allclose(np.asarray(fn(cv, xs)), np.asarray(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2_tiny", "vit_tiny"])
def test_align_pads_storage_not_outputs_or_counts(name):
    model, v, x, graph, fwd = setup(name)
    masks = structured_masks(graph, v)
    _, cv1, info1 = C.compact(model.apply, v, graph, masks, x)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, align=8)
    ref = fwd(masking.apply_masks(v, masks), x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    for k in ("params", "dropped_kernel_entries", "dropped_affine_entries", "masked_params"):
        assert info[k] == info1[k], k
    assert info["stored_params"] > info1["stored_params"] == sum(np.size(a) for a in cv1.values())
    grew = 0
    for d in info["layers"]:
        assert all(s >= k for s, k in zip(d["kernel_stored"], d["kernel_after"], strict=True)), d
        grew += d["kernel_stored"] != d["kernel_after"]
        if len(d["kernel_after"]) == 4 and d["kernel_after"][2] > 1:  # conv HWIO, not depthwise
            n = d["kernel_stored"][3]
            assert n % 8 == 0 or n == d["out_before"], d
    assert grew, "no layer was padded"


def test_auto_align_by_backend():
    assert C.auto_align("cpu") == 16  # one AVX-512 vector of float32 (benchmarks/latency.py)
    assert C.auto_align("gpu") == C.auto_align("tpu") == 1  # not measured there: no padding
    assert C.auto_align() == C.auto_align(jax.default_backend())


def test_align_rejects_bad_values():
    model, v, x, graph, _ = setup("resnet8_tiny")
    with pytest.raises(C.CompactError, match="align must be an int >= 1"):
        C.compact(model.apply, v, graph, None, x, align=0)


def test_apply_fn_closing_over_constants():
    # The pipeline's uint8 -> normalise -> model wrapper: its mean/std constants are broadcast to
    # the batch only when it is > 1 (this used to fail with a KeyError at another batch size).
    from sculpt_jax.pipeline import make_apply_fn

    model, v, x, graph, _ = setup("resnet8_tiny")
    apply = make_apply_fn(model, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    x1 = jnp.zeros((1, *x.shape[1:]), jnp.uint8)
    fn, cv, _ = C.compact(apply, v, trace.trace_model(apply, v, x1), None, x1)
    xb = jax.random.randint(jax.random.key(1), (4, *x.shape[1:]), 0, 256).astype(jnp.uint8)
    np.testing.assert_allclose(np.asarray(fn(cv, xb)), np.asarray(apply(v, xb)), atol=1e-4, rtol=0)


class _PerChannelNet(nn.Module):
    """conv -> a per-channel parameter `t` applied as `op` -> relu -> conv -> dense."""

    op: str

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(8, (3, 3))(x)
        t = self.param("t", lambda k, s: 1.0 + jax.random.uniform(k, s), (8,))
        y = {"div": lambda: y / t, "exp_bias": lambda: y + jnp.exp(t), "mul": lambda: y * t}[
            self.op
        ]()
        y = nn.Conv(8, (3, 3))(nn.relu(y))
        return nn.Dense(10)(y.mean((1, 2)))


@pytest.mark.parametrize(
    "op, affine, zeroed",
    [("div", True, False), ("exp_bias", False, False), ("mul", True, True)],
)
def test_per_channel_parameter_kinds(op, affine, zeroed):
    # A divisor `y / t` is removed with its filter but never zeroed (0 / 0 made the masked model
    # NaN); `y + exp(t)` is no bias (zeroing t gives y + 1, a different model), so masks keep it.
    model = _PerChannelNet(op)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    v = model.init(jax.random.key(1), x)
    graph = trace.trace_model(model.apply, v, x)
    layer = graph.layers[0]
    assert (("params", "t") in layer.affine_paths) == affine
    assert (("params", "t") in layer.zeroed_affine_paths) == zeroed
    ids = {0: jnp.asarray([0, 0, 1, 2, 3, 4, 5, 5], jnp.int32)}  # two filters removed (0: empty)
    masks = masking.pattern_ids_to_masks(graph, v, ids)
    np.testing.assert_array_equal(np.asarray(masks["t"]), [0, 0, 1, 1, 1, 1, 1, 1] if zeroed else 1)
    masked = masking.apply_masks(v, masks)
    ref = model.apply(masked, x)
    assert bool(jnp.isfinite(ref).all())
    fn, cv, info = C.compact(model.apply, v, graph, masks, x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-5, rtol=0)
    assert info["params"] == (
        info["masked_params"] - info["dropped_kernel_entries"] - info["dropped_affine_entries"]
    )
