"""Static containers shared by every layer of sculpt-jax (layer 0).

`LayerGraph` is what `trace.trace_model` returns: host-side, hashable metadata (tuples of ints and
strings only) describing every prunable op of a model and the channel-level dataflow between them.
It is computed once per model and closed over (or passed as a static argument) by jitted code.

Conventions
-----------
* A *path* is a tuple of strings addressing a leaf of the model's variables dict, e.g.
  ``("params", "stage1_block0", "conv1", "kernel")`` (collection name first).
* A *layer* is one prunable op: a ``conv_general_dilated`` or a ``dot_general`` whose weight operand
  is a parameter leaf. Its *filters* (output features) are indexed ``0..out_features-1`` in the
  row-major flattening of the kernel's output axes; its *input features* likewise over the kernel's
  input axes.
* ``producer == -1`` in an `InputSource` means "always alive": the model input, or the output of an
  op that mixes channels (LayerNorm, attention softmax, ...) so that no single filter controls it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

Path = tuple[str, ...]

ALWAYS_ALIVE = -1


@dataclasses.dataclass(frozen=True)
class InputSource:
    """Where a layer's input features come from, for one producer.

    Attributes:
      producer: index of the producing layer in `LayerGraph.layers`, or `ALWAYS_ALIVE` (-1).
      channels: length ``in_features`` of the consumer; entry ``c`` is the producer's output
        channel that feeds consumer input feature ``c``, or -1 where this producer does not feed it
        (zero padding of an option-A shortcut, the other side of a concat).
      kind: "seq" (sole producer of every fed feature), "residual" (features also fed by another
        producer, i.e. summed) or "concat" (producer feeds a proper subset, disjoint from others).
    """

    producer: int
    channels: tuple[int, ...]
    kind: str = "seq"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One prunable op of a traced model. All fields are static Python values.

    Attributes:
      index: position in `LayerGraph.layers` (topological order).
      name: human-readable unique name, "/".join of the kernel path without collection and leaf.
      kind: "conv" or "dense".
      kernel_path: path of the weight leaf in the variables dict.
      affine_paths: paths of 1-D per-output-channel leaves applied elementwise to this layer's output
        before any other prunable op (own bias, BatchNorm scale and bias). When a filter is removed
        entirely, these entries are zeroed too, which makes the channel exactly zero after BN.
        A leaf is affine only where zeroing it zeroes its term (a leaf, a product with one, a sum
        of such; not exp(p) or p + 1), or where it divides the output (`divisor_paths`).
      kernel_shape: shape of the weight leaf as stored.
      kernel_spatial_axes / kernel_in_axes / kernel_out_axes: which kernel axes are spatial,
        contracted input features and output features (conv HWIO: (0, 1), (2,), (3,); dense (in,
        out): (), (0,), (1,); DenseGeneral (D, heads, dh): (), (0,), (1, 2)).
      in_features: number of input features of the op (the conv's full C_in, not C_in/groups).
      out_features: number of filters (product of the kernel's output axes).
      groups: feature_group_count of a conv (C_in for depthwise), 1 for dense.
      kernel_size: spatial kernel size, () for dense.
      strides, dilation: per spatial dim, () for dense.
      padding: ((lo, hi), ...) per spatial dim, () for dense.
      in_spatial / out_spatial: spatial size of the input / output feature map, () for dense.
      n_positions: how many times each filter is applied per example (H_out*W_out for a conv, the
        number of tokens for a dense layer on a sequence, 1 for a plain dense layer).
      macs: dense multiply-accumulates per example, counting a kernel cell only at output positions
        where it reads an in-bounds input (taps on zero padding are not work; this is what XLA's
        cost analysis counts): sum(cell_position_counts) * (in_features // groups) * out_features.
      sources: where the input features come from (see `InputSource`).
      depth: longest path (in prunable layers) from the input; 0 for the first layers.
      source_line: "file:line" of the user code that created the op, for messages.
      cell_positions: per spatial kernel cell (row-major over kernel_spatial_axes), the number of
        output positions per example at which it reads an in-bounds input; () means every cell at
        every one of the n_positions (no padding, or a dense layer). See `cell_position_counts`.
      divisor_paths: the affine_paths that divide the output (``y / t``): counted and removed
        with their filter like the others, but masks keep them (zeroing a divisor gives 0 / 0);
        the removed filter's output is zero without it. See `zeroed_affine_paths`.
      nonzero_dead_sources: producers whose removed filters' channels reach this layer's input
        NOT as zeros (an op with f(0) != 0 on the way: sigmoid, ``relu(x) + 1``): constants that
        compaction folds, but a kernel entry reading them is not redundant (AutoCompress's
        purification keeps it).
    """

    index: int
    name: str
    kind: str
    kernel_path: Path
    affine_paths: tuple[Path, ...]
    kernel_shape: tuple[int, ...]
    kernel_spatial_axes: tuple[int, ...]
    kernel_in_axes: tuple[int, ...]
    kernel_out_axes: tuple[int, ...]
    in_features: int
    out_features: int
    groups: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    n_positions: int
    macs: int
    sources: tuple[InputSource, ...]
    depth: int
    source_line: str = ""
    cell_positions: tuple[int, ...] = ()
    divisor_paths: tuple[Path, ...] = ()
    nonzero_dead_sources: tuple[int, ...] = ()

    @property
    def zeroed_affine_paths(self) -> tuple[Path, ...]:
        """The affine_paths a mask zeroes when the filter is removed (all but the divisors)."""
        return tuple(p for p in self.affine_paths if p not in self.divisor_paths)

    @property
    def cell_position_counts(self) -> tuple[int, ...]:
        """`cell_positions`, or n_positions for every cell when it is empty."""
        return self.cell_positions or (self.n_positions,) * self.kernel_cells

    @property
    def kernel_cells(self) -> int:
        """Number of spatial kernel cells (9 for 3x3, 1 for 1x1 and dense)."""
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    @property
    def params(self) -> int:
        """Number of weights in the kernel leaf (without affine params)."""
        n = 1
        for s in self.kernel_shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """Static graph of a model's prunable layers (see module docstring).

    Attributes:
      layers: prunable layers in topological order.
      input_shape: per-example input shape (no batch dim).
      output_sources: where the model output's features come from (as an `InputSource` tuple),
        the last axis of every activation leaf of the output, leaf after leaf.
      coupled_groups: tuples of layer indices whose outputs are summed channel-by-channel somewhere
        (residual adds, transitively closed). Every layer is in exactly one group (singletons too).
      other_flops: FLOPs per example of every non-prunable op (elementwise, pooling, normalisation,
        activation-activation matmuls), counted from the jaxpr; constant under pruning.
      total_params: number of entries in all "params" leaves of the model.
    """

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]
    output_sources: tuple[InputSource, ...]
    coupled_groups: tuple[tuple[int, ...], ...]
    other_flops: int
    total_params: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dense_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def dense_flops(self) -> int:
        """Exact FLOPs of the dense forward per example: 2 * MACs of prunable ops + other ops."""
        return 2 * self.dense_macs + self.other_flops

    def edges(self) -> tuple[tuple[int, int, str], ...]:
        """Layer-level dataflow edges (src, dst, kind); src == -1 for the model input."""
        out = []
        for layer in self.layers:
            for src in layer.sources:
                out.append((src.producer, layer.index, src.kind))
        return tuple(out)

    def group_of(self) -> tuple[int, ...]:
        """For each layer, the index of its coupled group in `coupled_groups`."""
        g = [0] * len(self.layers)
        for gi, members in enumerate(self.coupled_groups):
            for m in members:
                g[m] = gi
        return tuple(g)


class Transition(NamedTuple):
    """One environment step as stored by a rollout (leaves batched by scan/vmap)."""

    obs: object
    action: object
    log_prob: object
    value: object
    reward: object
    done: object
    info: object
