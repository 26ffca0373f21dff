"""Observation graph of a traced model: `LayerGraph` -> padded `jraph.GraphsTuple` (layer 2).

AutoSculpt (arXiv 2412.18091, Sec. 3; REFERENCE.md Sec. 4 and 6.4) turns the network into a graph
whose nodes are feature maps and filters and whose input->filter edges carry each filter's current
pruning pattern. This module builds that graph once per model on the host (`build_graph_spec`, a
static `GraphSpec`) and provides the jittable `make_observation` that fills in the per-step parts
(weight statistics, current pattern ids, edge types).

Structure (``level="filter"``, the paper's graph plus the dataflow the reference omits):
  * one feature-map node for the model input, and one OUTPUT feature-map node per prunable layer;
  * one node per filter of every prunable layer (the *action nodes*: one pattern id each);
  * a layer's INPUT node is its producer's output node when it has one producer; when it has
    several (residual add, concat) a *merged* feature-map node is created (one per distinct
    source set, shared by all consumers of that set) with one edge per producer output typed
    "residual" / "concat" / "seq" after the source kind; an ALWAYS_ALIVE source of a layer at
    depth 0 is the model input node, at depth d > 0 a *mixed* feature-map node (one per depth,
    e.g. after a LayerNorm in a ViT) fed by "head" edges from the output nodes of every layer at
    depth d - 1 (an approximation: `LayerGraph` does not record which layers feed a
    channel-mixing op);
  * edges input->filter typed by that filter's current pattern id (0..P-1), filter->output typed
    "concat".
``level="layer"`` (very large models): one node per layer (the action nodes: one pattern per layer,
as the reference does for ViT) plus the model input node, edges typed seq/residual/concat by source
kind (ALWAYS_ALIVE sources at depth > 0 become "head" edges from the layers at depth d - 1).

Edge types: forward ids 0..P-1 (patterns), P+0 concat, P+1 residual, P+2 head, P+3 seq. With
``bidirectional=True`` (default) every edge also exists reversed with type ``id + P + 4``, so a
filter hears its layer's siblings through the output node and a feature map hears its consumers;
`n_edge_types(spec)` = 2 (P + 4) then, else P + 4.

Padding follows `jraph.pad_with_graphs`: real graph first, then ONE padding graph holding the
remaining nodes/edges; padding edges point at the first padding node; `n_node` = [n_real, pad].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sculpt_jax import patterns
from sculpt_jax.tree_util import get_at
from sculpt_jax.types import ALWAYS_ALIVE, LayerGraph, Path

# Node kinds (GraphSpec.node_kind).
NODE_PAD, NODE_FMAP, NODE_FILTER, NODE_LAYER = 0, 1, 2, 3
# Fixed edge types, as offsets after the P pattern ids.
EDGE_CONCAT, EDGE_RESIDUAL, EDGE_HEAD, EDGE_SEQ = 0, 1, 2, 3
N_FIXED_EDGE_TYPES = 4
_KIND_TO_EDGE = {"concat": EDGE_CONCAT, "residual": EDGE_RESIDUAL, "seq": EDGE_SEQ}

STATIC_FEATURES = (
    "is_feature_map",
    "is_filter",
    "is_layer",
    "kind_conv",
    "kind_depthwise",
    "kind_dense",
    "log2_c_in/10",
    "log2_c_out/10",
    "kernel_cells/9",
    "log2_stride",
    "depth/max_depth",
    "macs_share",
    "valid_fraction",
    "log2_positions/10",
)
DYNAMIC_FEATURES = (
    "l2_zscore_in_layer (layer level: l2 coefficient of variation)",
    "l1_over_layer_mean_l1 (layer level: max l1 / mean l1)",
    "zero_fraction",
)


@dataclasses.dataclass(frozen=True, eq=False)
class GraphSpec:
    """Static, host-side description of the padded observation graph of one model.

    Hash/equality are by identity, so a spec can be closed over or passed as a static jit argument.
    N = `n_nodes` (budget), E = `n_edges` (budget), P = `n_patterns`, A = number of action nodes.

    Attributes:
      layer_graph: the traced model.
      level: "filter" or "layer".
      n_patterns: P.
      bidirectional: whether reverse edges (types shifted by P + 4) are present.
      n_nodes, n_edges: padded sizes; n_real_nodes, n_real_edges: sizes of the real graph.
      senders, receivers: int32 [E] (padding edges point at node n_real_nodes).
      edge_type: int32 [E] fixed type of non-pattern edges (0 for padding edges); for pattern edges
        the offset (0 forward, P + 4 reverse) added to the filter's pattern id.
      edge_pattern_node: int32 [E], the filter node whose pattern id types the edge, -1 otherwise.
      node_mask / edge_mask: bool [N] / [E], True for real nodes / edges.
      node_kind: int32 [N] (0 pad, 1 feature map, 2 filter, 3 layer).
      node_layer: int32 [N], layer of filter/layer nodes and of a layer's output node, else -1.
      node_filter: int32 [N], filter index within the layer for filter nodes, else -1.
      node_group: int32 [N], coupled-group index (action group) of action nodes, else -1.
      action_mask: bool [N], True for action nodes (filter nodes, or layer nodes at layer level).
      valid: bool [N, P], valid patterns of action nodes (all False elsewhere).
      static_feat: float32 [N, len(STATIC_FEATURES)].
      n_groups: number of action groups (len(layer_graph.coupled_groups)).
      action_nodes: int32 [A], action nodes layer-major, filter order within a layer.
      action_layer: int32 [A], their layers (non-decreasing).
      layer_nodes: per layer, int32 array of its action nodes in filter order ([out_features] at
        filter level, [1] at layer level).
      kernel_paths / kernel_out_axes: per layer, the gather plan of the weight statistics.
    """

    layer_graph: LayerGraph
    level: str
    n_patterns: int
    bidirectional: bool
    n_nodes: int
    n_edges: int
    n_real_nodes: int
    n_real_edges: int
    senders: np.ndarray
    receivers: np.ndarray
    edge_type: np.ndarray
    edge_pattern_node: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    node_kind: np.ndarray
    node_layer: np.ndarray
    node_filter: np.ndarray
    node_group: np.ndarray
    action_mask: np.ndarray
    valid: np.ndarray
    static_feat: np.ndarray
    n_groups: int
    action_nodes: np.ndarray
    action_layer: np.ndarray
    layer_nodes: tuple[np.ndarray, ...]
    kernel_paths: tuple[Path, ...]
    kernel_out_axes: tuple[tuple[int, ...], ...]

    @property
    def n_action_nodes(self) -> int:
        return int(self.action_nodes.shape[0])

    @property
    def n_features(self) -> int:
        """Width F of `nodes["feat"]`: static ++ dynamic ++ one-hot pattern."""
        return len(STATIC_FEATURES) + len(DYNAMIC_FEATURES) + self.n_patterns


def n_edge_types(spec: GraphSpec) -> int:
    """Number of edge types (size of the GNN's edge-type embedding table)."""
    n = spec.n_patterns + N_FIXED_EDGE_TYPES
    return 2 * n if spec.bidirectional else n


def default_valid(
    layer_graph: LayerGraph, n_patterns: int = 6, library: str = "reference6"
) -> np.ndarray:
    """bool [n_layers, P]: `patterns.valid_patterns` of every layer for `library` (host-only).

    For "reference6": all 6 ids on 3x3 convs, only 0 (remove) and 5 (keep) elsewhere. Layers whose
    outputs are model outputs (the classifier head) may only keep: pruning them deletes classes.
    """
    lib = patterns.get_library(library)
    if lib.n_patterns != n_patterns:
        raise ValueError(
            f"library {library!r} has {lib.n_patterns} patterns but n_patterns={n_patterns}; "
            "pass a matching library or an explicit valid mask"
        )
    valid = np.stack([patterns.valid_patterns(layer, lib) for layer in layer_graph.layers])
    for i in output_layers(layer_graph):
        valid[i] = False
        valid[i, lib.keep_id] = True
    return valid


def output_layers(layer_graph: LayerGraph) -> tuple[int, ...]:
    """Indices of the layers that feed the model output directly (e.g. the classifier head)."""
    return tuple(sorted({s.producer for s in layer_graph.output_sources if s.producer >= 0}))


def _edge_kind(source, layer) -> int:
    if source.kind not in _KIND_TO_EDGE:
        raise ValueError(
            f"layer {layer.name}: unknown source kind {source.kind!r}; expected one of "
            f"{sorted(_KIND_TO_EDGE)} (see types.InputSource)"
        )
    return _KIND_TO_EDGE[source.kind]


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _layer_static(layer, max_depth: int, dense_macs: int, valid_row: np.ndarray) -> np.ndarray:
    """Static features of a filter / layer node of `layer` (kind columns left zero)."""
    f = np.zeros(len(STATIC_FEATURES), np.float32)
    depthwise = layer.kind == "conv" and layer.groups > 1 and layer.groups == layer.in_features
    if layer.kind == "dense":
        f[5] = 1.0
    elif depthwise:
        f[4] = 1.0
    else:
        f[3] = 1.0
    f[6] = math.log2(max(layer.in_features, 1)) / 10.0
    f[7] = math.log2(max(layer.out_features, 1)) / 10.0
    f[8] = layer.kernel_cells / 9.0
    f[9] = math.log2(float(np.mean(layer.strides))) if layer.strides else 0.0
    f[10] = layer.depth / max(max_depth, 1)
    f[11] = layer.macs / max(dense_macs, 1)
    f[12] = float(np.mean(valid_row))
    f[13] = math.log2(max(layer.n_positions, 1)) / 10.0
    return f


def _fmap_static(channels: int, depth_pos: float, n_positions: int) -> np.ndarray:
    f = np.zeros(len(STATIC_FEATURES), np.float32)
    f[0] = 1.0
    f[7] = math.log2(max(channels, 1)) / 10.0
    f[10] = depth_pos
    f[13] = math.log2(max(n_positions, 1)) / 10.0
    return f


def build_graph_spec(
    layer_graph: LayerGraph,
    *,
    n_patterns: int = 6,
    valid: Any = None,
    level: str = "filter",
    node_budget: int | None = None,
    edge_budget: int | None = None,
    bidirectional: bool = True,
    library: str = "reference6",
) -> GraphSpec:
    """Builds the static observation-graph spec of a model (host-only, once per model).

    Args:
      layer_graph: the traced model (`trace.trace_model`).
      n_patterns: P, size of the pattern library (ids 0..P-1).
      valid: bool [n_layers, P], valid patterns per layer; None -> `default_valid(layer_graph,
        n_patterns, library)` ("reference6": all on 3x3 convs, only 0 and 5 elsewhere).
      library: pattern library used for the default `valid`.
      level: "filter" (the paper's graph, one node per filter) or "layer" (one node per layer).
      node_budget / edge_budget: padded sizes; None -> real count (+1 padding node) rounded up to 8.
      bidirectional: add reversed edges with their own types (see module docstring).

    Returns:
      A `GraphSpec`. Raises ValueError on a bad level, budget or validity mask.
    """
    if level not in ("filter", "layer"):
        raise ValueError(f"level must be 'filter' or 'layer', got {level!r}")
    if n_patterns < 1:
        raise ValueError(f"n_patterns must be >= 1, got {n_patterns}")
    layers = layer_graph.layers
    n_layers = len(layers)
    if n_layers == 0:
        raise ValueError("layer_graph has no prunable layers; nothing to build a graph from")
    if valid is None:
        valid = default_valid(layer_graph, n_patterns, library)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n_layers, n_patterns):
        raise ValueError(
            f"valid must have shape (n_layers, n_patterns) = {(n_layers, n_patterns)}, got "
            f"{valid.shape}; build it with patterns.valid_patterns(layer_graph, library)"
        )
    if not valid.any(axis=1).all():
        bad = [layers[i].name for i in np.flatnonzero(~valid.any(axis=1))]
        raise ValueError(
            f"layers {bad} have no valid pattern; every layer needs at least the keep-all pattern"
        )
    group_of = layer_graph.group_of()
    max_depth = max(layer.depth for layer in layers)
    dense_macs = layer_graph.dense_macs
    fwd = n_patterns + N_FIXED_EDGE_TYPES

    kind, lay, filt, grp, feats, valid_rows = [], [], [], [], [], []

    def add_node(k, f, layer=-1, filter_=-1, group=-1, vrow=None):
        kind.append(k)
        lay.append(layer)
        filt.append(filter_)
        grp.append(group)
        feats.append(f)
        valid_rows.append(np.zeros(n_patterns, bool) if vrow is None else vrow)
        return len(kind) - 1

    in_channels = layer_graph.input_shape[-1] if layer_graph.input_shape else 1
    in_positions = int(np.prod(layer_graph.input_shape[:-1])) if layer_graph.input_shape else 1
    input_node = add_node(NODE_FMAP, _fmap_static(in_channels, 0.0, in_positions))

    # (sender, receiver, fixed_type, pattern_node) forward edges.
    edges: list[tuple[int, int, int, int]] = []
    layer_nodes: list[np.ndarray] = []
    out_node = [0] * n_layers  # filter level: output fmap node; layer level: the layer node
    for layer in layers:
        stat = _layer_static(layer, max_depth, dense_macs, valid[layer.index])
        if level == "filter":
            f = stat.copy()
            f[1] = 1.0
            ids = [
                add_node(NODE_FILTER, f, layer.index, c, group_of[layer.index], valid[layer.index])
                for c in range(layer.out_features)
            ]
            fm = _fmap_static(layer.out_features, stat[10], layer.n_positions)
            out_node[layer.index] = add_node(NODE_FMAP, fm, layer.index)
        else:
            f = stat.copy()
            f[2] = 1.0
            ids = [
                add_node(NODE_LAYER, f, layer.index, -1, group_of[layer.index], valid[layer.index])
            ]
            out_node[layer.index] = ids[0]
        layer_nodes.append(np.asarray(ids, np.int32))

    mixed_nodes: dict[int, int] = {}

    def always_alive_node(consumer) -> int:
        """The node standing for an ALWAYS_ALIVE source of `consumer`."""
        if consumer.depth == 0:
            return input_node
        d = consumer.depth
        if d not in mixed_nodes:
            pos = d / max(max_depth, 1)
            mixed_nodes[d] = add_node(
                NODE_FMAP, _fmap_static(consumer.in_features, pos, consumer.n_positions)
            )
        return mixed_nodes[d]

    merged_nodes: dict[tuple, int] = {}
    head_targets: list[tuple[int, int]] = []  # (target node, depth) needing head edges
    for layer in layers:
        srcs = layer.sources
        if level == "filter":
            if not srcs:  # no recorded source: treat as reading the model input
                in_node = input_node
            elif len(srcs) == 1 and srcs[0].producer != ALWAYS_ALIVE:
                in_node = out_node[srcs[0].producer]
            elif len(srcs) == 1:
                in_node = always_alive_node(layer)
                if layer.depth > 0 and in_node not in [t for t, _ in head_targets]:
                    head_targets.append((in_node, layer.depth))
            else:
                key = tuple(sorted((s.producer, s.kind, s.channels) for s in srcs))
                if key not in merged_nodes:
                    pos = layer.depth / max(max_depth, 1)
                    merged_nodes[key] = add_node(
                        NODE_FMAP, _fmap_static(layer.in_features, pos, layer.n_positions)
                    )
                    for s in srcs:
                        if s.producer == ALWAYS_ALIVE:
                            src_node = always_alive_node(layer)
                            if layer.depth > 0 and src_node not in [t for t, _ in head_targets]:
                                head_targets.append((src_node, layer.depth))
                        else:
                            src_node = out_node[s.producer]
                        etype = _edge_kind(s, layer) + n_patterns
                        edges.append((src_node, merged_nodes[key], etype, -1))
                in_node = merged_nodes[key]
            for n in layer_nodes[layer.index]:
                edges.append((in_node, int(n), 0, int(n)))  # typed by the pattern of n
                edges.append((int(n), out_node[layer.index], EDGE_CONCAT + n_patterns, -1))
        else:
            me = out_node[layer.index]
            for s in srcs:
                if s.producer != ALWAYS_ALIVE:
                    edges.append((out_node[s.producer], me, _edge_kind(s, layer) + n_patterns, -1))
                elif layer.depth == 0:
                    edges.append((input_node, me, _edge_kind(s, layer) + n_patterns, -1))
                elif (me, layer.depth) not in head_targets:
                    head_targets.append((me, layer.depth))
    # "head" edges into mixed nodes (or consumer layer nodes) from the layers one depth above.
    for target, d in head_targets:
        for layer in layers:
            if layer.depth == d - 1:
                edges.append((out_node[layer.index], target, EDGE_HEAD + n_patterns, -1))
    # Fixed types are absolute ids (P + offset); pattern edges store offset 0 and their filter.
    if bidirectional:
        edges = edges + [(r, s, t + fwd, p) for s, r, t, p in edges]

    n_real_nodes = len(kind)
    n_real_edges = len(edges)
    if node_budget is None:
        node_budget = _round_up(n_real_nodes + 1, 8)
    if edge_budget is None:
        edge_budget = _round_up(n_real_edges, 8)
    if node_budget < n_real_nodes + 1:
        raise ValueError(
            f"node_budget={node_budget} is too small: the graph has {n_real_nodes} real nodes and "
            f"needs one padding node; pass node_budget >= {n_real_nodes + 1} or None"
        )
    if edge_budget < n_real_edges:
        raise ValueError(
            f"edge_budget={edge_budget} is too small: the graph has {n_real_edges} real edges; "
            f"pass edge_budget >= {n_real_edges} or None"
        )
    n_pad_nodes = node_budget - n_real_nodes
    n_pad_edges = edge_budget - n_real_edges

    def pad(x, n, value):
        x = np.asarray(x)
        return np.concatenate([x, np.full((n,) + x.shape[1:], value, x.dtype)])

    e = np.asarray(edges, np.int32).reshape(-1, 4)
    senders = pad(e[:, 0], n_pad_edges, n_real_nodes).astype(np.int32)
    receivers = pad(e[:, 1], n_pad_edges, n_real_nodes).astype(np.int32)
    edge_type = pad(e[:, 2], n_pad_edges, 0).astype(np.int32)
    edge_pattern_node = pad(e[:, 3], n_pad_edges, -1).astype(np.int32)
    node_kind = pad(np.asarray(kind, np.int32), n_pad_nodes, NODE_PAD)
    action_mask = (node_kind == NODE_FILTER) | (node_kind == NODE_LAYER)
    action_nodes = np.concatenate(layer_nodes).astype(np.int32)
    action_layer = np.concatenate(
        [np.full(len(ns), i, np.int32) for i, ns in enumerate(layer_nodes)]
    )
    return GraphSpec(
        layer_graph=layer_graph,
        level=level,
        n_patterns=n_patterns,
        bidirectional=bidirectional,
        n_nodes=node_budget,
        n_edges=edge_budget,
        n_real_nodes=n_real_nodes,
        n_real_edges=n_real_edges,
        senders=senders,
        receivers=receivers,
        edge_type=edge_type,
        edge_pattern_node=edge_pattern_node,
        node_mask=np.arange(node_budget) < n_real_nodes,
        edge_mask=np.arange(edge_budget) < n_real_edges,
        node_kind=node_kind,
        node_layer=pad(np.asarray(lay, np.int32), n_pad_nodes, -1),
        node_filter=pad(np.asarray(filt, np.int32), n_pad_nodes, -1),
        node_group=pad(np.asarray(grp, np.int32), n_pad_nodes, -1),
        action_mask=action_mask,
        valid=pad(np.stack(valid_rows), n_pad_nodes, False),
        static_feat=pad(np.stack(feats).astype(np.float32), n_pad_nodes, 0.0),
        n_groups=len(layer_graph.coupled_groups),
        action_nodes=action_nodes,
        action_layer=action_layer,
        layer_nodes=tuple(layer_nodes),
        kernel_paths=tuple(layer.kernel_path for layer in layers),
        kernel_out_axes=tuple(tuple(layer.kernel_out_axes) for layer in layers),
    )


# ----------------------------------------------------------------------------------------------
# Jittable per-step parts.


def _kernel(params: Any, path: Path) -> jax.Array:
    """The kernel leaf at `path` in a variables dict or in the bare "params" collection."""
    return get_at(params, patterns.resolve_path(params, path))


def _filter_rows(kernel: jax.Array, out_axes: tuple[int, ...]) -> jax.Array:
    """Kernel -> [out_features, rest] (row-major over the output axes, as in `types.Layer`)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    n_out = math.prod(kernel.shape[a] for a in out_axes)
    moved = jnp.moveaxis(kernel, out_axes, tuple(range(len(out_axes))))
    return moved.reshape(n_out, -1)


def filter_l2_norms(spec: GraphSpec, params: Any) -> jax.Array:
    """L2 norm of every filter's kernel slice, float32 [A] in `spec.action_nodes` order.

    At layer level a layer node gets the L2 norm of its whole kernel. Jittable (spec closed over).
    """
    out = []
    for path, axes in zip(spec.kernel_paths, spec.kernel_out_axes, strict=True):
        rows = _filter_rows(_kernel(params, path), axes)
        l2 = jnp.sqrt(jnp.sum(rows * rows, axis=1))
        out.append(l2 if spec.level == "filter" else jnp.sqrt(jnp.sum(l2 * l2))[None])
    return jnp.concatenate(out)


def weight_statistics(spec: GraphSpec, params: Any) -> jax.Array:
    """Dynamic node features (`DYNAMIC_FEATURES`), float32 [A, 3] in `spec.action_nodes` order.

    Filter level, per filter: z-score of its kernel L2 norm within its layer, its L1 norm over the
    layer's mean filter L1 norm, fraction of exactly-zero weights. Layer level, per layer:
    coefficient of variation of the filter L2 norms, max / mean filter L1 norm, zero fraction.
    Jittable (spec closed over): one reshape and a few reductions per layer.
    """
    eps = 1e-8
    out = []
    for path, axes in zip(spec.kernel_paths, spec.kernel_out_axes, strict=True):
        rows = _filter_rows(_kernel(params, path), axes)
        l2 = jnp.sqrt(jnp.sum(rows * rows, axis=1))
        l1 = jnp.sum(jnp.abs(rows), axis=1)
        zero = jnp.mean((rows == 0).astype(jnp.float32), axis=1)
        mean_l1 = jnp.mean(l1)
        if spec.level == "filter":
            z = (l2 - jnp.mean(l2)) / (jnp.std(l2) + eps)
            out.append(jnp.stack([z, l1 / (mean_l1 + eps), zero], axis=1))
        else:
            cv = jnp.std(l2) / (jnp.mean(l2) + eps)
            row = jnp.stack([cv, jnp.max(l1) / (mean_l1 + eps), jnp.mean(zero)])
            out.append(row[None])
    return jnp.concatenate(out, axis=0)


def initial_pattern_ids(spec: GraphSpec, pattern: int | None = None) -> np.ndarray:
    """int32 [N]: `pattern` (default P-1, keep all) at action nodes, -1 elsewhere. Host-only."""
    p = spec.n_patterns - 1 if pattern is None else pattern
    return np.where(spec.action_mask, p, -1).astype(np.int32)


def edge_types(spec: GraphSpec, pattern_ids: jax.Array) -> jax.Array:
    """int32 [E]: pattern edges typed by their filter's current id, others their fixed type."""
    pn = jnp.asarray(spec.edge_pattern_node)
    pid = jnp.clip(jnp.asarray(pattern_ids, jnp.int32)[jnp.maximum(pn, 0)], 0, spec.n_patterns - 1)
    return jnp.where(pn >= 0, pid + jnp.asarray(spec.edge_type), jnp.asarray(spec.edge_type))


def make_observation(spec: GraphSpec, params: Any, pattern_ids: jax.Array) -> jraph.GraphsTuple:
    """The padded observation graph for the current state (jittable with `spec` static/closed).

    Args:
      spec: from `build_graph_spec`.
      params: the model's variables dict (kernels at `layer.kernel_path`).
      pattern_ids: int32 [N], current pattern id per action node (ignored elsewhere).

    Returns:
      GraphsTuple with nodes={"feat": f32 [N, F]} (static ++ weight statistics ++ one-hot current
      pattern; all zero on padding nodes), edges={"type": int32 [E]}, senders/receivers int32 [E],
      n_node / n_edge int32 [2] = (real, padding) counts, globals None.
    """
    pattern_ids = jnp.asarray(pattern_ids, jnp.int32)
    if pattern_ids.shape != (spec.n_nodes,):
        raise ValueError(
            f"pattern_ids must have shape [n_nodes]={spec.n_nodes}, got {pattern_ids.shape}; "
            "build it with graph.initial_pattern_ids(spec)"
        )
    stats = weight_statistics(spec, params)
    dyn = jnp.zeros((spec.n_nodes, len(DYNAMIC_FEATURES)), jnp.float32)
    return _graphs_tuple(spec, pattern_ids, dyn.at[jnp.asarray(spec.action_nodes)].set(stats))


def _graphs_tuple(spec: GraphSpec, pattern_ids: jax.Array, dyn: jax.Array) -> jraph.GraphsTuple:
    """The padded GraphsTuple from per-node dynamic features [N, D] and current pattern ids [N]."""
    action = jnp.asarray(spec.action_mask)
    onehot = jax.nn.one_hot(pattern_ids, spec.n_patterns, dtype=jnp.float32) * action[:, None]
    feat = jnp.concatenate([jnp.asarray(spec.static_feat), dyn, onehot], axis=1)
    return jraph.GraphsTuple(
        nodes={"feat": feat},
        edges={"type": edge_types(spec, pattern_ids)},
        senders=jnp.asarray(spec.senders),
        receivers=jnp.asarray(spec.receivers),
        n_node=jnp.asarray([spec.n_real_nodes, spec.n_nodes - spec.n_real_nodes], jnp.int32),
        n_edge=jnp.asarray([spec.n_real_edges, spec.n_edges - spec.n_real_edges], jnp.int32),
        globals=None,
    )


def example_observation(spec: GraphSpec) -> jraph.GraphsTuple:
    """A shape-correct observation without model params (dynamic features zero), for `init`."""
    pattern_ids = jnp.asarray(initial_pattern_ids(spec))
    dyn = jnp.zeros((spec.n_nodes, len(DYNAMIC_FEATURES)), jnp.float32)
    return _graphs_tuple(spec, pattern_ids, dyn)


def zero_out_padding(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """Zeroes node and edge features of padding (jittable; jraph's own uses removed JAX APIs).

    Assumes the `pad_with_graphs` layout: the last graph is the padding graph.
    """
    n_nodes = jax.tree.leaves(graph.nodes)[0].shape[0]
    n_edges = jax.tree.leaves(graph.edges)[0].shape[0]
    node_mask = jnp.arange(n_nodes) < jnp.sum(graph.n_node[:-1])
    edge_mask = jnp.arange(n_edges) < jnp.sum(graph.n_edge[:-1])

    def mask(m):
        def f(x):
            return jnp.where(m.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

        return f

    return graph._replace(
        nodes=jax.tree.map(mask(node_mask), graph.nodes),
        edges=jax.tree.map(mask(edge_mask), graph.edges),
    )


# ----------------------------------------------------------------------------------------------
# Importance-ordered placement (REFERENCE.md Sec. 3).


def importance_order(spec: GraphSpec, params: Any) -> jax.Array:
    """Action nodes sorted layer by layer, weakest first: int32 [A] (jittable or host).

    Within each layer the filter nodes are sorted by the L2 norm of their kernel slice in `params`
    (pass the ORIGINAL, unpruned params, once); ties keep filter order. Layers stay in index order,
    so entry k of layer l's segment is the k-th weakest filter of layer l.
    """
    l2 = filter_l2_norms(spec, params)
    perm = jnp.lexsort((l2, jnp.asarray(spec.action_layer)))
    return jnp.asarray(spec.action_nodes)[perm].astype(jnp.int32)


def place_by_importance(spec: GraphSpec, order: jax.Array, pattern_ids: jax.Array) -> jax.Array:
    """Re-places each layer's drawn ids so that the k-th weakest filter gets the k-th smallest.

    Args:
      order: int32 [A] from `importance_order`.
      pattern_ids: int32 [N] drawn ids at action nodes (other entries ignored).

    Returns:
      int32 [N]: placed ids at action nodes, -1 elsewhere. The multiset of ids of every layer is
      unchanged. Jittable: one sort of (layer, id) keys and one scatter.
    """
    p1 = spec.n_patterns + 1
    layer = jnp.asarray(spec.action_layer)
    ids = jnp.asarray(pattern_ids, jnp.int32)[jnp.asarray(spec.action_nodes)]
    keys = jnp.sort(layer * p1 + ids)
    sorted_ids = keys - layer * p1  # layer is non-decreasing, so segments line up
    out = jnp.full((spec.n_nodes,), -1, jnp.int32)
    return out.at[jnp.asarray(order)].set(sorted_ids)


def layer_pattern_ids(spec: GraphSpec, pattern_ids: jax.Array) -> tuple[jax.Array, ...]:
    """Per layer, int32 [out_features] pattern id of every filter (jittable).

    Filter level: a gather of the layer's filter nodes; layer level: the layer node's id broadcast.
    """
    pattern_ids = jnp.asarray(pattern_ids, jnp.int32)
    out = []
    for layer, nodes in zip(spec.layer_graph.layers, spec.layer_nodes, strict=True):
        ids = pattern_ids[jnp.asarray(nodes)]
        if spec.level == "layer":
            ids = jnp.broadcast_to(ids, (layer.out_features,))
        out.append(ids)
    return tuple(out)
