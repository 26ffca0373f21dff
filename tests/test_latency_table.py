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


def _cost(c_in, c_out):
    return 1e-3 * c_in * c_out + 0.01


class FakeTimer:
    """Deterministic milliseconds: a layer costs 1e-3 * c_in * c_out + 0.01 (nothing is built or
    run), the dense model 1.1 x the sum of its layers at full width."""

    def __init__(self, lg):
        self.calls = 0
        self.dense = 1.1 * sum(_cost(min(l.in_features, l.out_features), min(l.in_features, l.out_features))
                               if latency._is_depthwise(l) else _cost(l.in_features, l.out_features)
                               for l in lg.layers)  # fmt: skip  # noqa: E741

    def __call__(self, build, info):
        self.calls += 1
        if info["layer"] is None:
            return self.dense
        return _cost(info["c_in"], info["c_out"])


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


def test_grouped_lowering_is_refused_by_name(zoo):
    lg = zoo[3]
    with pytest.raises(ValueError, match="filters"):
        latency.table_key(lg, batch=1, lowering="grouped")


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
