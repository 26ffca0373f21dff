"""Physical compaction of pruned models and measured latency (layer 5).

`compact(apply_fn, variables, graph, masks, sample_input)` turns a masked model into a smaller one
with the same outputs, without any per-model code: it re-interprets the jaxpr of
``apply_fn(variables, x, train=False)`` (params as jaxpr inputs, as `trace.trace_model` does) and
represents every activation by its *kept* channels along one feature axis:

* an activation value is ``(compact array, rep)`` where ``rep`` = (feature axis, kept channel
  indices ``idx`` of the full width ``C`` in the order they are stored (sorted except after a
  grouped conv), ``fill`` [C]): every dropped channel is known to be the constant ``fill[c]`` at
  every position (0 after a removed filter: its kernel, bias and BN scale/bias are zero,
  `masking.pattern_ids_to_masks`). ``rep = None`` means "full width".
* a prunable conv / dense (kernel = a `LayerGraph` kernel leaf) reads only the input channels that
  are kept or have a nonzero fill (dead input features are dropped together with the kernel entries
  reading them) and writes only its alive filters (`flops.alive_features`); a depthwise conv keeps
  the channels whose filter is alive AND whose input is kept (``feature_group_count`` shrinks).
  Kernel rows/columns that are zero in every kept filter (row/column patterns shared by all alive
  filters, e.g. reference6 pattern 3 = 011/011/011) are cropped (3x3 -> 3x2) with the padding
  shifted, when the padding stays >= 0 and the conv is not dilated.
* ``lowering="grouped"`` (pattern-grouped execution): a conv (feature_group_count 1, explicit
  padding, not dilated) instead groups its kept filters by their exact spatial footprint (the taps
  kept in any input channel) and runs one dense conv per group, its kernel cropped to the group's
  bounding box with the padding shifted by the crop (negative padding crops the input; exact for
  any stride). Reference6's five non-empty patterns (``patterns.py``: 001/001/001, 000/000/111,
  011/011/011, 000/111/111, full) become 3x1, 1x3, 3x2, 2x3 and 3x3 convs that store only masked
  entries; any library whose per-filter footprints are rectangles is covered the same way, and a
  non-rectangular footprint (figure8 per-kernel patterns: the union over input channels) runs as
  its bounding box with zeros (still exact). ViT region patterns have no spatial kernel: their
  dense layers keep the filter lowering (masked-only beyond filter removal). The group outputs are
  concatenated in group order, which is simply the activation's stored ``idx`` order: the
  permutation is folded into the consumers (BN/bias/kernel input rows are sliced on the host in
  that order), with no runtime gather, except where an elementwise op (a residual add) meets
  operands stored in different orders: the widest operand's order wins and the others are
  gathered into it (`_union_order`); ``group_coupled=False`` keeps the coupled convs on the
  filter lowering instead (no gathers). On XLA:CPU this lowering is 2-5x slower than dense on
  CIFAR ResNets (16-64 channels: thin per-group convs cost about a full one) and mixed on VGG-16
  (1.3x faster than the filter lowering at batch 1, 1.14x slower at 256; experiments/RESULTS.md
  "Pattern-grouped execution"), so "filters" stays the default.
* ``lowering="taps"``: the same footprint groups, ordered (`_tap_order`) so that the filters
  keeping each kernel tap are as few contiguous runs as possible (ONE run per tap for reference6:
  right column, right two columns, full, bottom two rows, bottom row), and the conv becomes one
  matmul per tap and run on a shifted, strided window of the padded input, zero-padded to the
  run's place and summed (NHWC-like layouts; others keep the filter lowering). FLOPs equal the
  masked kernel's; on XLA:CPU it pays only on wide layers: with ``group_min_width=128`` (thinner
  convs on the filter lowering) a pattern-pruned VGG-16 ran 1.8-2.1x faster than the filter
  lowering, while on 16-32 channels one tap-lowered conv is ~3x a dense one.
* ``lowering="auto"``: each conv on the lowering measured fastest for it on this backend and
  batch (`choose_lowerings`: every conv timed alone in each lowering it can take, one lowering per
  coupled group, and the result kept only if the whole model beats the filter lowering);
  ``layer_lowerings={name: lowering}`` pins single convs, and `choose_lowerings`' ``choices``
  passed back there rebuild the same model without measuring.
* elementwise ops take the union of their operands' kept channels (a residual-stream channel is
  dropped only where EVERY addend is dropped; sorted, or in the widest operand's order); per-channel parameter operands (BN, biases) are
  sliced, and the fill is pushed through the op (so ``(0 - mean) * 0 + 0`` stays exactly 0);
  structural ops (reshape, transpose, broadcast, slice, pad (option-A shortcuts pad the channel axis:
  new channels are dropped with fill 0), concatenate, reductions and pooling over other axes) keep the
  compact form; any other op gets its operands expanded back to full width (always correct).
* parameter-only computations are folded on the host: the compact model's variables
  (``compact_variables``) are the sliced, folded parameter operands of every op on activations,
  keyed ``"<eqn id>.<operand>"``; the plan (every activation's rep and every decision) is static.

``compact_apply_fn(compact_variables, x)`` is jitted; it re-traces the model's jaxpr for the batch
size of ``x`` (shapes only) and replays the plan, so any batch size works.

Params (`info`): ``params`` = kernel entries with mask != 0 kept in the compact kernels + affine
entries (bias, BN scale/bias: `Layer.affine_paths`) of kept alive filters + every other parameter.
Relation to the exact counter: ``params == flops.count_exact(graph, masks)["masked_params"]
- dropped_kernel_entries - dropped_affine_entries`` where ``dropped_kernel_entries`` are nonzero-mask
kernel entries of alive filters that read dead input features (their input is exactly 0, so
compaction drops them) and ``dropped_affine_entries`` belong to alive filters whose output is zero
anyway (a depthwise filter on a dead channel). Without removed filters both are 0 and ``params``
equals ``masked_params``. ``stored_params`` counts every stored compact entry (kernels include the
zeros of patterns that could not be cropped; BN statistics are folded in); under the grouped
lowering a reference6 model stores no kernel zeros at all (per-layer ``groups`` lists the group
kernels' shapes).

Host-only: `compact`, `choose_lowerings`, `auto_align`, `save_compact`, `load_compact`,
`measure_latency`, `measure_latencies`, `latency_report`, `unpruned_build`. The returned
``compact_apply_fn`` is jittable. Sections: AutoSculpt (arXiv 2412.18091) Sec. 4 (acceleration of pattern-pruned models by compaction);
latency measurement and `align` are ours.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import checkpoint, flops, masking, trace
from sculpt_jax import latency as latency_lib
from sculpt_jax import paths as paths_lib
from sculpt_jax.tree_util import flatten_with_paths, path_of
from sculpt_jax.types import LayerGraph

__all__ = [
    "LOWERINGS",
    "auto_align",
    "choose_lowerings",
    "compact",
    "latency_report",
    "load_compact",
    "measure_latencies",
    "measure_latency",
    "save_compact",
]

LOWERINGS = ("filters", "grouped", "taps")
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "rsqrt", "sqrt", "integer_pow", "pow", "erf", "erfc", "erf_inv", "abs",
    "sign", "select_n", "convert_element_type", "square", "ge", "gt", "le", "lt", "eq", "ne",
    "and", "or", "not", "copy", "copy_p", "stop_gradient", "sin", "cos", "reduce_precision",
    "clamp", "cbrt", "floor", "ceil", "round", "is_finite", "nextafter", "rem", "atan2",
}  # fmt: skip
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}


_alive_jit = jax.jit(flops.alive_features, static_argnums=0)


class CompactError(ValueError):
    """Compaction cannot proceed (message names the problem and the fix)."""


# --------------------------------------------------------------------------------------------
# Representation of activations.


@dataclasses.dataclass
class _Rep:
    """Static layout of a compact activation (see module docstring)."""

    axis: int
    idx: np.ndarray  # int64 [k], kept channels in storage order (unique, not always sorted)
    width: int
    fill: np.ndarray  # [width], value of every dropped channel

    def to_json(self) -> dict:
        return {
            "axis": self.axis,
            "idx": self.idx.tolist(),
            "width": self.width,
            "fill": self.fill.astype(np.float64).tolist(),
            "dtype": str(self.fill.dtype),
        }

    @staticmethod
    def from_json(d: dict | None) -> _Rep | None:
        if d is None:
            return None
        return _Rep(
            int(d["axis"]),
            np.asarray(d["idx"], np.int64),
            int(d["width"]),
            np.asarray(d["fill"], np.float64).astype(d["dtype"]),
        )

    def dropped(self) -> np.ndarray:
        m = np.ones(self.width, bool)
        m[self.idx] = False
        return m


@dataclasses.dataclass
class _A:
    """An activation: compact value and its rep (None = full width)."""

    val: Any
    rep: _Rep | None


@dataclasses.dataclass
class _P:
    """A parameter-derived value (concrete when recording, None when replaying)."""

    val: Any
    path: tuple | None = None


def _expand(a: _A, axis: int, target: np.ndarray):
    """The compact value of `a` restricted/extended to channels `target` along `axis`."""
    r = a.rep
    target = np.asarray(target, np.int64)
    if r is None:
        if np.array_equal(target, np.arange(a.val.shape[axis])):
            return a.val
        return jnp.take(a.val, target, axis=axis)
    if r.axis != axis:
        raise CompactError("internal: expanding along the wrong axis")
    inv = np.full(r.width, -1, np.int64)  # idx may be in any order (grouped convs permute)
    inv[r.idx] = np.arange(len(r.idx))
    pos = inv[target]
    present = pos >= 0
    pos_c = np.where(present, pos, 0)
    if present.all() and np.array_equal(pos, np.arange(len(r.idx))):
        return a.val
    padded = _expand_by_pad(a.val, axis, pos, present, r.fill[target])
    if padded is not None:
        return padded
    shape = [1] * a.val.ndim
    shape[axis] = len(target)
    if len(r.idx):
        g = jnp.take(a.val, pos_c, axis=axis)
    else:
        sh = list(a.val.shape)
        sh[axis] = len(target)
        g = jnp.zeros(sh, a.val.dtype)
    if present.all():
        return g
    fill = jnp.asarray(r.fill[target].astype(a.val.dtype).reshape(shape))
    return jnp.where(jnp.asarray(present.reshape(shape)), g, fill)


def _expand_by_pad(val, axis: int, pos: np.ndarray, present: np.ndarray, fill: np.ndarray):
    """`_expand` as one ``lax.pad`` (or None when it does not apply): when the present channels are
    one contiguous run of target positions read from consecutive channels of `val` and every
    absent channel has the same fill (an option-A shortcut's zero-padded channels). A pad fuses
    like the model's own pad; the gather + select it replaces costs ~10% of an unpruned
    ResNet-56's forward on XLA:CPU, recomputed in every fusion of the residual chain."""
    hit = np.nonzero(present)[0]
    if len(hit) == 0 or hit[-1] - hit[0] + 1 != len(hit):
        return None
    src = pos[hit]
    if not np.array_equal(src, np.arange(src[0], src[0] + len(src))):
        return None
    absent = fill[~present]
    if len(absent) and not np.all(absent == absent[0]):
        return None
    x = val
    if src[0] != 0 or len(src) != val.shape[axis]:
        x = jax.lax.slice_in_dim(val, int(src[0]), int(src[0]) + len(src), axis=axis)
    cfg = [(0, 0, 0)] * val.ndim
    cfg[axis] = (int(hit[0]), int(len(present) - 1 - hit[-1]), 0)
    c = absent[0] if len(absent) else 0
    return jax.lax.pad(x, jnp.asarray(c, val.dtype), cfg)


def _aligned(out: np.ndarray, width: int, live: np.ndarray, align: int) -> np.ndarray:
    """`out` (sorted kept filters of a layer of `width`) grown to a multiple of `align` (capped at
    `width`) with filters that are not live, lowest index first. The added filters read zero kernel
    entries, so they compute their true value (0 before any bias); materialising a channel is
    always exact, it only costs FLOPs. Thin layers run faster at aligned widths on some backends
    (`benchmarks/latency.py --align`)."""
    n = min(-(-len(out) // align) * align, width) if align > 1 else len(out)
    if n <= len(out):
        return out
    extra = np.nonzero(~np.isin(np.arange(width), out))[0]
    extra = np.concatenate([extra[~live[extra]], extra[live[extra]]])[: n - len(out)]
    return np.sort(np.concatenate([out, extra]))


def _full(a: _A):
    if a.rep is None:
        return a.val
    return _expand(a, a.rep.axis, np.arange(a.rep.width))


def _union_order(idxs: list[np.ndarray]) -> np.ndarray:
    """The kept channels of an elementwise op on operands kept at `idxs`: their union, sorted when
    every operand is sorted (the filter lowering), else in the order of the widest operand with
    the others' extra channels after it, so that operand is read without a gather and the others
    are gathered into its order (a residual add of two differently permuted grouped convs)."""
    if all(np.all(np.diff(i) > 0) for i in idxs):
        return np.unique(np.concatenate(idxs))
    base = max(idxs, key=len)
    if all(len(i) == len(base) and np.array_equal(i, base) for i in idxs):
        return base
    rest = np.concatenate(idxs)
    return np.concatenate([base, np.unique(rest[~np.isin(rest, base)])]).astype(np.int64)


def _const_along(v: np.ndarray, keep_axis: int | None) -> np.ndarray | None:
    """`v` reduced (keepdims) along every axis but `keep_axis` where constant; None if not."""
    out = v
    for d in range(v.ndim):
        if d == keep_axis or v.shape[d] == 1:
            continue
        first = np.take(out, [0], axis=d)
        if not np.array_equal(out, np.broadcast_to(first, out.shape), equal_nan=True):
            return None
        out = first
    return out


def _reduce_const(v: np.ndarray) -> np.ndarray:
    """`v` reduced (keepdims) along every axis where it is constant (batch-size independent)."""
    out = v
    for d in range(v.ndim):
        if v.shape[d] == 1:
            continue
        first = np.take(out, [0], axis=d)
        if np.array_equal(out, np.broadcast_to(first, out.shape), equal_nan=True):
            out = first
    return out


def _shape_with(shape, axis, n):
    s = list(shape)
    if axis is not None:
        s[axis] = n
    return tuple(s)


# --------------------------------------------------------------------------------------------
# The interpreter (record: decide + execute; replay: execute stored decisions).


class _Interp:
    def __init__(self, *, record: bool, plan: dict, cvars: dict, layers_by_kernel=None,
                 filter_alive=None, kernel_masks=None, crop: bool = True,
                 align: int = 1, lowering: str = "filters", group_min_width: int = 0,
                 group_min_filters: int = 1, ungrouped: frozenset = frozenset(),
                 layer_lowerings: dict | None = None):  # fmt: skip
        self.record = record
        self.plan = plan
        self.cvars = cvars
        self.layers_by_kernel = layers_by_kernel or {}
        self.filter_alive = filter_alive
        self.kernel_masks = kernel_masks or {}
        self.crop = crop
        self.align = int(align)
        self.lowering = lowering
        self.group_min_width = int(group_min_width)
        self.group_min_filters = int(group_min_filters)
        self.ungrouped = ungrouped  # layer indices kept on the filter lowering
        self.layer_lowerings = dict(layer_lowerings or {})  # layer index -> lowering (wins)
        self.sites: dict[int, list[str]] = {}  # layer index -> its conv equations' ids
        self.site_eqns: dict = {}  # conv equation id -> the equation (`_site_op`)
        self.eid = 0  # equations on activations: keys of the plan and of compact_variables
        self.pid = 0  # parameter-only equations: keys of `pvals` (see `_param_pass`)
        self.layer_info: dict[int, dict] = {}
        self.pvals: dict = {}

    def run(self, jaxpr, consts, args):
        literal = lambda val: _P(np.asarray(val) if self.record else val)  # noqa: E731
        return trace.walk_jaxpr(jaxpr, consts, args, self.eqn, literal)

    def run_closed(self, closed, args):
        if hasattr(closed, "consts"):
            consts = [_P(np.asarray(c) if self.record else None) for c in closed.consts]
            if not self.record:  # closed-over constants are needed at replay: keep them concrete
                consts = [_P(c) for c in closed.consts]
            return self.run(closed.jaxpr, consts, args)
        return self.run(closed, [], args)

    def eqn(self, eqn, ins):
        # Equations on activations and parameter-only ones are numbered apart: the jaxpr at
        # another batch size may add or drop parameter-only equations (a [1, 1, D] class token
        # is broadcast to [B, 1, D] only when B > 1), never equations on activations.
        name = eqn.primitive.name
        if name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]]
            n = len(sub.jaxpr.invars if hasattr(sub, "jaxpr") else sub.invars)
            return self.run_closed(sub, ins[len(ins) - n :] if n < len(ins) else ins)
        if not any(isinstance(x, _A) for x in ins):
            pid = self.pid
            self.pid += 1
            if not self.record:
                if all(x.val is not None for x in ins):  # constants only (replay literals)
                    outs = eqn.primitive.bind(*[x.val for x in ins], **eqn.params)
                    outs = outs if eqn.primitive.multiple_results else [outs]
                    return [_P(o) for o in outs]
                return [_P(None) for _ in eqn.outvars]
            outs = [self.pvals[f"{pid}:{k}"] for k in range(len(eqn.outvars))]
            path = ins[0].path if (
                len(ins) == 1 and name in ("convert_element_type", "copy", "copy_p")
            ) else None  # fmt: skip
            return [_P(np.asarray(o), path) for o in outs]
        eid = str(self.eid)
        self.eid += 1
        if self.record:
            d = self.decide(eqn, ins, eid)
            self.plan[eid] = d
        else:
            if eid not in self.plan:
                raise CompactError(
                    f"compact plan has no entry for equation {eid} ({name}); the model's jaxpr "
                    "differs from the one it was compacted from: use the same apply_fn and JAX "
                    "version, or re-run compact()."
                )
            d = self.plan[eid]
        return self.execute(eqn, ins, eid, d)

    # ---- helpers --------------------------------------------------------------------------

    def _store_params(self, ins, eid, transform=None):
        """Stores every parameter operand as a cvar (record) and returns operand list."""
        for j, x in enumerate(ins):
            if isinstance(x, _P) and self.record:
                v = np.asarray(x.val)
                v = transform(j, v) if transform else _reduce_const(v)
                self.cvars[f"{eid}.{j}"] = v

    def _pvals(self, eqn, ins, eid, target_shapes):
        out = []
        for j, x in enumerate(ins):
            if isinstance(x, _P):
                v = self.cvars[f"{eid}.{j}"]
                v = jnp.asarray(v)
                if target_shapes is not None and target_shapes[j] is not None:
                    v = jnp.broadcast_to(v, target_shapes[j])
                out.append(v)
            else:
                out.append(x)
        return out

    # ---- decisions (record only) ----------------------------------------------------------

    def decide(self, eqn, ins, eid) -> dict:
        name = eqn.primitive.name
        acts = [x for x in ins if isinstance(x, _A)]
        try:
            if name == "conv_general_dilated" and self._kernel_layer(ins[1]) is not None:
                if isinstance(ins[0], _A):
                    return self.decide_conv(eqn, ins, eid)
            if name == "dot_general":
                for k in (0, 1):
                    if isinstance(ins[1 - k], _A) and self._kernel_layer(ins[k]) is not None:
                        return self.decide_dot(eqn, ins, eid, k)
            if any(a.rep is None for a in acts):
                return self.decide_full(eqn, ins, eid)
            if name in _ELEMENTWISE:
                return self.decide_ew(eqn, ins, eid)
            if len(acts) == 1 and isinstance(ins[0], _A):
                d = self.decide_struct(eqn, ins, eid)
                if d is not None:
                    return d
            if name == "concatenate" and all(isinstance(x, _A) for x in ins):
                d = self.decide_concat(eqn, ins)
                if d is not None:
                    return d
        except _Fallback:
            pass
        return self.decide_full(eqn, ins, eid)

    def _kernel_layer(self, x):
        if isinstance(x, _P) and x.path is not None:
            return self.layers_by_kernel.get(tuple(x.path))
        return None

    def decide_full(self, eqn, ins, eid):
        self._store_params(ins, eid)
        return {"kind": "full", "out": [None] * len(eqn.outvars)}

    def decide_ew(self, eqn, ins, eid):
        acts = [x for x in ins if isinstance(x, _A)]
        axes = {a.rep.axis for a in acts}
        widths = {a.rep.width for a in acts}
        if len(axes) != 1 or len(widths) != 1:
            raise _Fallback
        axis, width = axes.pop(), widths.pop()
        rank = len(eqn.outvars[0].aval.shape)
        vecs, red = [], {}
        for j, x in enumerate(ins):
            if isinstance(x, _A):
                if x.val.ndim != rank:
                    raise _Fallback
                vecs.append(x.rep.fill)
                continue
            v = np.asarray(x.val)
            if v.ndim == 0:
                r = v
                vecs.append(np.full((width,), v, v.dtype))
            elif v.ndim == rank:
                r = _const_along(v, axis)
                if r is None or r.shape[axis] not in (1, width):
                    raise _Fallback
                vecs.append(np.broadcast_to(r.reshape(-1), (width,)))
            else:
                raise _Fallback
            red[j] = r
        idx = _union_order([a.rep.idx for a in acts])
        fill = _np_elementwise(eqn, vecs)
        for j, r in red.items():
            if r.ndim and r.shape[axis] == width:
                r = np.take(r, idx, axis=axis)
            self.cvars[f"{eid}.{j}"] = r
        return {"kind": "ew", "axis": axis, "idx": idx.tolist(),
                "out": [_Rep(axis, idx, width, fill).to_json()]}  # fmt: skip

    def decide_struct(self, eqn, ins, eid):
        name = eqn.primitive.name
        a = ins[0]
        r = a.rep
        p = eqn.params
        in_shape = tuple(a.val.shape)
        in_shape = _shape_with(in_shape, r.axis, r.width)
        out_shape = tuple(eqn.outvars[0].aval.shape)
        new = None
        if name == "reshape" and p.get("dimensions") is None and len(ins) == 1:
            pre = math.prod(in_shape[: r.axis])
            post = math.prod(in_shape[r.axis + 1 :])
            for b in range(len(out_shape)):
                if (math.prod(out_shape[:b]) == pre and out_shape[b] == r.width
                        and math.prod(out_shape[b + 1:]) == post):  # fmt: skip
                    new = _Rep(b, r.idx, r.width, r.fill)
                    break
        elif name == "transpose":
            new = _Rep(list(p["permutation"]).index(r.axis), r.idx, r.width, r.fill)
        elif name == "broadcast_in_dim" and len(ins) == 1:
            new = _Rep(p["broadcast_dimensions"][r.axis], r.idx, r.width, r.fill)
        elif name == "squeeze":
            if r.axis not in p["dimensions"]:
                new = _Rep(r.axis - sum(d < r.axis for d in p["dimensions"]), r.idx, r.width,
                           r.fill)  # fmt: skip
        elif name == "slice":
            st = p.get("strides") or (1,) * len(in_shape)
            if (p["start_indices"][r.axis] == 0 and p["limit_indices"][r.axis] == r.width
                    and st[r.axis] == 1):  # fmt: skip
                new = r
        elif name in _REDUCE:
            axes = tuple(p["axes"])
            ok = r.axis not in axes and (
                name != "reduce_sum" or not np.any(r.fill[r.dropped()] != 0)
            )
            if ok:
                new = _Rep(r.axis - sum(d < r.axis for d in axes), r.idx, r.width, r.fill)
        elif name in _WINDOW:
            wd, ws = p["window_dimensions"], p["window_strides"]
            pad = p["padding"]
            ok = wd[r.axis] == 1 and ws[r.axis] == 1 and tuple(pad[r.axis]) == (0, 0)
            ok = ok and all(x == 1 for x in p.get("base_dilation", ()) or ())
            if name == "reduce_window_sum" and np.any(r.fill[r.dropped()] != 0):
                ok = False
            if ok:
                new = r
        elif name == "pad" and isinstance(ins[1], _P):
            pv = np.asarray(ins[1].val)
            cfg = [tuple(c) for c in p["padding_config"]]
            lo, hi, interior = cfg[r.axis]
            other = any(c != (0, 0, 0) for i, c in enumerate(cfg) if i != r.axis)
            if interior == 0 and lo >= 0 and hi >= 0:
                if not other or np.all(r.fill[r.dropped()] == pv):
                    fill = np.concatenate([np.full(lo, pv, r.fill.dtype), r.fill,
                                           np.full(hi, pv, r.fill.dtype)])  # fmt: skip
                    new = _Rep(r.axis, r.idx + lo, r.width + lo + hi, fill)
        if new is None:
            return None
        self._store_params(ins, eid)
        return {"kind": "struct", "out": [new.to_json()]}

    def decide_concat(self, eqn, ins):
        dim = eqn.params["dimension"]
        axes = {x.rep.axis for x in ins}
        if len(axes) != 1 or axes != {dim}:
            return None
        idx, fill, off = [], [], 0
        for x in ins:
            idx.append(x.rep.idx + off)
            fill.append(x.rep.fill)
            off += x.rep.width
        rep = _Rep(dim, np.concatenate(idx), off, np.concatenate(fill))
        return {"kind": "struct", "out": [rep.to_json()]}

    def _need(self, a: _A, feat: int, width: int) -> np.ndarray:
        r = a.rep
        if r is None or r.axis != feat:
            return np.arange(width)
        nz = np.nonzero((r.fill != 0) & r.dropped())[0]
        return np.concatenate([r.idx, nz])  # the stored order first: no gather to read it

    def decide_conv(self, eqn, ins, eid):
        p = eqn.params
        li = self._kernel_layer(ins[1])
        layer = self.layers_by_kernel_layer[li]
        dn = p["dimension_numbers"]
        lf, (ro, ri), of = dn.lhs_spec[1], dn.rhs_spec[:2], dn.out_spec[1]
        k = np.asarray(ins[1].val)
        kmask = self.kernel_masks.get(layer.kernel_path)
        kmask = np.ones(k.shape, bool) if kmask is None or kmask.shape != k.shape else kmask
        a = ins[0]
        width = a.val.shape[lf] if a.rep is None else a.rep.width
        fcount = k.shape[ro]
        g = p["feature_group_count"]
        if p["batch_group_count"] != 1 or fcount != layer.out_features:
            raise _Fallback
        alive = np.asarray(self.filter_alive[li], bool)
        need = self._need(a, lf, width)
        if g == 1:
            nzk = np.moveaxis(np.take(kmask, need, axis=ri), ro, 0).reshape(fcount, -1)
            live = alive & nzk.any(axis=1)
            out = np.nonzero(live)[0]
            s = need
        elif k.shape[ri] == 1 and g == width == fcount:
            inset = np.zeros(width, bool)
            inset[need] = True
            live = alive & inset
            out = need[live[need]]  # in the input's stored order: read without a gather
            s = out
        else:
            live = np.ones(fcount, bool)
            out = np.arange(fcount)
            s = np.arange(width)
        if len(out) == 0:
            out = np.asarray([0])
            s = out if g > 1 else s
        padding = [list(x) for x in p["padding"]] if not isinstance(p["padding"], str) else None
        feature_last = tuple(dn.lhs_spec) == tuple(dn.out_spec) and lf == k.ndim - 1
        self.sites.setdefault(li, []).append(eid)
        self.site_eqns[eid] = eqn
        low = self._lowering_at(li, len(out))
        if (g == 1 and low != "filters" and (low != "taps" or feature_last)
                and padding is not None and all(d == 1 for d in p["rhs_dilation"])
                and all(d == 1 for d in p["lhs_dilation"])):  # fmt: skip
            return self.decide_gconv(eqn, eid, layer, k, kmask, width, s, out, live, alive,
                                     padding, low)  # fmt: skip
        if g == 1:
            out = _aligned(out, fcount, live, self.align)
        kc = np.take(k, out, axis=ro)
        mc = np.take(kmask, out, axis=ro)
        if g == 1:
            kc, mc = np.take(kc, s, axis=ri), np.take(mc, s, axis=ri)
        new_g = len(out) if (g > 1 and k.shape[ri] == 1 and g == width == fcount) else g
        crop = []
        if (self.crop and padding is not None and all(d == 1 for d in p["rhs_dilation"])
                and all(d == 1 for d in p["lhs_dilation"])):  # fmt: skip
            for si, sd in enumerate(dn.rhs_spec[2:]):
                other = tuple(d for d in range(kc.ndim) if d != sd)
                nz = np.nonzero(np.any(mc, axis=other))[0]
                if len(nz) == 0:
                    continue
                lo_cut, hi_cut = int(nz[0]), int(kc.shape[sd] - 1 - nz[-1])
                lo_cut = min(lo_cut, padding[si][0])
                hi_cut = min(hi_cut, padding[si][1])
                if lo_cut or hi_cut:
                    sl = np.arange(lo_cut, kc.shape[sd] - hi_cut)
                    kc, mc = np.take(kc, sl, axis=sd), np.take(mc, sl, axis=sd)
                    padding[si] = [padding[si][0] - lo_cut, padding[si][1] - hi_cut]
                    crop.append((si, lo_cut, hi_cut))
        self.cvars[f"{eid}.1"] = kc
        self._layer_record(layer, width, s, out, live, alive, kmask, mc, kc, crop)
        dtype = np.dtype(eqn.outvars[0].aval.dtype)
        rep = _Rep(of, np.asarray(out, np.int64), fcount, np.zeros(fcount, dtype))
        return {"kind": "conv", "in_axis": lf, "in_idx": np.asarray(s).tolist(),
                "groups": int(new_g), "padding": padding, "out": [rep.to_json()]}  # fmt: skip

    def _lowering_at(self, li: int, n_out: int) -> str:
        """Layer li's lowering: its `layer_lowerings` entry, else "filters" for a coupled conv
        under ``group_coupled=False`` or one of fewer than group_min_width kept filters, else
        the model-wide lowering."""
        if li in self.layer_lowerings:
            return self.layer_lowerings[li]
        if li in self.ungrouped or n_out < self.group_min_width:
            return "filters"
        return self.lowering

    def decide_gconv(self, eqn, eid, layer, k, kmask, width, s, out, live, alive, padding,
                     lowering):  # fmt: skip
        """The grouped lowering of a (feature_group_count 1) conv: its kept filters `out` grouped
        by their exact spatial footprint (`_footprint_groups`), each group one conv with the
        kernel cropped to the group's bounding box of taps and the padding shifted by the crop
        (negative padding = the input cropped; exact for any stride). The group outputs are
        concatenated in group order, which becomes the activation's stored channel order; its
        consumers (BN, bias, next kernels' input rows) are sliced in that order on the host."""
        dn = eqn.params["dimension_numbers"]
        ro, ri, sp = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
        kc = np.take(np.take(k, out, axis=ro), s, axis=ri)
        mc = np.take(np.take(kmask, out, axis=ro), s, axis=ri)
        foot = np.moveaxis(mc.any(axis=ri, keepdims=True), (ro, *sp), range(1 + len(sp)))
        foot = foot.reshape(foot.shape[: 1 + len(sp)])  # [F, *spatial]
        if lowering == "taps":
            return self.decide_taps(eqn, eid, layer, kc, mc, kmask, foot, width, s, out, live,
                                    alive, padding)  # fmt: skip
        convs, order, shapes = [], [], []
        for j, members in enumerate(_footprint_groups(foot, self.group_min_filters)):
            box = np.nonzero(foot[members].any(axis=0))
            kg = np.take(kc, members, axis=ro)
            pad = [list(pp) for pp in padding]
            for si, sd in enumerate(sp):
                lo, hi = int(box[si].min()), int(box[si].max())
                kg = np.take(kg, np.arange(lo, hi + 1), axis=sd)
                pad[si] = [pad[si][0] - lo, pad[si][1] - (k.shape[sd] - 1 - hi)]
            self.cvars[f"{eid}.1.{j}"] = kg
            convs.append({"padding": pad})
            order.append(np.asarray(out)[members])
            shapes.append(list(kg.shape))
        out = np.concatenate(order)
        self._layer_record(layer, width, s, out, live, alive, kmask, mc, kc, [])
        self.layer_info[layer.index]["groups"] = shapes
        fcount = k.shape[ro]
        dtype = np.dtype(eqn.outvars[0].aval.dtype)
        rep = _Rep(dn.out_spec[1], out.astype(np.int64), fcount, np.zeros(fcount, dtype))
        return {"kind": "gconv", "in_axis": dn.lhs_spec[1], "in_idx": np.asarray(s).tolist(),
                "convs": convs, "out": [rep.to_json()]}  # fmt: skip

    def decide_taps(self, eqn, eid, layer, kc, mc, kmask, foot, width, s, out, live, alive,
                    padding):
        """The tap lowering of a conv (NHWC-like layouts: feature axis last in input and output):
        the kept filters ordered by footprint group (`_tap_order`) so that the filters keeping
        each kernel tap form few contiguous runs (one for reference6), then one matmul per tap
        and run, ``x_padded[shifted, strided window] @ W[tap][:, run]``, each zero-padded to the
        run's place and summed; exact for any stride. The order is the output's stored order.
        Other layouts keep the filter lowering (`decide_conv`)."""
        dn = eqn.params["dimension_numbers"]
        ro, ri, sp = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
        groups = _footprint_groups(foot, self.group_min_filters)
        members = np.concatenate([groups[i] for i in _tap_order(groups, foot)])
        foot_o, kc_o = foot[members], np.take(kc, members, axis=ro)
        taps = []
        for tap in np.ndindex(*foot.shape[1:]):
            w = kc_o
            for si in reversed(range(len(sp))):  # highest axis first keeps the others in place
                w = np.take(w, tap[si], axis=sp[si])
            w = w if ri < ro else w.T  # [I, F]
            for lo, hi in _runs(foot_o[(slice(None), *tap)]):
                self.cvars[f"{eid}.1.{len(taps)}"] = np.ascontiguousarray(w[:, lo:hi])
                taps.append({"tap": [int(t) for t in tap], "lo": lo, "hi": hi})
        out = np.asarray(out)[members]
        self._layer_record(layer, width, s, out, live, alive, kmask, mc, kc, [])
        self.layer_info[layer.index]["taps"] = len(taps)
        fcount = layer.out_features
        dtype = np.dtype(eqn.outvars[0].aval.dtype)
        rep = _Rep(dn.out_spec[1], out.astype(np.int64), fcount, np.zeros(fcount, dtype))
        return {"kind": "taps", "in_axis": dn.lhs_spec[1], "in_idx": np.asarray(s).tolist(),
                "padding": padding, "taps": taps, "out": [rep.to_json()]}  # fmt: skip

    def decide_dot(self, eqn, ins, eid, kpos):
        p = eqn.params
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        if lb or rb:
            raise _Fallback
        li = self._kernel_layer(ins[kpos])
        layer = self.layers_by_kernel_layer[li]
        k = np.asarray(ins[kpos].val)
        kmask = self.kernel_masks.get(layer.kernel_path)
        kmask = np.ones(k.shape, bool) if kmask is None or kmask.shape != k.shape else kmask
        a = ins[1 - kpos]
        ac, kc_dims = (lc, rc) if kpos == 1 else (rc, lc)
        kfree = [d for d in range(k.ndim) if d not in kc_dims]
        if len(ac) == 1:
            af = ac[0]
            width = a.val.shape[af] if a.rep is None else a.rep.width
            need = self._need(a, af, width)
            kin = kc_dims[0]
        else:
            af, kin, need, width = None, None, None, None
        alive = np.asarray(self.filter_alive[li], bool)
        sliced_out = len(kfree) == 1 and k.shape[kfree[0]] == layer.out_features
        kk, mm = k, kmask
        if need is not None:
            kk, mm = np.take(kk, need, axis=kin), np.take(mm, need, axis=kin)
        if sliced_out:
            ko = kfree[0]
            nzk = np.moveaxis(mm, ko, 0).reshape(k.shape[ko], -1).any(axis=1)
            live = alive & nzk
            out = np.nonzero(live)[0]
            if len(out) == 0:
                out = np.asarray([0])
            out = _aligned(out, k.shape[ko], live, self.align)
            kk, mm = np.take(kk, out, axis=ko), np.take(mm, out, axis=ko)
            a_nd = len(eqn.invars[1 - kpos].aval.shape)
            if kpos == 1:
                oaxis = a_nd - len(ac)
            else:
                oaxis = kfree.index(ko)
            dtype = np.dtype(eqn.outvars[0].aval.dtype)
            rep = _Rep(oaxis, np.asarray(out, np.int64), layer.out_features,
                       np.zeros(layer.out_features, dtype)).to_json()  # fmt: skip
        else:
            live = np.ones(layer.out_features, bool)
            out = np.arange(layer.out_features)
            rep = None
        self.cvars[f"{eid}.{kpos}"] = kk
        s = need if need is not None else np.arange(layer.in_features)
        self._layer_record(layer, layer.in_features, s, out, live, alive, kmask, mm, kk, [])
        return {"kind": "dot", "kpos": kpos, "in_axis": af,
                "in_idx": None if need is None else np.asarray(need).tolist(),
                "out": [rep]}  # fmt: skip

    def _layer_record(self, layer, width, s, out, live, alive, kmask, mc, kc, crop):
        kept_alive = np.zeros(layer.out_features, bool)
        kept_alive[np.asarray(out)] = True
        kept_alive &= alive
        self.layer_info[layer.index] = {
            "name": layer.name,
            "in_before": int(layer.in_features),
            "in_after": int(len(s)),
            "out_before": int(layer.out_features),
            "out_after": int(len(out)),
            "kernel_before": list(kmask.shape),
            "kernel_after": list(kc.shape),
            "cropped": [list(c) for c in crop],
            "kept_kernel_entries": int(np.count_nonzero(mc)),
            "masked_kernel_entries": int(np.count_nonzero(kmask)),
            "kept_alive_filters": int(kept_alive.sum()),
            "alive_filters": int(alive.sum()),
        }

    # ---- execution (record and replay) ----------------------------------------------------

    def execute(self, eqn, ins, eid, d):
        kind = d["kind"]
        p = dict(eqn.params)
        reps = [_Rep.from_json(r) for r in d["out"]]
        in_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else None
                     for v in eqn.invars]  # fmt: skip
        if kind == "full":
            vals = self._pvals(eqn, ins, eid, in_shapes)
            vals = [_full(x) if isinstance(x, _A) else x for x in vals]
            outs = eqn.primitive.bind(*vals, **p)
            outs = outs if eqn.primitive.multiple_results else [outs]
            return [_A(o, None) for o in outs]
        if kind == "ew":
            axis, idx = d["axis"], np.asarray(d["idx"], np.int64)
            tgt = _shape_with(eqn.outvars[0].aval.shape, axis, len(idx))
            vals = self._pvals(eqn, ins, eid, [tgt] * len(ins))
            vals = [_expand(x, axis, idx) if isinstance(x, _A) else x for x in vals]
            return [_A(eqn.primitive.bind(*vals, **p), reps[0])]
        if kind in _CONV_KINDS:
            x = _expand(ins[0], d["in_axis"], np.asarray(d["in_idx"], np.int64))
            ks = [jnp.asarray(k) for k in _conv_kernels(self.cvars, eid, d)]
            return [_A(_run_conv(eqn, x, d, ks), reps[0])]
        if kind == "dot":
            kpos = d["kpos"]
            a = ins[1 - kpos]
            if d["in_idx"] is not None:
                x = _expand(a, d["in_axis"], np.asarray(d["in_idx"], np.int64))
            else:
                x = _full(a)
            w = jnp.asarray(self.cvars[f"{eid}.{kpos}"])
            ops = [w, x] if kpos == 0 else [x, w]
            return [_A(eqn.primitive.bind(*ops, **p), reps[0])]
        if kind == "struct":
            return [_A(self._exec_struct(eqn, ins, eid, reps[0], p), reps[0])]
        raise CompactError(f"unknown plan entry kind {kind!r}; re-run compact().")

    def _exec_struct(self, eqn, ins, eid, out_rep, p):
        name = eqn.primitive.name
        if name == "concatenate":
            return eqn.primitive.bind(*[x.val for x in ins], **p)
        a = ins[0]
        r = a.rep
        k = len(r.idx)
        vals = [a.val] + [jnp.asarray(self.cvars[f"{eid}.{j}"]) for j in range(1, len(ins))]
        if name == "reshape":
            p["new_sizes"] = _shape_with(p["new_sizes"], out_rep.axis, k)
        elif name == "broadcast_in_dim":
            p["shape"] = _shape_with(p["shape"], out_rep.axis, k)
        elif name == "slice":
            lim = list(p["limit_indices"])
            lim[r.axis] = k
            p["limit_indices"] = tuple(lim)
        elif name == "pad":
            cfg = [tuple(c) for c in p["padding_config"]]
            cfg[r.axis] = (0, 0, 0)
            p["padding_config"] = tuple(cfg)
            vals[1] = vals[1].reshape(()).astype(a.val.dtype)
        return eqn.primitive.bind(*vals, **p)


# --------------------------------------------------------------------------------------------
# The lowered conv ops (record, replay and `choose_lowerings`' per-layer timing run the same code).

_CONV_KINDS = ("conv", "gconv", "taps")


def _conv_kernels(cvars: dict, eid: str, d: dict) -> list:
    """The kernels of conv plan entry `d` (equation `eid`) in `cvars`, in the order `_run_conv`
    reads them: one for "conv", one per group for "gconv", one per tap run for "taps"."""
    if d["kind"] == "conv":
        return [cvars[f"{eid}.1"]]
    n = len(d["convs"]) if d["kind"] == "gconv" else len(d["taps"])
    return [cvars[f"{eid}.1.{j}"] for j in range(n)]


def _run_conv(eqn, x, d: dict, kernels: list):
    """The conv equation `eqn` lowered as plan entry `d` on `x` (the input already restricted to
    ``d["in_idx"]``), with `kernels` (`_conv_kernels`); jittable."""
    p = dict(eqn.params)
    if d["kind"] == "conv":
        p["feature_group_count"] = d["groups"]
        if d["padding"] is not None:
            p["padding"] = tuple(tuple(int(v) for v in pp) for pp in d["padding"])
        return eqn.primitive.bind(x, kernels[0], **p)
    if d["kind"] == "gconv":
        outs = []
        for c, w in zip(d["convs"], kernels, strict=True):
            p["padding"] = tuple(tuple(int(v) for v in pp) for pp in c["padding"])
            outs.append(eqn.primitive.bind(x, w, **p))
        axis = p["dimension_numbers"].out_spec[1]
        return outs[0] if len(outs) == 1 else jax.lax.concatenate(outs, axis)
    return _run_taps(eqn, x, d, kernels, len(d["out"][0]["idx"]))


def _run_taps(eqn, x, d: dict, kernels: list, n_out: int):
    """The tap lowering (`_Interp.decide_taps`): one matmul per kernel tap and filter run on a
    shifted, strided window of the padded input, zero-padded to the run's place and summed."""
    p = eqn.params
    sp_axes = tuple(p["dimension_numbers"].lhs_spec[2:])
    cfg = [(0, 0, 0)] * x.ndim
    for si, ax in enumerate(sp_axes):
        cfg[ax] = (int(d["padding"][si][0]), int(d["padding"][si][1]), 0)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    out_shape = eqn.outvars[0].aval.shape
    y = None
    for t, w in zip(d["taps"], kernels, strict=True):
        start, limit, st = [0] * x.ndim, list(xp.shape), [1] * x.ndim
        for si, ax in enumerate(sp_axes):
            stride = int(p["window_strides"][si])
            start[ax] = t["tap"][si]
            limit[ax] = start[ax] + (out_shape[ax] - 1) * stride + 1
            st[ax] = stride
        xs = jax.lax.slice(xp, start, limit, st)
        part = jax.lax.dot_general(xs, w, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=p.get("precision"))  # fmt: skip
        pad = [(0, 0, 0)] * (x.ndim - 1) + [(t["lo"], n_out - t["hi"], 0)]
        part = jax.lax.pad(part, jnp.zeros((), part.dtype), pad)
        y = part if y is None else y + part
    if y is None:  # no tap kept at all: the kept filters are all exactly zero
        y = jnp.zeros((*out_shape[:-1], n_out), x.dtype)
    return y



def _footprint_groups(foot: np.ndarray, min_filters: int = 1) -> list[np.ndarray]:
    """Filters grouped by their exact spatial footprint (host-only).

    Args:
      foot: bool ``[F, *spatial]``, the taps each filter keeps in any input channel (reference6:
        one of its 5 non-empty patterns; a per-kernel library: the union over input channels).
      min_filters: a group of fewer filters is merged with the other small ones into one group
        (their union's bounding box, still exact: the box only adds zero taps).
    Returns:
      index arrays into ``[0, F)``, ascending within a group, groups in the order of their first
      filter; every filter in exactly one group. For reference6 the groups are the patterns
      (right column, bottom row, right two columns, bottom two rows, full): each becomes one
      dense conv with a 3x1, 1x3, 3x2, 2x3 or 3x3 kernel.
    """
    keys = [f.tobytes() for f in foot]
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    big = [np.asarray(g) for g in groups.values() if len(g) >= min_filters]
    small = [i for g in groups.values() if len(g) < min_filters for i in g]
    if small:
        big.append(np.asarray(sorted(small)))
    return sorted(big, key=lambda g: int(g[0]))


def _runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[lo, hi)`` of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], keep.astype(np.int8), [0]]))
    return [(int(a), int(b)) for a, b in zip(np.nonzero(edges == 1)[0],
                                             np.nonzero(edges == -1)[0], strict=True)]  # fmt: skip


def _tap_order(groups: list[np.ndarray], foot: np.ndarray) -> list[int]:
    """An order of the footprint `groups` minimising the number of contiguous filter runs summed
    over kernel taps (every order of up to 7 groups is tried; more keep their order). For
    reference6 the minimum is one run per tap: right column, right two columns, full, bottom two
    rows, bottom row (or its reverse)."""
    import itertools

    gfoot = np.stack([foot[g].any(axis=0).reshape(-1) for g in groups])  # [G, taps]
    if len(groups) > 7:
        return list(range(len(groups)))

    def n_runs(order):
        m = gfoot[list(order)]
        return int(np.sum(m[0]) + np.sum(m[1:] & ~m[:-1]))

    return list(min(itertools.permutations(range(len(groups))), key=n_runs))


class _Fallback(Exception):
    pass


def _np_elementwise(eqn, vecs: list) -> np.ndarray:
    """Host evaluation of an elementwise primitive on [C] vectors (fills); numpy first."""
    name = eqn.primitive.name
    p = eqn.params
    dtype = np.dtype(eqn.outvars[0].aval.dtype)
    v = [np.asarray(x) for x in vecs]
    table = {
        "add": lambda: v[0] + v[1], "sub": lambda: v[0] - v[1], "mul": lambda: v[0] * v[1],
        "div": lambda: v[0] / v[1], "max": lambda: np.maximum(v[0], v[1]),
        "min": lambda: np.minimum(v[0], v[1]), "neg": lambda: -v[0], "exp": lambda: np.exp(v[0]),
        "log": lambda: np.log(v[0]), "log1p": lambda: np.log1p(v[0]),
        "expm1": lambda: np.expm1(v[0]), "tanh": lambda: np.tanh(v[0]),
        "logistic": lambda: 1 / (1 + np.exp(-v[0])), "rsqrt": lambda: 1 / np.sqrt(v[0]),
        "sqrt": lambda: np.sqrt(v[0]), "abs": lambda: np.abs(v[0]),
        "sign": lambda: np.sign(v[0]), "square": lambda: v[0] * v[0],
        "integer_pow": lambda: v[0] ** p["y"], "pow": lambda: v[0] ** v[1],
        "convert_element_type": lambda: v[0], "copy": lambda: v[0], "copy_p": lambda: v[0],
        "stop_gradient": lambda: v[0], "reduce_precision": lambda: v[0],
        "ge": lambda: v[0] >= v[1], "gt": lambda: v[0] > v[1], "le": lambda: v[0] <= v[1],
        "lt": lambda: v[0] < v[1], "eq": lambda: v[0] == v[1], "ne": lambda: v[0] != v[1],
        "select_n": lambda: np.choose(v[0].astype(np.int64), v[1:]),
    }  # fmt: skip
    if name in table and not (name == "div" and np.issubdtype(dtype, np.integer)):
        with np.errstate(all="ignore"):
            out = table[name]()
        return np.asarray(out).astype(dtype)
    with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*[jnp.asarray(x) for x in vecs], **p)
    return np.asarray(out).astype(dtype)


def _param_pass(closed, leaves):
    """Values of every parameter-only equation output, keyed "<pid>:<k>" where pid numbers the
    parameter-only equations in order as `_Interp.eqn` does (jit this)."""
    counter = [0]
    res: dict = {}

    def eqn_values(eqn, ins):
        name = eqn.primitive.name
        if name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]]
            n = len(sub.jaxpr.invars if hasattr(sub, "jaxpr") else sub.invars)
            sub_args = ins[len(ins) - n :] if n < len(ins) else ins
            if hasattr(sub, "consts"):
                return run(sub.jaxpr, list(sub.consts), sub_args)
            return run(sub, [], sub_args)
        if any(x is None for x in ins):
            return [None] * len(eqn.outvars)
        pid = counter[0]
        counter[0] += 1
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for k, o in enumerate(outs):
            res[f"{pid}:{k}"] = o
        return outs

    def run(jaxpr, consts, args):
        return trace.walk_jaxpr(jaxpr, consts, args, eqn_values, lambda val: val)

    run(closed.jaxpr, list(closed.consts), list(leaves) + [None])
    return res


# --------------------------------------------------------------------------------------------
# Public API.


def _flat_leaves(variables):
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    return [path_of(kp) for kp, _ in flat], [x for _, x in flat], treedef


def _jaxpr_for(apply_fn, treedef, abstract_leaves, x_struct):
    def fn(leaves_, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves_), x, train=False)

    return jax.make_jaxpr(fn)(abstract_leaves, x_struct)


def _make_compact_fn(apply_fn, treedef, abstract_leaves, plan, out_treedef):
    """The jitted ``compact_apply_fn(compact_variables, x)`` replaying `plan`."""

    def run(cvars, x):
        xs = jax.ShapeDtypeStruct(x.shape, x.dtype)
        closed = _jaxpr_for(apply_fn, treedef, abstract_leaves, xs)
        interp = _Interp(record=False, plan=plan, cvars=cvars)
        args = [_P(None) for _ in abstract_leaves] + [_A(x, None)]
        outs = interp.run_closed(closed, args)
        res = []
        for o in outs:
            if not isinstance(o, _A):
                raise CompactError("model output does not depend on the input; nothing to run.")
            res.append(_full(o))
        return jax.tree_util.tree_unflatten(out_treedef, res)

    return jax.jit(run)


def compact(
    apply_fn: Callable,
    variables: Any,
    graph: LayerGraph,
    masks: Any,
    sample_input: Any,
    *,
    crop: bool = True,
    align: int = 1,
    lowering: str = "filters",
    group_min_width: int = 0,
    group_min_filters: int = 1,
    group_coupled: bool = True,
    layer_lowerings: Mapping[str, str] | None = None,
    auto_batch: int | None = None,
    timer: Callable | None = None,
) -> tuple[Callable, dict[str, np.ndarray], dict]:
    """Builds the physically smaller model equal to the masked one (host-only; see module doc).

    Args:
      apply_fn: pure ``apply_fn(variables, x, train=False)`` (Linen: ``model.apply``).
      variables: the model's variables dict (concrete arrays).
      graph: its `LayerGraph` (`trace.trace_model`).
      masks: mask pytree mirroring ``variables["params"]`` (float 0/1), or None (dense).
      sample_input: an array ``[B, ...]`` (values unused; shape/dtype define the trace).
      crop: crop kernel rows/columns zero in every kept filter (3x3 -> 3x2 etc.).
      align: store the output filters of every conv (feature_group_count 1) and dense layer in a
        multiple of `align` (capped at the full width), materialising exact-zero filters to get
        there: thin, odd widths run slower than aligned ones on some backends (measure with
        ``benchmarks/latency.py --align``). 1 = no padding. Counted params are unchanged;
        ``stored_params`` grows. Grouped convs are not padded.
      lowering: "filters" (every kept filter of a conv in one conv, kernels cropped only where
        ALL kept filters allow) or "grouped" (a conv of at least `group_min_width` kept filters
        becomes one cropped conv per group of filters with the same spatial footprint, outputs
        concatenated, the permutation folded into the consumers) or "taps" (one matmul per
        kernel tap on the contiguous filters keeping it); see the module docstring. "auto":
        each conv on the lowering measured fastest for it on this backend (`choose_lowerings`
        at batch `auto_batch`, default the batch of `sample_input`; `timer` as there).
      group_min_width: conv layers with fewer kept filters keep the filter lowering under
        "grouped" and "taps" (0 = every conv).
      group_min_filters: footprint groups of fewer filters are merged into one bounding-box conv.
      group_coupled: also group the convs of coupled (residual-summed) groups; their permuted
        outputs are gathered into one order at each add. False = those convs keep the filter
        lowering (sorted channels, no gathers; fewer cropped convs).
      layer_lowerings: ``{layer name: lowering}`` overrides for single conv layers (they win
        over every rule above; with "auto", over the measured choice).
    Returns:
      (compact_apply_fn, compact_variables, info): ``compact_apply_fn(compact_variables, x)`` is
      jitted and equals ``apply_fn(apply_masks(variables, masks), x, train=False)`` for any batch
      size; compact_variables is a flat dict ``{"<eqn>.<operand>": np.ndarray}``; info is a
      JSON-able dict (params, masked_params, dropped_kernel_entries, dropped_affine_entries,
      stored_params, dense_stored_params, layers: per-layer widths before/after and lowering,
      plan (for export); with "auto", ``auto_lowering`` = `choose_lowerings`' record).
    """
    prep = _prepare(apply_fn, variables, graph, masks, sample_input, align=align,
                    lowering=lowering, layer_lowerings=layer_lowerings)  # fmt: skip
    opts = dict(crop=crop, align=align, group_min_width=group_min_width,
                group_min_filters=group_min_filters, group_coupled=group_coupled)  # fmt: skip
    fixed = _layer_indices(graph, layer_lowerings)
    auto = None
    if lowering == "auto":
        auto = _choose(apply_fn, variables, masks, prep, auto_batch, timer, opts, fixed)
        fixed = {**auto.pop("_by_index"), **fixed}
    low = "filters" if lowering == "auto" else lowering
    interp = _record(prep, prep.xs, low, fixed, **opts)
    # Counts describe the pruned model, not its storage: with align > 1 they come from the
    # unpadded plan (a padded channel is materialised, so its consumers would count reads of it).
    counted = interp if align == 1 else _record(prep, prep.xs, low, fixed, **{**opts, "align": 1})
    fn = _make_compact_fn(apply_fn, prep.treedef, prep.abstract, interp.plan, prep.out_treedef)
    info = _info(graph, masks, counted.layer_info, counted.cvars, prep.leaves, prep.kernel_masks,
                 prep.filter_alive)  # fmt: skip
    info["stored_params"] = int(sum(np.size(v) for v in interp.cvars.values()))
    info["align"] = align
    info["lowering"] = lowering
    kinds = {li: interp.plan[e[-1]]["kind"] for li, e in interp.sites.items()}
    for d in info["layers"]:  # kernel_after: the pruned kernel; kernel_stored: with padding
        d["kernel_stored"] = interp.layer_info.get(d["index"], d)["kernel_after"]
        if d["index"] in kinds:
            d["lowering"] = _KIND_LOWERING[kinds[d["index"]]]
    if auto is not None:
        info["auto_lowering"] = auto
    info["plan"] = interp.plan
    info["leaf_shapes"] = [[list(a.shape), str(a.dtype)] for a in prep.abstract]
    info["leaf_paths"] = [list(p) for p in prep.paths]
    return fn, interp.cvars, info


_KIND_LOWERING = {"conv": "filters", "gconv": "grouped", "taps": "taps"}


@dataclasses.dataclass
class _Prepared:
    """What every recording of one model's compaction shares (host; `_prepare`)."""

    graph: LayerGraph
    paths: list
    leaves: list
    treedef: Any
    abstract: list
    filter_alive: list
    kernel_masks: dict
    by_kernel: dict
    closed: Any
    pvals: dict
    xs: Any
    out_treedef: Any


def _prepare(apply_fn, variables, graph, masks, sample_input, *, align, lowering,
             layer_lowerings) -> _Prepared:  # fmt: skip
    if not hasattr(sample_input, "shape") or len(sample_input.shape) < 1:
        raise CompactError(
            "sample_input must be an array [B, ...], e.g. jnp.zeros((1, 32, 32, 3)); got "
            f"{type(sample_input).__name__}."
        )
    if not isinstance(align, int) or align < 1:
        raise CompactError(f"align must be an int >= 1 (1 = no padding), got {align!r}.")
    if lowering not in (*LOWERINGS, "auto"):
        raise CompactError(f"lowering must be one of {(*LOWERINGS, 'auto')}, got {lowering!r}.")
    _layer_indices(graph, layer_lowerings)  # names and values checked before any work
    if masks is None:
        masks = masking.ones_masks(variables)
    masked_vars = masking.apply_masks(variables, masks)
    paths, leaves, treedef = _flat_leaves(masked_vars)
    leaves = [np.asarray(x) for x in leaves]
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    filter_alive, _ = _alive_jit(graph, masks)
    filter_alive = [np.asarray(a) for a in filter_alive]
    mflat = flatten_with_paths(masks)
    kernel_masks = {}
    for layer in graph.layers:
        rel = tuple(layer.kernel_path[1:]) if layer.kernel_path[0] == "params" else None
        m = mflat.get(rel, mflat.get(tuple(layer.kernel_path)))
        if m is not None:
            kernel_masks[layer.kernel_path] = np.asarray(m) != 0
    by_kernel = {layer.kernel_path: layer.index for layer in graph.layers}
    xs = jax.ShapeDtypeStruct(tuple(sample_input.shape), sample_input.dtype)
    closed = _jaxpr_for(apply_fn, treedef, abstract, xs)
    pvals = jax.jit(lambda lv: _param_pass(closed, lv))(leaves)
    pvals = {k: np.asarray(v) for k, v in pvals.items()}
    out_shape = jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), masked_vars, xs)
    return _Prepared(graph, paths, leaves, treedef, abstract, filter_alive, kernel_masks,
                     by_kernel, closed, pvals, xs, jax.tree.structure(out_shape))  # fmt: skip


def _layer_indices(graph: LayerGraph, layer_lowerings: Mapping[str, str] | None) -> dict:
    """``{layer index: lowering}`` of ``{layer name: lowering}`` (CompactError naming a bad one)."""
    by_name = {la.name: la.index for la in graph.layers}
    out = {}
    for name, low in (layer_lowerings or {}).items():
        if name not in by_name:
            raise CompactError(
                f"layer_lowerings names {name!r}, not a layer of this model; its layers are "
                f"{sorted(by_name)[:8]}{' ...' if len(by_name) > 8 else ''} (`info` lists them)."
            )
        if low not in LOWERINGS:
            raise CompactError(f"layer_lowerings[{name!r}] must be one of {LOWERINGS}, got {low!r}.")
        out[by_name[name]] = low
    return out


def _record(prep: _Prepared, xs, lowering, layer_lowerings, *, crop, align, group_min_width,
            group_min_filters, group_coupled) -> _Interp:  # fmt: skip
    """One recording pass (shapes only): the interpreter with its plan, cvars and layer info."""
    graph = prep.graph
    ungrouped = frozenset() if group_coupled else frozenset(
        li for grp in graph.coupled_groups if len(grp) > 1 for li in grp)  # fmt: skip
    interp = _Interp(record=True, plan={}, cvars={}, layers_by_kernel=prep.by_kernel,
                     filter_alive=prep.filter_alive, kernel_masks=prep.kernel_masks, crop=crop,
                     align=align, lowering=lowering, group_min_width=group_min_width,
                     group_min_filters=group_min_filters, ungrouped=ungrouped,
                     layer_lowerings=layer_lowerings)  # fmt: skip
    interp.layers_by_kernel_layer = graph.layers
    interp.pvals = prep.pvals
    args = [_P(v, p) for v, p in zip(prep.leaves, prep.paths, strict=True)]

    def run(x):
        outs = interp.run_closed(prep.closed, args + [_A(x, None)])
        return [_full(o) for o in outs if isinstance(o, _A)]

    jax.eval_shape(run, xs)
    return interp


def choose_lowerings(
    apply_fn: Callable,
    variables: Any,
    graph: LayerGraph,
    masks: Any,
    sample_input: Any,
    *,
    batch: int | None = None,
    timer: Callable | None = None,
    crop: bool = True,
    align: int = 1,
    group_min_width: int = 0,
    group_min_filters: int = 1,
    group_coupled: bool = True,
    layer_lowerings: Mapping[str, str] | None = None,
) -> dict:
    """Measures, per conv layer, which lowering runs it fastest on this backend (host-only).

    Every conv that can take more than one of `LOWERINGS` (depthwise convs, dilated or
    string-padded ones and dense layers only have "filters"; "taps" needs a feature-last layout;
    `group_min_width` / `group_coupled` / `layer_lowerings` restrict the choice as in `compact`)
    is timed ALONE in each (its op on random input at its compact input width, batch `batch`,
    default that of `sample_input`), by ``timer(build, info) -> ms`` (`latency.Timer`; default
    `latency.time_fn`). The convs of one coupled (residual-summed) group take one lowering, the
    fastest for their summed time. The whole compact model with these choices is then timed
    against the filter lowering everywhere (by `timer`, default `measure_latencies`
    round-robin), and kept only if faster: the per-layer timings do not see the gathers a
    permuted residual add needs, fusion across layers, or (at small batches) the per-call
    overhead that dominates one layer alone.

    Returns a JSON-able record: ``choices`` {layer name: lowering} (pass it as `compact`'s
    ``layer_lowerings`` to rebuild the same model without measuring), ``layers`` {name: {"ms":
    {lowering: ms}, "choice": ...}}, ``model_ms`` {"per_layer": ms, "filters": ms}, ``kept``
    ("per_layer" or "filters"), ``batch``, ``backend``.
    """
    prep = _prepare(apply_fn, variables, graph, masks, sample_input, align=align,
                    lowering="auto", layer_lowerings=layer_lowerings)  # fmt: skip
    opts = dict(crop=crop, align=align, group_min_width=group_min_width,
                group_min_filters=group_min_filters, group_coupled=group_coupled)  # fmt: skip
    rec = _choose(apply_fn, variables, masks, prep, batch, timer, opts,
                  _layer_indices(graph, layer_lowerings))  # fmt: skip
    rec.pop("_by_index")
    return rec


def _choose(apply_fn, variables, masks, prep, batch, timer, opts, fixed) -> dict:
    """`choose_lowerings` on a prepared model; adds ``_by_index`` {layer index: lowering}."""
    graph, layer_timer = prep.graph, timer or latency_lib.time_fn
    batch = int(batch or prep.xs.shape[0])
    if batch != prep.xs.shape[0]:  # the jaxpr (and its parameter-only equations) at that batch
        xb = jax.ShapeDtypeStruct((batch, *prep.xs.shape[1:]), prep.xs.dtype)
        prep = _prepare(apply_fn, variables, graph, masks, xb, align=opts["align"],
                        lowering="auto", layer_lowerings=None)  # fmt: skip
    recs = {low: _record(prep, prep.xs, low, fixed, **opts) for low in LOWERINGS}
    options: dict[int, list[str]] = {}
    for low, it in recs.items():  # the lowerings each layer really takes (others fall back)
        for li, eids in it.sites.items():
            if li not in fixed and _KIND_LOWERING[it.plan[eids[0]]["kind"]] == low:
                options.setdefault(li, []).append(low)
    ms: dict[int, dict[str, float]] = {}
    for li, lows in options.items():
        if len(lows) > 1:
            name = graph.layers[li].name
            ms[li] = {low: float(sum(layer_timer(_site_op(recs[low], e),
                                           {"layer": name, "lowering": low})
                                     for e in recs[low].sites[li])) for low in lows}  # fmt: skip
    choice = {li: min(t, key=t.get) for li, t in ms.items()}
    for grp in graph.coupled_groups:  # one lowering per coupled group: the fastest summed
        members = [li for li in grp if li in ms]
        common = set.intersection(*(set(ms[li]) for li in members)) if members else set()
        if len(members) > 1 and common:
            best = min(sorted(common), key=lambda low: sum(ms[li][low] for li in members))
            choice.update({li: best for li in members})
    model_ms = _time_models(apply_fn, prep, {"per_layer": {**choice, **fixed}, "filters": fixed},
                            opts, timer)  # fmt: skip
    kept = "per_layer" if model_ms["per_layer"] < model_ms["filters"] else "filters"
    final = choice if kept == "per_layer" else {li: "filters" for li in choice}
    return {
        "choices": {graph.layers[li].name: low for li, low in sorted(final.items())},
        "layers": {graph.layers[li].name: {"ms": t, "choice": final[li]} for li, t in ms.items()},
        "model_ms": model_ms, "kept": kept, "batch": batch,
        "backend": latency_lib.backend_name(), "_by_index": final,
    }  # fmt: skip


def _time_models(apply_fn, prep, variants: dict, opts, timer) -> dict[str, float]:
    """Milliseconds of the whole compact model under each ``{name: layer_lowerings}`` variant:
    `timer` per variant, or (None) `measure_latencies` round-robin, so drift hits all alike."""
    x = jax.random.normal(jax.random.key(0), prep.xs.shape, prep.xs.dtype)
    models = {}
    for name, chosen in variants.items():
        it = _record(prep, prep.xs, "filters", chosen, **opts)
        fn = _make_compact_fn(apply_fn, prep.treedef, prep.abstract, it.plan, prep.out_treedef)
        models[name] = (fn, it.cvars)
    if timer is None:
        r = measure_latencies(models, x, repeats=max(5, min(30, 3000 // max(1, x.shape[0]))))
        return {name: r[name]["median_ms"] for name in models}
    return {name: float(timer(lambda m=m: (m[0], (jax.tree.map(jnp.asarray, m[1]), x)),
                              {"layer": None, "lowering": name}))
            for name, m in models.items()}  # fmt: skip


def _site_op(interp: _Interp, eid: str):
    """``build() -> (jitted fn, args)`` running conv equation `eid` of a recording alone as its
    plan entry lowers it, on random input of its compact input shape (the recording's batch)."""
    eqn, d = interp.site_eqns[eid], interp.plan[eid]

    def build():
        shape = list(eqn.invars[0].aval.shape)
        shape[d["in_axis"]] = len(d["in_idx"])
        x = jax.random.normal(jax.random.key(0), shape, eqn.invars[0].aval.dtype)
        ks = [jnp.asarray(k) for k in _conv_kernels(interp.cvars, eid, d)]
        return jax.jit(lambda ks_, x_: _run_conv(eqn, x_, d, ks_)), (ks, x)

    return build


def unpruned_build(apply_fn, variables, graph: LayerGraph, sample_input, *, batch: int = 1,
                   layer_lowerings: Mapping[str, str] | None = None) -> Callable:
    """``build() -> (jitted fn, args)`` running the UNPRUNED model as `compact` replays it (no
    masks, align 1, `layer_lowerings` pinned) on a random batch of `batch` (zeros for an integer
    input dtype; host): the `latency.measure_table(unpruned=...)` calibration of a latency table."""

    def build():
        x1 = jnp.zeros((1, *np.shape(sample_input)[1:]), jnp.asarray(sample_input).dtype)
        fn, cv, _ = compact(apply_fn, variables, graph, None, x1, align=1,
                            layer_lowerings=layer_lowerings)  # fmt: skip
        shape = (batch, *x1.shape[1:])
        x = (jax.random.normal(jax.random.key(0), shape, x1.dtype)
             if jnp.issubdtype(x1.dtype, jnp.floating) else jnp.zeros(shape, x1.dtype))  # fmt: skip
        return fn, (jax.tree.map(jnp.asarray, cv), x)

    return build


def _info(graph, masks, layer_info, cvars, leaves, kernel_masks, filter_alive) -> dict:
    exact = flops.count_exact(graph, masks)
    affine_owner: dict = {}
    for layer in graph.layers:
        for ap in layer.affine_paths:
            affine_owner.setdefault(ap, layer.index)
    n_kernel = sum({la.kernel_path: la.params for la in graph.layers}.values())
    n_affine = sum(graph.layers[li].out_features for li in affine_owner.values())
    other = graph.total_params - n_kernel - n_affine
    kept_k = dropped_k = kept_aff = dropped_aff = 0
    layer_info = dict(layer_info)
    for layer in graph.layers:  # prunable ops left uncompacted (full fallback): kept as they are
        if layer.index not in layer_info:
            km = kernel_masks.get(layer.kernel_path)
            n = int(np.count_nonzero(km)) if km is not None else layer.params
            a = int(np.sum(filter_alive[layer.index]))
            layer_info[layer.index] = {
                "name": layer.name, "in_before": layer.in_features,
                "in_after": layer.in_features, "out_before": layer.out_features,
                "out_after": layer.out_features, "kernel_before": list(layer.kernel_shape),
                "kernel_after": list(layer.kernel_shape), "cropped": [],
                "kept_kernel_entries": n, "masked_kernel_entries": n,
                "kept_alive_filters": a, "alive_filters": a, "uncompacted": True,
            }  # fmt: skip
    for d in layer_info.values():
        kept_k += d["kept_kernel_entries"]
        dropped_k += d["masked_kernel_entries"] - d["kept_kernel_entries"]
    for li in affine_owner.values():
        d = layer_info.get(li)
        if d is None:
            continue
        kept_aff += d["kept_alive_filters"]
        dropped_aff += d["alive_filters"] - d["kept_alive_filters"]
    return {
        "params": int(kept_k + kept_aff + other),
        "masked_params": int(exact["masked_params"]),
        "dense_params": int(exact["dense_params"]),
        "dropped_kernel_entries": int(dropped_k),
        "dropped_affine_entries": int(dropped_aff),
        "stored_params": int(sum(np.size(v) for v in cvars.values())),
        "dense_stored_params": int(sum(np.size(v) for v in leaves)),
        "masked_flops": int(exact["masked_flops"]),
        "dense_flops": int(exact["dense_flops"]),
        "flops_reduction": float(exact["flops_reduction"]),
        "layers": [dict(layer_info[i], index=i) for i in sorted(layer_info)],
    }


# --------------------------------------------------------------------------------------------
# Export.


def save_compact(path: str | os.PathLike, compact_variables: dict, info: dict) -> None:
    """Saves a compact model: ``<path>/variables`` (orbax) and ``<path>/compact.json`` (host-only).

    The JSON holds the plan (every activation's kept channels and fill, every decision), the
    original leaf shapes/dtypes and the param counts; no masks are needed to load it.
    """
    path = paths_lib.resolve(path)
    tree = {k.replace(".", "_"): np.asarray(v) for k, v in compact_variables.items()}
    checkpoint.save_pytree(os.path.join(path, "variables"), tree)
    meta = {k: v for k, v in info.items()}
    meta["keys"] = sorted(compact_variables)
    checkpoint.save_json(os.path.join(path, "compact.json"), meta)


def load_compact(
    path: str | os.PathLike, apply_fn: Callable, variables_like: Any = None
) -> tuple[Callable, dict[str, np.ndarray], dict]:
    """Loads `save_compact` output: (compact_apply_fn, compact_variables, info) (host-only).

    Args:
      path: the folder given to `save_compact`.
      apply_fn: the ORIGINAL model's ``apply_fn(variables, x, train=False)`` (its jaxpr is re-traced
        with abstract leaves of the stored shapes, so no weights or masks are needed; a sample input
        is not needed either: the jaxpr is traced for each input shape the function sees).
      variables_like: optional original variables (or ShapeDtypeStructs) to define the tree
        structure; without it the stored leaf paths rebuild a nested dict (Linen layout).
    The loaded function returns ONE array (the model output must be a single array, as in the
    zoo); use `compact` directly for models with pytree outputs.
    """
    path = paths_lib.resolve(path)
    meta_path = os.path.join(path, "compact.json")
    if not paths_lib.isfile(meta_path):
        raise FileNotFoundError(f"no compact model at {path!r} (missing compact.json); run "
                                "save_compact first.")  # fmt: skip
    info = checkpoint.load_json(meta_path)
    raw = checkpoint.load_pytree(os.path.join(path, "variables"))
    cvars = {k: np.asarray(raw[k.replace(".", "_")]) for k in info["keys"]}
    shapes = [jax.ShapeDtypeStruct(tuple(s), np.dtype(t)) for s, t in info["leaf_shapes"]]
    if variables_like is None:
        tree: dict = {}
        for p, s in zip(info["leaf_paths"], shapes, strict=True):
            node = tree
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = s
        variables_like = tree
    paths, _, treedef = _flat_leaves(variables_like)
    if [list(p) for p in paths] != info["leaf_paths"]:
        raise CompactError(f"{path!r}: variables_like does not match the stored leaf paths; pass "
                           "the original model's variables (or omit variables_like).")  # fmt: skip
    out_shape = None
    plan = info["plan"]
    # output structure: a single array for the zoo; traced lazily otherwise
    out_treedef = jax.tree.structure(out_shape if out_shape is not None else 0)
    fn = _make_compact_fn(apply_fn, treedef, shapes, plan, out_treedef)
    return fn, cvars, info


# --------------------------------------------------------------------------------------------
# Latency.


def measure_latency(
    apply_fn: Callable, variables: Any, x: Any, *, repeats: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of a jitted forward ``apply_fn(variables, x)`` (host-only).

    The function is jitted (with ``variables`` as an argument), compiled and warmed `warmup` times;
    every timed run blocks until the result is ready.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}; pass repeats=50 or so.")
    f = jax.jit(apply_fn)
    variables = jax.tree.map(jnp.asarray, variables)
    x = jnp.asarray(x)
    jax.block_until_ready(f(variables, x))
    for _ in range(warmup):
        jax.block_until_ready(f(variables, x))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(variables, x))
        ts.append((time.perf_counter() - t) * 1e3)
    return _stats(ts)


def auto_align(platform: str | None = None) -> int:
    """The `compact` ``align`` used when none is given for `platform` (default: JAX's backend).

    CPU: 16, one AVX-512 vector of float32. Measured with ``benchmarks/latency.py`` on a 2-core
    Xeon (XLA:CPU): a pattern-pruned ResNet-20 from the CIFAR-10 run went from 0.58x to 0.94x the
    dense speed at batch 256, ResNet-56 at 50% filter removal from 0.77x to 0.96x, MobileNet-V2
    unchanged (2.06x vs 2.05x; experiments/RESULTS.md). Other backends: 1 (no padding) until
    measured there.
    """
    platform = platform or jax.default_backend()
    return 16 if platform == "cpu" else 1


def _stats(ts: list[float]) -> dict[str, float]:
    q = np.percentile(ts, [10, 90])
    return {"median_ms": float(statistics.median(ts)), "p10": float(q[0]), "p90": float(q[1]),
            "min_ms": float(min(ts)), "repeats": len(ts)}  # fmt: skip


def measure_latencies(
    named: dict[str, tuple[Callable, Any]], x: Any, *, repeats: int = 50, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """`measure_latency` of several ``name: (apply_fn, variables)`` on the same `x`, timed
    round-robin (one run of each per round) so that a slow drift of the machine (other jobs,
    clock changes) affects all of them alike; host-only."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}; pass repeats=50 or so.")
    x = jnp.asarray(x)
    runs = {k: (jax.jit(f), jax.tree.map(jnp.asarray, v)) for k, (f, v) in named.items()}
    for f, v in runs.values():
        for _ in range(warmup + 1):
            jax.block_until_ready(f(v, x))
    ts: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (f, v) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(v, x))
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: _stats(t) for k, t in ts.items()}


def latency_report(
    apply_fn: Callable,
    variables: Any,
    graph: LayerGraph,
    masks: Any,
    sample_input: Any,
    *,
    batches: tuple[int, ...] = (1, 256),
    repeats: int = 20,
    warmup: int = 3,
    compacted: tuple | None = None,
) -> dict:
    """Latency of the dense, masked and compacted model at each batch size (JSON-able dict).

    ``apply_fn(variables, x, train=False)``; `sample_input` ``[B, ...]`` gives the example shape.
    Returns {"flops": {...}, "params": {...}, "batches": {str(b): {"dense", "masked",
    "compact": measure_latency dicts, "speedup_compact", "speedup_masked"}}}.
    """
    fn, cv, info = compacted or compact(apply_fn, variables, graph, masks, sample_input)
    masked_vars = masking.apply_masks(variables, masks)

    def dense_apply(v, x):
        return apply_fn(v, x, train=False)

    out = {
        "flops": {"dense": info["dense_flops"], "masked": info["masked_flops"],
                  "ratio": info["masked_flops"] / info["dense_flops"]},
        "params": {k: info[k] for k in ("dense_params", "masked_params", "params",
                                        "stored_params")},
        "batches": {},
    }  # fmt: skip
    shape = tuple(sample_input.shape[1:])
    for b in batches:
        x = jax.random.normal(jax.random.key(b), (b, *shape), jnp.float32)
        n = repeats if b <= 8 else max(3, repeats // 4)
        r = measure_latencies({"dense": (dense_apply, variables), "masked": (dense_apply,
                               masked_vars), "compact": (fn, cv)}, x, repeats=n, warmup=warmup)
        d, m, c = r["dense"], r["masked"], r["compact"]
        out["batches"][str(b)] = {
            "dense": d, "masked": m, "compact": c,
            "speedup_compact": d["median_ms"] / c["median_ms"],
            "speedup_masked": d["median_ms"] / m["median_ms"],
        }  # fmt: skip
    return json.loads(json.dumps(out))
