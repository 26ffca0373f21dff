"""Tests of sculpt_jax.gnn: the typed-edge GATv2 actor-critic over padded observation graphs."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax import gnn
from sculpt_jax import graph as G

# The tiny hand-made LayerGraph of test_graph.py (loaded by path: independent of pytest's import
# mode).
_path = pathlib.Path(__file__).with_name("test_graph.py")
_mod_spec = importlib.util.spec_from_file_location("_sculpt_graph_fixtures", _path)
fixtures = importlib.util.module_from_spec(_mod_spec)
_mod_spec.loader.exec_module(fixtures)

P = 6
make_obs = jax.jit(G.make_observation, static_argnums=0)


def fast_init(init_fn, *args, seed=0):
    """Params with the structure of `init_fn(*args)` filled on the host (no XLA compile of the
    Flax initialisers, which costs seconds on CPU): kernels N(0, 1/fan_in), biases 0, LayerNorm
    scales 1, embeddings and attention vectors N(0, 1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init_fn, *args)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        std = 1.0 / np.sqrt(s.shape[0]) if name == "kernel" else 1.0
        return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def statics(spec):
    return (spec.node_mask, spec.edge_mask, spec.action_mask, spec.valid, spec.node_group)


def make_model(spec, head, n_layers=1):
    return gnn.ActorCritic(
        n_patterns=P,
        n_edge_types=G.n_edge_types(spec),
        n_groups=spec.n_groups,
        head=head,
        hidden=16,
        n_layers=n_layers,
        n_heads=4,
        edge_dim=8,
        mlp_hidden=16,
    )


@pytest.fixture(scope="module")
def setup():
    lg = fixtures.tiny_layer_graph()
    small = G.build_graph_spec(lg)
    big = G.build_graph_spec(lg, node_budget=40, edge_budget=80)
    params = fixtures.tiny_params()
    ids = np.array(G.initial_pattern_ids(small))
    ids[small.layer_nodes[0]] = [0, 1, 2, 3]
    ids_big = np.array(G.initial_pattern_ids(big))
    ids_big[: small.n_nodes] = ids
    obs_small = make_obs(small, params, ids)
    obs_big = make_obs(big, params, ids_big)
    return small, big, obs_small, obs_big


def test_segment_helpers_golden():
    # Receivers: edges 0,1 -> node 0; edge 2 -> node 1 (masked); edge 3 -> node 2.
    logits = jnp.array([[0.0], [jnp.log(3.0)], [5.0], [1.0]])
    recv = jnp.array([0, 0, 1, 2])
    mask = jnp.array([True, True, False, True])
    a = gnn.masked_segment_softmax(logits, recv, mask, 3)
    np.testing.assert_allclose(a[:, 0], [0.25, 0.75, 0.0, 1.0], rtol=1e-6)
    x = jnp.array([[1.0], [3.0], [10.0], [7.0]])
    np.testing.assert_allclose(
        gnn.segment_mean(x, jnp.array([0, 0, -1, 1]), 2)[:, 0], [2.0, 7.0], rtol=1e-6
    )
    np.testing.assert_allclose(gnn.masked_mean(x, mask)[0], 11.0 / 3.0, rtol=1e-6)


@pytest.mark.parametrize("head", gnn.HEADS)
def test_heads_shapes_masks_and_padding_invariance(setup, head):
    small, big, obs_small, obs_big = setup
    model = make_model(small, head)
    params = fast_init(model.init, jax.random.PRNGKey(0), obs_small, *statics(small))
    both = jax.jit(
        lambda p, a, b: (model.apply(p, a, *statics(small)), model.apply(p, b, *statics(big)))
    )
    out_small, out_big = both(params, obs_small, obs_big)
    assert out_small["value"].shape == ()
    # A bigger padding budget changes nothing on the real graph: padding contributes nothing.
    np.testing.assert_allclose(out_small["value"], out_big["value"], rtol=1e-5, atol=1e-6)
    if head == "paper":
        assert out_small["mean"].shape == (P,)
        assert np.all((out_small["mean"] > 0) & (out_small["mean"] < 1))
        np.testing.assert_allclose(out_small["mean"], out_big["mean"], rtol=1e-5, atol=1e-6)
        return
    if head == "mixture":  # network-wide row + one row per segment (group); zero at Flax init
        assert out_small["mean"].shape == (small.n_groups + 1, P)
        assert out_small["log_std"].shape == (2, P)
        np.testing.assert_allclose(out_small["mean"], out_big["mean"], rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(out_small["mean"])).max() > 0  # fast_init: random output layers
        real = model.init(jax.random.PRNGKey(0), obs_small, *statics(small))
        assert np.all(np.asarray(model.apply(real, obs_small, *statics(small))["mean"]) == 0.0)
        return
    n = small.n_real_nodes
    assert out_small["logits"].shape == (small.n_nodes, P)
    np.testing.assert_allclose(out_small["logits"][:n], out_big["logits"][:n], rtol=1e-5, atol=1e-5)
    logits = np.asarray(out_small["logits"])
    # Invalid patterns (1..4 on the dense head) and all non-action rows hold NEG_LOGIT.
    assert np.all(logits[~small.valid] == gnn.NEG_LOGIT)
    assert np.all(logits[~small.action_mask] == gnn.NEG_LOGIT)
    assert np.all(logits[small.valid] > gnn.NEG_LOGIT / 2)
    if head == "per_group":
        assert out_small["group_logits"].shape == (small.n_groups, P)
        # Filters of one group share their logits.
        g0 = logits[small.layer_nodes[0]]
        np.testing.assert_array_equal(g0, np.broadcast_to(g0[0], g0.shape))
        np.testing.assert_array_equal(logits[small.layer_nodes[1]], g0)


@pytest.fixture(scope="module")
def per_filter(setup):
    """A per_filter model, its params and ONE jitted apply shared by the tests below."""
    small, _, obs, _ = setup
    model = make_model(small, "per_filter")
    params = fast_init(model.init, jax.random.PRNGKey(0), obs, *statics(small))
    return model, params, jax.jit(lambda p, o: model.apply(p, o, *statics(small)))


def test_garbage_in_padding_is_ignored(setup, per_filter):
    small, _, obs, _ = setup
    model, params, apply = per_filter
    feat = np.array(obs.nodes["feat"])
    feat[small.n_real_nodes :] = 123.0
    types = np.array(obs.edges["type"])
    types[small.n_real_edges :] = 7
    dirty = obs._replace(nodes={"feat": jnp.asarray(feat)}, edges={"type": jnp.asarray(types)})
    a = apply(params, obs)
    b = apply(params, dirty)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    np.testing.assert_array_equal(a["value"], b["value"])


def test_edge_embedding_is_shared_trainable_and_matters(setup):
    small, _, obs, _ = setup
    model = make_model(small, "per_group", n_layers=2)
    params = fast_init(model.init, jax.random.PRNGKey(0), obs, *statics(small))
    table = params["params"]["edge_embed"]["embedding"]
    assert table.shape == (G.n_edge_types(small), 8)
    # One encoder, one table: no second embedding anywhere in the tree (REFERENCE.md 6.3).
    paths = [
        "/".join(str(getattr(k, "key", k)) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    assert sum("embedding" in p for p in paths) == 1

    def loss(p, key):
        out = model.apply(p, obs, *statics(small))
        return out[key] if key == "value" else jnp.sum(out["group_logits"] ** 2)

    grads = jax.jit(lambda p: {k: jax.grad(loss)(p, k) for k in ("value", "group_logits")})(params)
    for key, g in grads.items():
        g = g["params"]["edge_embed"]["embedding"]
        used = np.unique(np.asarray(obs.edges["type"])[: small.n_real_edges])
        assert np.abs(np.asarray(g)[used]).sum() > 0, f"{key}: no gradient into the edge embedding"
        unused = np.setdiff1d(np.arange(G.n_edge_types(small)), used)
        assert np.all(np.asarray(g)[unused] == 0)
    # Edge types (pattern ids) change the output.
    ids = np.array(G.initial_pattern_ids(small))
    ids[small.layer_nodes[1]] = [0, 1, 2, 3]
    other = make_obs(small, fixtures.tiny_params(), ids)
    other = other._replace(nodes=obs.nodes)  # same node features, only edge types differ
    apply = jax.jit(model.apply)
    a = apply(params, obs, *statics(small))["value"]
    b = apply(params, other, *statics(small))["value"]
    assert not np.allclose(a, b)


def test_vmap_over_observations_matches_single_calls(setup, per_filter):
    small, _, obs, _ = setup
    model, params, apply = per_filter
    ids = np.array(G.initial_pattern_ids(small, 0))
    obs2 = make_obs(small, fixtures.tiny_params(3), ids)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), obs, obs2)
    fn = jax.jit(jax.vmap(lambda o: model.apply(params, o, *statics(small))))
    out = fn(stacked)
    for i, o in enumerate((obs, obs2)):
        single = apply(params, o)
        np.testing.assert_allclose(out["logits"][i], single["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["value"][i], single["value"], rtol=1e-5, atol=1e-6)


def test_bad_head_raises(setup):
    small, _, obs, _ = setup
    with pytest.raises(ValueError, match="head"):
        make_model(small, "per_kernel").init(jax.random.PRNGKey(0), obs, *statics(small))
