"""Per-layer latency tables (`sculpt_jax.latency`) and the latency-targeting decoder: the table is
measured once (a fake, deterministic timer: fast and exact) and reused from its JSON form, its key
changes with the model and the backend, the prediction is monotone and equals the measured dense
latency at the dense model, every random proposal decodes within the tolerance of a latency target,
and an unreachable target or a missing table fail before any work."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax import decode, latency, trace
from sculpt_jax import graph as graph_lib
from sculpt_jax import patterns as pat
from sculpt_jax.models import get_model, init_model

MODELS = ("resnet8_tiny", "mobilenet_v2_tiny")


def _cost(c_in, c_out, unit=None):
    """A filter op 1e-3 * c_in * c_out + 0.01 ms; a grouped unit its share of the 9 taps (one tap,
    or its box's cells) of the same, plus the same 0.01 per op."""
    cells = 9 if unit is None else 1 if unit == "tap" else _box_cells(unit)
    return 1e-3 * c_in * c_out * cells / 9 + 0.01


def _box_cells(unit):
    r0, r1, c0, c1 = (int(v) for v in unit.split(":")[1:])
    return (r1 - r0 + 1) * (c1 - c0 + 1)


class FakeTimer:
    """Deterministic milliseconds (`_cost`; nothing is built or run), the dense model 1.1 x the
    sum of its layers at full width."""

    def __init__(self, lg):
        self.calls = 0
        self.dense = 1.1 * sum(_cost(min(l.in_features, l.out_features), min(l.in_features, l.out_features))
                               if latency._is_depthwise(l) else _cost(l.in_features, l.out_features)
                               for l in lg.layers)  # fmt: skip  # noqa: E741

    def __call__(self, build, info):
        self.calls += 1
        if info["layer"] is None:
            return self.dense
        return _cost(info["c_in"], info["c_out"], info.get("unit"))


def _setup(name):
    model = get_model(name, num_classes=10)
    variables = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    x = jnp.zeros((1, 32, 32, 3))
    lg = trace.trace_model(model.apply, variables, x)
    lib = pat.get_library("reference6")
    spec = graph_lib.build_graph_spec(lg, n_patterns=lib.n_patterns,
                                      valid=graph_lib.default_valid(lg, lib.n_patterns, lib))  # fmt: skip
    order = graph_lib.importance_order(spec, variables)
    return model, variables, x, lg, lib, spec, order


@pytest.fixture(scope="module", params=MODELS)
def zoo(request):
    model, variables, x, lg, lib, spec, order = _setup(request.param)
    timer = FakeTimer(lg)
    table = latency.measure_table(lg, model.apply, variables, x, timer=timer, backend="fake:cpu")
    return model, variables, x, lg, lib, spec, order, table, timer


def test_table_is_cached_and_invalidated(zoo):
    model, variables, x, lg, lib, *_, table, _ = zoo
    timer = FakeTimer(lg)
    kw = dict(timer=timer, backend="fake:cpu", batch=1)
    t1, fresh1 = latency.cached_or_measure(None, lg, model.apply, variables, x, **kw)
    assert fresh1 and timer.calls > 0
    n = timer.calls
    cache = json.loads(json.dumps(latency.to_json(t1)))  # what the pipeline writes and reads
    t2, fresh2 = latency.cached_or_measure(cache, lg, model.apply, variables, x, **kw)
    assert not fresh2 and timer.calls == n  # reused: the timer is not called again
    assert t2.key == t1.key and t2.dense_ms == t1.dense_ms
    for a, b in zip(t1.ms, t2.ms, strict=True):
        np.testing.assert_array_equal(a, b)
    # another backend: re-measured
    _, fresh3 = latency.cached_or_measure(cache, lg, model.apply, variables, x, timer=timer,
                                        backend="fake:gpu", batch=1)  # fmt: skip
    assert fresh3 and timer.calls > n
    # another batch: re-measured
    n = timer.calls
    _, fresh4 = latency.cached_or_measure(cache, lg, model.apply, variables, x, timer=timer,
                                        backend="fake:gpu", batch=2)  # fmt: skip
    assert fresh4 and timer.calls > n
    # another model: another key
    other = _setup("vgg_tiny")[3]
    assert latency.table_key(other, batch=1, backend="fake:cpu") != table.key
    with pytest.raises(ValueError, match="another model or backend"):
        latency.check_table(table, latency.table_key(lg, batch=1, backend="fake:gpu"))


def test_unknown_lowering_and_negative_min_width_are_refused(zoo):
    lg = zoo[3]
    with pytest.raises(ValueError, match="filters"):
        latency.table_key(lg, batch=1, lowering="pallas")
    with pytest.raises(ValueError, match="min_width must be >= 0"):
        latency.table_key(lg, batch=1, lowering="taps", min_width=-1)


def test_prediction_dense_equals_measured_and_is_monotone(zoo):
    _, _, _, lg, lib, spec, order, table, _ = zoo
    predict = jax.jit(latency.make_predictor(lg, table, lib))
    dense = tuple(jnp.full((layer.out_features,), lib.keep_id, jnp.int32) for layer in lg.layers)
    assert float(predict(dense)) == pytest.approx(table.dense_ms, rel=1e-5)
    for m in table.ms:
        assert (np.diff(m, axis=0) >= 0).all() and (np.diff(m, axis=1) >= 0).all()
    # removing filters one at a time (weakest first) never raises the prediction
    rng = np.random.default_rng(0)
    ids = [np.full(layer.out_features, lib.keep_id, np.int32) for layer in lg.layers]
    last = float(predict(dense))
    for _ in range(20):
        li = int(rng.integers(lg.n_layers - 1))
        ids[li][int(rng.integers(len(ids[li])))] = lib.remove_id
        now = float(predict(tuple(jnp.asarray(i) for i in ids)))
        assert now <= last + 1e-6
        last = now
    assert last < table.dense_ms


def test_every_random_proposal_decodes_within_latency_tolerance(zoo):
    *_, lg, lib, spec, order, table, _ = zoo
    d = decode.make_decoder(spec, order, lib, target=0.3, kind="latency", tolerance=0.01,
                            latency_table=table)  # fmt: skip
    props = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (12, *d.action_mask.shape))
    props = props.at[0].set(0.0)
    ids, info = jax.jit(jax.vmap(d.decode))(props)
    red = np.asarray(info["latency_reduction"])
    assert np.all(np.abs(red - 0.3) <= 0.01), red
    assert np.asarray(info["on_budget"]).all()
    again = jax.vmap(d.measure)(ids)
    np.testing.assert_allclose(np.asarray(again["latency_reduction"]), red, atol=1e-6)


def test_unreachable_latency_target_and_missing_table_fail_first(zoo):
    *_, lg, lib, spec, order, table, _ = zoo
    with pytest.raises(ValueError, match="latency reduction 0.99 is not reachable"):
        decode.make_decoder(spec, order, lib, target=0.99, kind="latency", latency_table=table)
    with pytest.raises(ValueError, match="needs a latency table"):
        decode.make_decoder(spec, order, lib, target=0.3, kind="latency")


def test_json_round_trip_and_malformed():
    model, variables, x, lg = _setup("vgg_tiny")[:4]
    t = latency.measure_table(
        lg, model.apply, variables, x, timer=FakeTimer(lg), backend="fake:cpu"
    )
    back = latency.from_json(latency.to_json(t))
    assert back.key == t.key and back.rest_ms == t.rest_ms
    with pytest.raises(ValueError, match="not a latency table"):
        latency.from_json({"key": {}})


def test_depthwise_entries_are_timed_at_their_own_width():
    # each diagonal entry of a depthwise table is its own width's op (a rebinding bug once timed
    # every entry of a row at the row's first width)
    model, variables, x, lg = _setup("mobilenet_v2_tiny")[:4]
    t = latency.measure_table(lg, model.apply, variables, x, timer=FakeTimer(lg), backend="f")
    dw = [la for la in lg.layers if latency._is_depthwise(la)]
    assert dw
    for la in dw:
        w = t.in_widths[la.index]
        np.testing.assert_allclose(np.diag(t.ms[la.index])[1:], [_cost(c, c) for c in w[1:]])


# --- pattern-grouped lowerings ("taps" / "grouped") -------------------------------------------


def _hand_ms(lg, lib, table, layer_ids):
    """The fake timer's model evaluated directly: T_rest + filter layers at their widths + every
    unit of a grouped layer at (full inputs, its filter count). Valid when no filter is removed
    (every input width is full), where the table's interpolation is exact for `_cost`."""
    total = table.rest_ms
    for la, low, ids in zip(lg.layers, table.lowerings, layer_ids, strict=True):
        if low == "filters":
            c = (min(la.in_features, la.out_features),) * 2 if latency._is_depthwise(la) else (
                la.in_features, la.out_features)
            total += _cost(*c)
            continue
        ops, u = latency.layer_units(low, lib)
        counts = np.bincount(np.asarray(ids), minlength=lib.n_patterns)
        for op, row in zip(ops, u, strict=True):
            n = int(row @ counts)
            total += _cost(la.in_features, n, op) if n else 0.0
    return total


@pytest.mark.parametrize("lowering", ["taps", "grouped"])
def test_grouped_table_predicts_the_sum_of_its_units(zoo, lowering):
    model, variables, x, lg, lib, spec, order, *_ = zoo
    widths = sorted({la.out_features for la in lg.layers if latency.unit_lowering_ok(la, lib)})
    min_width = widths[len(widths) // 2]  # the thinner 3x3 convs stay on filters
    table = latency.measure_table(lg, model.apply, variables, x, timer=FakeTimer(lg),
                                  backend="fake:cpu", lowering=lowering, min_width=min_width)  # fmt: skip
    for la, low in zip(lg.layers, table.lowerings, strict=True):
        takes = latency.unit_lowering_ok(la, lib) and la.out_features >= min_width
        assert low == (lowering if takes else "filters"), la.name
    assert set(table.layer_lowerings(lg)) == {la.name for la, low in zip(lg.layers,
                                              table.lowerings, strict=True) if low != "filters"}
    assert set(table.layer_lowerings(lg).values()) == {lowering}  # something took the lowering
    n_units = 9 if lowering == "taps" else 5  # reference6: 9 taps; 5 non-empty footprints
    for m, u in zip(table.ms, table.units, strict=True):
        if u is not None:
            assert m.shape[0] == n_units and u.shape == (n_units, lib.n_patterns)
            assert (m[:, :, 0] == 0).all() and (np.diff(m, axis=2) >= 0).all()
    predict = jax.jit(latency.make_predictor(lg, table, lib))
    rng = np.random.default_rng(0)
    for _ in range(5):  # random non-removing patterns: the prediction is the hand sum
        ids = [rng.integers(1, lib.n_patterns, la.out_features).astype(np.int32)
               if pat.valid_patterns(la, lib).all() else np.full(la.out_features, lib.keep_id)
               for la in lg.layers]  # fmt: skip
        want = _hand_ms(lg, lib, table, ids)
        assert float(predict(tuple(jnp.asarray(i) for i in ids))) == pytest.approx(want, rel=1e-5)
    # JSON round trip keeps units and lowerings; a cache of another min width is re-measured
    back = latency.from_json(json.loads(json.dumps(latency.to_json(table))))
    assert back.lowerings == table.lowerings and back.key == table.key
    for a, b in zip(back.units, table.units, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    kw = dict(timer=FakeTimer(lg), backend="fake:cpu", lowering=lowering)
    _, fresh = latency.cached_or_measure(latency.to_json(table), lg, model.apply, variables, x,
                                         min_width=min_width, **kw)  # fmt: skip
    assert not fresh
    _, fresh = latency.cached_or_measure(latency.to_json(table), lg, model.apply, variables, x,
                                         min_width=min_width + 1, **kw)  # fmt: skip
    assert fresh
    # the decoder reaches a latency target in this lowering for random proposals
    d = decode.make_decoder(spec, order, lib, target=0.3, kind="latency", tolerance=0.01,
                            latency_table=table)  # fmt: skip
    props = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (12, *d.action_mask.shape))
    _, info = jax.jit(jax.vmap(d.decode))(props.at[0].set(0.0))
    red = np.asarray(info["latency_reduction"])
    assert np.all(np.abs(red - 0.3) <= 0.01), red
    with pytest.raises(ValueError, match="pattern library"):
        latency.make_predictor(lg, table, "figure8")


@pytest.mark.parametrize("name", ["resnet8_tiny", "vgg_tiny"])
def test_unit_ops_are_the_lowered_convs_pieces(name):
    # the op a unit times is the piece of the conv the lowering runs: the tap op equals the conv
    # whose kernel keeps only tap (0, 0), the box op the conv whose kernel is zero outside the box
    _, _, _, lg, lib, *_ = _setup(name)
    convs = [la for la in lg.layers if latency.unit_lowering_ok(la, lib)]
    assert any(s != 1 for la in convs for s in la.strides) or name == "vgg_tiny"
    for la in convs:
        k = jax.random.split(jax.random.PRNGKey(la.index), 2)
        x = jax.random.normal(k[0], (2, *la.in_spatial, 3))
        full = jax.random.normal(k[1], (3, 3, 3, 4))
        ops, _ = latency.layer_units("grouped", lib)
        for op in ["tap", *ops]:
            fn, _ = latency.unit_op(la, op, 3, 4, 2)
            if op == "tap":
                w, kernel = full[0, 0], jnp.zeros_like(full).at[0, 0].set(full[0, 0])
            else:
                r0, r1, c0, c1 = (int(v) for v in op.split(":")[1:])
                w = full[r0:r1 + 1, c0:c1 + 1]
                kernel = jnp.zeros_like(full).at[r0:r1 + 1, c0:c1 + 1].set(w)
            want = jax.lax.conv_general_dilated(x, kernel, la.strides, la.padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
            np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(want), atol=1e-5)


def test_table_lowerings_rebuild_the_compacted_model_it_models():
    # compaction with the table's layer_lowerings runs exactly those convs on the lowering, and
    # still equals the masked model
    from sculpt_jax import compaction, masking

    model, variables, x, lg, lib, *_ = _setup("resnet8_tiny")
    table = latency.measure_table(lg, model.apply, variables, x, timer=FakeTimer(lg),
                                  backend="fake:cpu", lowering="taps")  # fmt: skip
    rng = np.random.default_rng(1)
    ids = tuple(rng.integers(0, lib.n_patterns, la.out_features).astype(np.int32)
                if pat.valid_patterns(la, lib).all() else np.full(la.out_features, lib.keep_id)
                for la in lg.layers)  # fmt: skip
    masks = masking.pattern_ids_to_masks(lg, variables["params"], ids, lib)
    xs = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 3))
    fn, cv, info = compaction.compact(model.apply, variables, lg, masks, xs[:1],
                                      layer_lowerings=table.layer_lowerings(lg))  # fmt: skip
    lowered = {li["name"] for li in info["layers"] if li.get("lowering") == "taps"}
    assert lowered == set(table.layer_lowerings(lg))
    want = model.apply(masking.apply_masks(variables, masks), xs, train=False)
    np.testing.assert_allclose(np.asarray(fn(cv, xs)), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("lowering", ["filters", "taps"])
def test_rest_calibrated_on_the_unpruned_compacted_model(zoo, lowering):
    # where compaction's replay of the unpruned model runs faster than the dense model (XLA:CPU on
    # VGG), T_rest comes from it: the prediction at no pruning is its time, reductions stay
    # against dense, and a target below what compaction alone gives is refused
    model, variables, x, lg, lib, spec, order, *_ = zoo
    timer = FakeTimer(lg)

    def calibrated(build, info):
        return 0.6 * timer.dense if info.get("unit") == "model" else timer(build, info)

    built = []
    table = latency.measure_table(lg, model.apply, variables, x, timer=calibrated,
                                  backend="fake:cpu", unpruned=lambda: built.append(1),
                                  lowering=lowering)  # fmt: skip
    assert set(table.lowerings) == ({"filters"} if lowering == "filters" else {"filters", "taps"})
    assert not built  # the fake timer builds nothing
    dense = tuple(jnp.full((la.out_features,), lib.keep_id, jnp.int32) for la in lg.layers)
    predict = jax.jit(latency.make_predictor(lg, table, lib))
    assert float(predict(dense)) == pytest.approx(0.6 * timer.dense, rel=1e-5)
    assert table.dense_ms == pytest.approx(timer.dense)
    with pytest.raises(ValueError, match=r"below what the unpruned model already gives \(0.4"):
        decode.make_decoder(spec, order, lib, target=0.3, kind="latency", latency_table=table)
    d = decode.make_decoder(spec, order, lib, target=0.55, kind="latency", tolerance=0.02,
                            latency_table=table)  # fmt: skip
    _, info = jax.jit(d.decode)(jnp.zeros(d.action_mask.shape))
    assert abs(float(info["latency_reduction"]) - 0.55) <= 0.02


def test_unpruned_build_runs_the_compacted_dense_model():
    from sculpt_jax import compaction

    model, variables, x, lg, lib, *_ = _setup("resnet8_tiny")
    pinned = latency.lowered_layers(lg, latency.table_lowerings(lg, "taps", 0, lib))
    assert pinned and set(pinned.values()) == {"taps"}
    fn, (cv, xb) = compaction.unpruned_build(model.apply, variables, lg, x, batch=3,
                                             layer_lowerings=pinned)()  # fmt: skip
    assert xb.shape == (3, 32, 32, 3)
    want = model.apply(variables, xb, train=False)
    np.testing.assert_allclose(np.asarray(fn(cv, xb)), np.asarray(want), atol=1e-4)
