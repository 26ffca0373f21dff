"""Tests of sculpt_jax.graph: the padded observation graph (hand-counted on a tiny LayerGraph)."""

import importlib.util

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from sculpt_jax import graph as G
from sculpt_jax.types import ALWAYS_ALIVE, InputSource, Layer, LayerGraph

P = 6
FWD = P + G.N_FIXED_EDGE_TYPES  # 10 forward edge types
CONCAT, RESIDUAL, HEAD, SEQ = (P + k for k in range(4))


def conv_layer(index, name, cin, cout, k, sources, depth, spatial=8, stride=1, groups=1):
    out = spatial // stride
    return Layer(
        index=index,
        name=name,
        kind="conv",
        kernel_path=("params", name, "kernel"),
        affine_paths=(),
        kernel_shape=(k, k, cin // groups, cout),
        kernel_spatial_axes=(0, 1),
        kernel_in_axes=(2,),
        kernel_out_axes=(3,),
        in_features=cin,
        out_features=cout,
        groups=groups,
        kernel_size=(k, k),
        strides=(stride, stride),
        dilation=(1, 1),
        padding=((k // 2, k // 2),) * 2,
        in_spatial=(spatial, spatial),
        out_spatial=(out, out),
        n_positions=out * out,
        macs=out * out * k * k * (cin // groups) * cout,
        sources=tuple(sources),
        depth=depth,
    )


def dense_layer(index, name, cin, cout, sources, depth):
    return Layer(
        index=index,
        name=name,
        kind="dense",
        kernel_path=("params", name, "kernel"),
        affine_paths=(),
        kernel_shape=(cin, cout),
        kernel_spatial_axes=(),
        kernel_in_axes=(0,),
        kernel_out_axes=(1,),
        in_features=cin,
        out_features=cout,
        groups=1,
        kernel_size=(),
        strides=(),
        dilation=(),
        padding=(),
        in_spatial=(),
        out_spatial=(),
        n_positions=1,
        macs=cin * cout,
        sources=tuple(sources),
        depth=depth,
    )


def tiny_layer_graph():
    """conv0 (3x3, 3->4) -> conv1 (3x3, 4->4); conv0 + conv1 (residual add) -> dense head 4->2."""
    full = tuple(range(4))
    layers = (
        conv_layer(0, "conv0", 3, 4, 3, [InputSource(ALWAYS_ALIVE, (0, 1, 2))], 0),
        conv_layer(1, "conv1", 4, 4, 3, [InputSource(0, full)], 1),
        dense_layer(
            2,
            "head",
            4,
            2,
            [InputSource(0, full, "residual"), InputSource(1, full, "residual")],
            2,
        ),
    )
    return LayerGraph(
        layers=layers,
        input_shape=(8, 8, 3),
        output_sources=(InputSource(2, (0, 1)),),
        coupled_groups=((0, 1), (2,)),
        other_flops=0,
        total_params=sum(layer.params for layer in layers),
    )


def tiny_params(seed=0):
    """Model variables of `tiny_layer_graph` (numpy RNG: no XLA compile for test inputs)."""
    rng = np.random.default_rng(seed)
    shapes = {"conv0": (3, 3, 3, 4), "conv1": (3, 3, 4, 4), "head": (4, 2)}
    return {
        "params": {
            name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
            for name, shape in shapes.items()
        }
    }


# Jitted once per spec (GraphSpec hashes by identity, so it can be a static argument).
make_obs = jax.jit(G.make_observation, static_argnums=0)


@pytest.fixture(scope="module")
def spec():
    return G.build_graph_spec(tiny_layer_graph())


def _edges(spec, real=True):
    n = spec.n_real_edges if real else spec.n_edges
    return list(zip(spec.senders[:n].tolist(), spec.receivers[:n].tolist(), strict=True))


def test_filter_level_counts_by_hand(spec):
    # Nodes: input + (4 filters + out) + (4 filters + out) + (2 filters + out) + 1 merged = 15.
    assert spec.n_real_nodes == 15
    kinds = spec.node_kind[: spec.n_real_nodes]
    assert (kinds == G.NODE_FMAP).sum() == 5
    assert (kinds == G.NODE_FILTER).sum() == 10
    assert spec.n_action_nodes == 10
    # Forward edges: 2 per filter (input->filter, filter->output) = 20, + 2 residual edges into the
    # merged node feeding the head = 22; bidirectional doubles it.
    assert spec.n_real_edges == 44
    assert G.n_edge_types(spec) == 2 * FWD == 20
    fwd = slice(0, 22)
    types = spec.edge_type[fwd]
    pattern_edges = spec.edge_pattern_node[fwd] >= 0
    assert pattern_edges.sum() == 10
    assert (types[~pattern_edges] == CONCAT).sum() == 10
    assert (types[~pattern_edges] == RESIDUAL).sum() == 2
    # Reverse edges mirror the forward ones with types shifted by P + 4.
    np.testing.assert_array_equal(spec.senders[22:44], spec.receivers[:22])
    np.testing.assert_array_equal(spec.receivers[22:44], spec.senders[:22])
    np.testing.assert_array_equal(spec.edge_type[22:44], spec.edge_type[:22] + FWD)
    np.testing.assert_array_equal(spec.edge_pattern_node[22:44], spec.edge_pattern_node[:22])

    # Layout: input 0; conv0 filters 1-4, out 5; conv1 filters 6-9, out 10; head 11-12, out 13;
    # merged (conv0 + conv1) 14.
    np.testing.assert_array_equal(spec.layer_nodes[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(spec.layer_nodes[1], [6, 7, 8, 9])
    np.testing.assert_array_equal(spec.layer_nodes[2], [11, 12])
    edges = _edges(spec)[:22]
    assert (0, 1) in edges and (1, 5) in edges  # input -> conv0 filter -> conv0 output
    assert (5, 6) in edges and (6, 10) in edges  # conv0 output is conv1's input
    assert (5, 14) in edges and (10, 14) in edges  # residual producers -> merged node
    assert (14, 11) in edges and (12, 13) in edges  # merged node is the head's input
    np.testing.assert_array_equal(
        spec.node_group[:15], [-1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 1, 1, -1, -1]
    )
    np.testing.assert_array_equal(spec.node_filter[11:13], [0, 1])
    assert spec.n_groups == 2


def test_valid_mask_reference6(spec):
    # 3x3 convs: all 6 ids; the dense head feeds the model output, so it may only keep (5):
    # removing a head filter would delete a class. Others all False.
    assert spec.valid[spec.layer_nodes[0]].all()
    assert G.output_layers(spec.layer_graph) == (2,)
    head = spec.valid[spec.layer_nodes[2]]
    np.testing.assert_array_equal(head, [[False, False, False, False, False, True]] * 2)
    assert not spec.valid[~spec.action_mask].any()


def test_layer_level_counts_by_hand():
    spec = G.build_graph_spec(tiny_layer_graph(), level="layer")
    # input + 3 layer nodes; edges input->conv0 (seq), conv0->conv1 (seq), conv0->head and
    # conv1->head (residual), doubled.
    assert spec.n_real_nodes == 4
    assert spec.n_real_edges == 8
    np.testing.assert_array_equal(spec.node_kind[:4], [1, 3, 3, 3])
    assert _edges(spec)[:4] == [(0, 1), (1, 2), (1, 3), (2, 3)]
    np.testing.assert_array_equal(spec.edge_type[:4], [SEQ, SEQ, RESIDUAL, RESIDUAL])
    np.testing.assert_array_equal(spec.edge_type[4:8], spec.edge_type[:4] + FWD)
    ids = jnp.asarray(np.where(spec.action_mask, np.arange(spec.n_nodes) % 6, -1))
    per_layer = G.layer_pattern_ids(spec, ids)
    np.testing.assert_array_equal(per_layer[0], [1, 1, 1, 1])  # node 1 broadcast to 4 filters
    np.testing.assert_array_equal(per_layer[2], [3, 3])


def test_unidirectional_has_half_the_edges():
    spec = G.build_graph_spec(tiny_layer_graph(), bidirectional=False)
    assert spec.n_real_edges == 22
    assert G.n_edge_types(spec) == FWD


def test_budgets_masks_and_padding_layout():
    spec = G.build_graph_spec(tiny_layer_graph(), node_budget=32, edge_budget=64)
    assert (spec.n_nodes, spec.n_edges) == (32, 64)
    assert spec.node_mask.sum() == 15 and spec.edge_mask.sum() == 44
    assert (spec.senders[44:] == 15).all() and (spec.receivers[44:] == 15).all()
    assert (spec.node_kind[15:] == G.NODE_PAD).all() and (spec.node_layer[15:] == -1).all()
    obs = make_obs(spec, tiny_params(), G.initial_pattern_ids(spec))
    np.testing.assert_array_equal(obs.n_node, [15, 17])
    np.testing.assert_array_equal(obs.n_edge, [44, 20])
    np.testing.assert_array_equal(jraph.get_node_padding_mask(obs), spec.node_mask)
    np.testing.assert_array_equal(jraph.get_edge_padding_mask(obs), spec.edge_mask)
    assert obs.nodes["feat"].shape == (32, spec.n_features)
    assert np.all(np.asarray(obs.nodes["feat"])[15:] == 0.0)
    # Default budgets: real + 1 padding node rounded up to 8; edges rounded up to 8.
    default = G.build_graph_spec(tiny_layer_graph())
    assert (default.n_nodes, default.n_edges) == (16, 48)
    with pytest.raises(ValueError, match="node_budget"):
        G.build_graph_spec(tiny_layer_graph(), node_budget=15)
    with pytest.raises(ValueError, match="edge_budget"):
        G.build_graph_spec(tiny_layer_graph(), edge_budget=40)


def test_bad_inputs_raise_clear_errors():
    lg = tiny_layer_graph()
    with pytest.raises(ValueError, match="shape"):
        G.build_graph_spec(lg, valid=np.ones((2, 6), bool))
    bad = np.ones((3, 6), bool)
    bad[1] = False
    with pytest.raises(ValueError, match="no valid pattern"):
        G.build_graph_spec(lg, valid=bad)
    with pytest.raises(ValueError, match="level"):
        G.build_graph_spec(lg, level="kernel")
    spec = G.build_graph_spec(lg)
    with pytest.raises(ValueError, match="pattern_ids"):
        G.make_observation(spec, tiny_params(), np.zeros(3, np.int32))


def test_edge_types_follow_pattern_ids(spec):
    ids = np.array(G.initial_pattern_ids(spec))
    ids[spec.layer_nodes[0]] = [0, 1, 2, 3]
    ids[spec.layer_nodes[1]] = [4, 5, 0, 1]
    ids[spec.layer_nodes[2]] = [0, 5]
    obs = make_obs(spec, tiny_params(), jnp.asarray(ids))
    types = np.asarray(obs.edges["type"])
    pn = spec.edge_pattern_node
    fwd = (pn >= 0) & (np.arange(spec.n_edges) < 22)
    rev = (pn >= 0) & (np.arange(spec.n_edges) >= 22)
    # Forward input->filter edges carry the receiving filter's pattern id, reverse ones id + 10.
    np.testing.assert_array_equal(types[fwd], ids[spec.receivers[fwd]])
    np.testing.assert_array_equal(types[rev], ids[spec.senders[rev]] + FWD)
    np.testing.assert_array_equal(types[pn < 0], spec.edge_type[pn < 0])
    # One-hot of the current pattern on action nodes only.
    onehot = np.asarray(obs.nodes["feat"])[:, -P:]
    np.testing.assert_array_equal(onehot[spec.action_mask].argmax(1), ids[spec.action_mask])
    assert onehot[~spec.action_mask].sum() == 0


def test_weight_statistics_match_numpy(spec):
    params = tiny_params()
    obs = make_obs(spec, params, G.initial_pattern_ids(spec))
    n_static = len(G.STATIC_FEATURES)
    dyn = np.asarray(obs.nodes["feat"])[:, n_static : n_static + 3]
    k = np.asarray(params["params"]["conv1"]["kernel"]).reshape(-1, 4).T  # [filters, rest]
    l2 = np.sqrt((k**2).sum(1))
    l1 = np.abs(k).sum(1)
    rows = dyn[spec.layer_nodes[1]]
    np.testing.assert_allclose(rows[:, 0], (l2 - l2.mean()) / l2.std(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows[:, 1], l1 / l1.mean(), rtol=1e-5)
    np.testing.assert_array_equal(rows[:, 2], 0.0)
    assert np.all(dyn[~spec.action_mask] == 0.0)
    # Static features of a filter node of conv1: conv, C_in = C_out = 4, 3x3, depth 1 of max 2.
    f = np.asarray(obs.nodes["feat"])[6, :n_static]
    np.testing.assert_allclose(f[:6], [0, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(f[6:11], [0.2, 0.2, 1.0, 0.0, 0.5])
    macs = [layer.macs for layer in tiny_layer_graph().layers]
    np.testing.assert_allclose(f[11], macs[1] / sum(macs), rtol=1e-6)


def test_make_observation_jit_no_retrace(spec):
    traces = []

    def fn(params, ids):
        traces.append(1)
        return G.make_observation(spec, params, ids)

    jfn = jax.jit(fn)
    ids = jnp.asarray(G.initial_pattern_ids(spec))
    a = jfn(tiny_params(), ids)
    b = jfn(tiny_params(5), jnp.asarray(G.initial_pattern_ids(spec, 0)))
    assert len(traces) == 1
    np.testing.assert_allclose(
        a.nodes["feat"], make_obs(spec, tiny_params(), ids).nodes["feat"], rtol=1e-6
    )
    assert not np.array_equal(np.asarray(a.edges["type"]), np.asarray(b.edges["type"]))


def test_importance_placement_golden(spec):
    params = tiny_params()
    # conv0 filter L2 norms 3, 1, 4, 2 (all weight in one cell): weakest first = 1, 3, 0, 2.
    k = np.zeros((3, 3, 3, 4), np.float32)
    k[0, 0, 0] = [3.0, 1.0, 4.0, 2.0]
    params["params"]["conv0"]["kernel"] = jnp.asarray(k)
    order = np.asarray(G.importance_order(spec, params))
    np.testing.assert_array_equal(order[:4], spec.layer_nodes[0][[1, 3, 0, 2]])
    ids = np.array(G.initial_pattern_ids(spec))
    ids[spec.layer_nodes[0]] = [5, 0, 3, 1]  # sorted: 0, 1, 3, 5
    ids[spec.layer_nodes[1]] = [2, 2, 4, 0]
    placed = np.asarray(jax.jit(lambda o, i: G.place_by_importance(spec, o, i))(order, ids))
    # Weakest (filter 1) gets 0, then filter 3 gets 1, filter 0 gets 3, strongest filter 2 gets 5.
    np.testing.assert_array_equal(placed[spec.layer_nodes[0]], [3, 0, 5, 1])
    # Every layer keeps its multiset of ids; non-action nodes get -1.
    for nodes in spec.layer_nodes:
        np.testing.assert_array_equal(np.sort(placed[nodes]), np.sort(ids[nodes]))
    assert (placed[~spec.action_mask] == -1).all()
    per_layer = G.layer_pattern_ids(spec, placed)
    np.testing.assert_array_equal(per_layer[0], [3, 0, 5, 1])


def test_zero_out_padding(spec):
    obs = make_obs(spec, tiny_params(), G.initial_pattern_ids(spec))
    obs = obs._replace(nodes={"feat": jnp.ones_like(obs.nodes["feat"])})
    out = jax.jit(G.zero_out_padding)(obs)
    np.testing.assert_array_equal(np.asarray(out.nodes["feat"]).any(1), spec.node_mask)
    np.testing.assert_array_equal(
        np.asarray(out.edges["type"])[: spec.n_real_edges], np.asarray(obs.edges["type"])[:44]
    )
    assert (np.asarray(out.edges["type"])[44:] == 0).all()


def test_vit_like_always_alive_sources_get_head_edges():
    # qkv-like dense (depth 0, from the input), then two dense layers fed by an ALWAYS_ALIVE
    # (channel-mixing) op at depth 1: one mixed node fed by a head edge from the depth-0 output.
    alive = InputSource(ALWAYS_ALIVE, tuple(range(8)))
    layers = (
        dense_layer(0, "qkv", 8, 8, [alive], 0),
        dense_layer(1, "fc1", 8, 4, [alive], 1),
        dense_layer(2, "fc2", 8, 4, [alive], 1),
    )
    lg = LayerGraph(layers, (8,), (InputSource(2, (0, 1, 2, 3)),), ((0,), (1,), (2,)), 0, 0)
    spec = G.build_graph_spec(lg, bidirectional=False)
    # input + (8 + 1) + (4 + 1) + (4 + 1) + 1 mixed = 21 nodes; 2 * 16 filter edges + 1 head edge.
    assert spec.n_real_nodes == 21 and spec.n_real_edges == 33
    head = np.flatnonzero(spec.edge_type[:33] == HEAD)
    assert len(head) == 1
    mixed = spec.receivers[head[0]]
    assert spec.senders[head[0]] == 9 and mixed == 20  # qkv's output node -> the mixed node
    assert {int(spec.senders[e]) for e in range(33) if spec.receivers[e] in (10, 15)} == {mixed}
    layer_spec = G.build_graph_spec(lg, level="layer", bidirectional=False)
    assert _edges(layer_spec) == [(0, 1), (1, 2), (1, 3)]
    np.testing.assert_array_equal(layer_spec.edge_type[:3], [SEQ, HEAD, HEAD])


HAVE_TRACE = importlib.util.find_spec("sculpt_jax.trace") is not None


def _traced(name):
    """(LayerGraph, variables) of a zoo model; variables filled by numpy (no init compile)."""
    from sculpt_jax import trace
    from sculpt_jax.models import get_model

    model = get_model(name)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    return trace.trace_model(model.apply, variables, x), variables


@pytest.mark.skipif(not HAVE_TRACE, reason="sculpt_jax.trace not written yet")
def test_traced_resnet20_graph_counts():
    lg, variables = _traced("resnet20")
    spec = G.build_graph_spec(lg)
    # 19 convs (16 x 7, 32 x 6, 64 x 6 filters) + the 10-way head: 698 filter nodes; plus the
    # input node, 20 output nodes and 9 merged residual-sum nodes (the inputs of the 8 blocks after
    # the first and of the head, each the sum of the stem and all earlier conv2 outputs).
    assert spec.n_action_nodes == 16 * 7 + 32 * 6 + 64 * 6 + 10 == 698
    n_merged = sum(len(layer.sources) > 1 for layer in lg.layers)
    assert n_merged == 9
    assert spec.n_real_nodes == 1 + 698 + 20 + n_merged
    # Residual edges: one per (merged node, source) = 2 + 3 + ... + 10 = 54 (skip connections are
    # in the graph, REFERENCE.md 6.4); 2 edges per filter; doubled by the reverse edges.
    n_residual = sum(len(layer.sources) for layer in lg.layers if len(layer.sources) > 1)
    assert n_residual == 54
    types = spec.edge_type[: spec.n_real_edges]
    assert (types == RESIDUAL).sum() == n_residual
    assert spec.n_real_edges == 2 * (2 * 698 + n_residual)
    fn = jax.jit(lambda v, i: (G.make_observation(spec, v, i), G.importance_order(spec, v)))
    obs, order = fn(variables, G.initial_pattern_ids(spec))
    assert np.isfinite(np.asarray(obs.nodes["feat"])).all()
    assert sorted(np.asarray(order).tolist()) == sorted(spec.action_nodes.tolist())
    # The 3x3 convs accept all six patterns, the dense head only remove/keep.
    assert spec.valid[spec.layer_nodes[0]].all()
    assert spec.valid[spec.layer_nodes[19]][:, 1:5].sum() == 0


@pytest.mark.skipif(not HAVE_TRACE, reason="sculpt_jax.trace not written yet")
def test_traced_vit_tiny_layer_level_graph():
    lg, variables = _traced("vit_tiny")
    spec = G.build_graph_spec(lg, level="layer")
    assert spec.n_real_nodes == lg.n_layers + 1
    real = slice(0, spec.n_real_edges)
    assert (spec.edge_type[real] == HEAD).sum() > 0  # ALWAYS_ALIVE sources after depth 0
    # Every layer node hears from at least one producer.
    fwd = spec.edge_type[real] < FWD
    assert set(spec.receivers[real][fwd].tolist()) == set(range(1, lg.n_layers + 1))
    obs = make_obs(spec, variables, G.initial_pattern_ids(spec))
    assert np.isfinite(np.asarray(obs.nodes["feat"])).all()
