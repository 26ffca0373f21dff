"""Model tracer: a pure apply function -> static `LayerGraph` (layer 1, host-only, once per model).

`trace_model` builds the jaxpr of ``apply_fn(variables, x[:1], train=train)`` with abstract
(ShapeDtypeStruct) leaves and interprets it on the host, one equation at a time, descending into
nested jaxprs (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``remat``, ``scan`` (unrolled), ``cond`` (union of the branches)). Every jaxpr value is one of:

* a *parameter-derived* value (`_Derived`): computed only from variables leaves and constants. It
  remembers the leaf paths it depends on; when it is a pure structural transform of exactly one leaf
  (convert, reshape, transpose, broadcast of size-1 axes, squeeze, pass-through calls) it also
  remembers which leaf axes each of its axes maps to (its *origin*), and for small leaves the leaf
  element each entry comes from (used to recognise per-channel affine parameters);
* an *activation* (`_Act`): depends on the model input. Its *provenance* is a dict ``{producer:
  int32 array of the value's shape}``; entry = the producer layer's output channel carried by that
  element, -1 where that producer does not contribute. Producer -1 ("always alive": the model input
  or anything that mixes channels) uses 0 for "contributes" and -1 for "does not".

A *prunable layer* is a ``conv_general_dilated`` or ``dot_general`` between an activation and a
value whose origin is a "params" leaf with ndim >= 2. Its output gets provenance
``{layer: output channel}``. Elementwise ops take the union of their operands' provenances
(parameter-derived operands contribute nothing); structural ops apply the same numpy operation to
the index arrays (``pad`` fills -1, so zero-padded channels of an option-A shortcut get -1);
reductions keep a producer's channel where every contributing entry along the reduced axes carries
the same channel and otherwise mark the output as mixed (always alive, producer -1). This is how
LayerNorm statistics, softmax over keys and activation-activation matmuls over features become
"always alive".

Conventions beyond `sculpt_jax.types`:
* Producers that meet at the same element of an n-ary elementwise op (residual add, gating mul, ...)
  are *coupled*; `LayerGraph.coupled_groups` is the union-find closure of that relation, of the
  "residual" sources of every layer and of the model output.
* An activation-activation ``dot_general`` (attention) keeps a producer's channel along the free
  axes when it is constant along the contracting axes: ``q.k^T`` is ``{-1}``, ``p.v`` is
  ``{-1, v_proj}`` (v's channels survive the contraction over keys).
* Kernel leaf axes of size 1 that the op never sees (squeezed away) are listed in
  ``kernel_spatial_axes``.
* ``other_flops`` counts, per example, 1 FLOP per output element of every elementwise op on
  activations (transcendentals included; ops XLA:CPU expands cost what XLA counts: erfc 61 (exact
  GELU), erf_inv 39, lgamma 56, digamma 76, logistic 4, integer_pow |y|-1; copies and data movement
  are free), the input size of a reduction, output size x window of a ``reduce_window`` and
  ``2*M*N*K`` of an activation-activation ``dot_general``; ops on parameters only are not counted.
  Then ``2 * sum(valid_macs) + other_flops`` matches XLA's ``cost_analysis()`` flops +
  transcendentals within 2% on the zoo. `Layer.macs` counts the same in-bounds taps; the
  literature's convention, every tap including those on zero padding
  (`flops.conventional_macs`), is larger (ResNet-20: +10%, CIFAR VGG-16: +27%).
* Constants (literals, closed-over arrays, iota) are folded on the host, so ``gather`` /
  ``dynamic_slice`` at constant indices move channels exactly; ``dynamic_slice`` at data-dependent
  offsets is treated as a reduction over the sliced axes; ``gather`` from an activation at
  data-dependent indices raises `TraceError`.
* ``scan`` bodies are unrolled; a prunable op inside a ``scan`` or ``cond`` body raises
  `TraceNotImplementedError`; ``while`` over activations raises `TraceError`. ``remat`` is
  transparent (its layers are traced as usual).
* A conv / dot_general of an activation with a kernel COMPUTED from parameters (a slice ``w[i]`` of
  a stacked leaf, ``nn.scan`` layers, weight standardisation, weight norm) raises `TraceError`
  naming the op and the user's line: such a layer cannot be pruned, and is never dropped silently.
* `LayerGraph.output_sources` describes the last axis of every activation leaf of the output.

NNX: `nnx_split` turns an ``nnx.Module`` into ``(graphdef, state)`` where ``state`` is a pure nested
dict ``{"params": ..., "batch_stats": ..., "other": ...}`` (``nnx.Param``, ``nnx.BatchStat``,
everything else; keys are strings, list indices included, e.g. ``("params", "layers", "0",
"kernel")``) and `nnx_apply_fn` gives the matching pure ``apply_fn(state, x, train=False)``;
`trace_nnx` traces it.

Sections implemented: the "model to graph" step of AutoSculpt (arXiv 2412.18091, Sec. 3.1), with the
real dataflow (residuals and concats) that the reference omits (REFERENCE.md Sec. 6.4).
"""

from __future__ import annotations

import dataclasses
import math
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from sculpt_jax.tree_util import path_of
from sculpt_jax.types import ALWAYS_ALIVE, InputSource, Layer, LayerGraph, Path

__all__ = [
    "TraceError",
    "TraceNotImplementedError",
    "nnx_apply_fn",
    "nnx_split",
    "trace_model",
    "trace_nnx",
    "valid_macs",
]


class TraceError(ValueError):
    """The tracer met an op it cannot analyse on an activation (message names op and line)."""


class TraceNotImplementedError(TraceError, NotImplementedError):
    """A supported primitive used in an unsupported way (a prunable op inside a scan body, ...)."""


# --------------------------------------------------------------------------------------------
# Abstract values
# --------------------------------------------------------------------------------------------

_WILD = "wild"  # elem marker: constant or scalar-only value, matches any element
_ELEM_MAX_SIZE = 1 << 16  # leaves up to this size carry per-element indices
_CONST_MAX_SIZE = 1 << 16  # constants up to this size are folded on the host
_BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class _Origin:
    """A pure structural view of one leaf: value axis i <-> leaf axes ``groups[i]`` (row-major)."""

    path: Path
    leaf_shape: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...] = ()  # size-1 leaf axes squeezed away


@dataclasses.dataclass(frozen=True)
class _Derived:
    """A value computed from variables leaves and constants only (no activation)."""

    deps: frozenset
    elem: Any = None  # np.ndarray (flat leaf element per entry), _WILD, or None (unknown)
    origin: _Origin | None = None
    value: np.ndarray | None = None  # known constant value (constants only)
    # True when zeroing the "params" leaves it depends on makes it exactly zero (a leaf, a
    # product with one, a sum of such); False e.g. for exp(p) or p + 1, whose leaves a mask must
    # not zero as if they were a bias (see `_zero_ok`).
    zero_ok: bool = False


@dataclasses.dataclass(frozen=True)
class _Act:
    """An activation with its channel provenance (see module docstring)."""

    prov: dict
    # producers whose removed filters' channels may be NONZERO in this value (an op with
    # f(0) != 0 on the way: sigmoid, relu(x) + 1, a bias no mask zeroes); `elementwise_nz`
    nz: frozenset = frozenset()


def _const(val: Any) -> _Derived:
    arr = np.asarray(val) if np.size(val) <= _CONST_MAX_SIZE else None
    return _Derived(frozenset(), _WILD, None, arr)


def _is_act(v: Any) -> bool:
    return isinstance(v, _Act)


# --------------------------------------------------------------------------------------------
# Provenance helpers (numpy on int32 index arrays)
# --------------------------------------------------------------------------------------------


def _bcast(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return a if a.shape == tuple(shape) else np.broadcast_to(a, shape)


def _set_alive(prov: dict, mask: np.ndarray) -> None:
    """Marks elements under `mask` as fed by the always-alive producer (in place on the dict)."""
    if not mask.any():
        return
    cur = prov.get(ALWAYS_ALIVE)
    base = np.full(mask.shape, -1, np.int32) if cur is None else cur
    prov[ALWAYS_ALIVE] = np.where(mask, np.int32(0), base).astype(np.int32)


def _reduce_index(a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reduces an index array over `axes`: (channel or -1, mixed mask)."""
    if not axes:
        return a, np.zeros(a.shape, bool)
    mx = a.max(axis=axes)
    mn = np.where(a >= 0, a, _BIG).min(axis=axes)
    mixed = (mx >= 0) & (mn != mx)
    return np.where(mixed, -1, mx).astype(np.int32), mixed


def _reduce_prov(prov: dict, axes: tuple[int, ...], out_shape: tuple[int, ...]) -> dict:
    out: dict = {}
    alive = np.zeros(out_shape, bool)
    for p, a in prov.items():
        if p == ALWAYS_ALIVE:
            alive |= (a.max(axis=axes) if axes else a) >= 0
            continue
        r, mixed = _reduce_index(a, axes)
        alive |= mixed
        if (r >= 0).any():
            out[p] = r.reshape(out_shape)
    _set_alive(out, alive)
    return out


def _map_prov(prov: dict, fn: Callable, drop_empty: bool = False) -> dict:
    out = {}
    for p, a in prov.items():
        r = fn(a)
        if drop_empty and not (r >= 0).any():
            continue
        out[p] = r
    return out


def _np_pad(a: np.ndarray, config: Sequence, fill: int = -1) -> np.ndarray:
    """numpy version of lax.pad (lo, hi, interior; negative lo/hi crop)."""
    shape = [n + max(n - 1, 0) * it for n, (_, _, it) in zip(a.shape, config, strict=True)]
    out = np.full(shape, fill, a.dtype)
    out[tuple(slice(None, None, it + 1) for _, _, it in config)] = a
    pads = [(max(lo, 0), max(hi, 0)) for lo, hi, _ in config]
    out = np.pad(out, pads, constant_values=fill)
    crop = tuple(
        slice(-min(lo, 0), out.shape[i] + min(hi, 0)) for i, (lo, hi, _) in enumerate(config)
    )
    return out[crop]


def _window_reduce(a: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """reduce_window on an index array: (channel or -1, mixed) per output element."""
    wd, ws = params["window_dimensions"], params["window_strides"]
    base, wdil = params["base_dilation"], params["window_dilation"]
    cfg = [(lo, hi, b - 1) for (lo, hi), b in zip(params["padding"], base, strict=True)]
    ap = _np_pad(a, cfg, -1)
    eff = [(w - 1) * d + 1 for w, d in zip(wd, wdil, strict=True)]
    v = np.lib.stride_tricks.sliding_window_view(ap, eff)
    nd = a.ndim
    v = v[tuple(slice(None, None, s) for s in ws) + tuple(slice(None, None, d) for d in wdil)]
    return _reduce_index(v, tuple(range(nd, 2 * nd)))


# --------------------------------------------------------------------------------------------
# Origins (kernel axis bookkeeping)
# --------------------------------------------------------------------------------------------


def _origin_reshape(o: _Origin, old: tuple, new: tuple) -> _Origin | None:
    groups, dropped = [], list(o.dropped)
    i = 0
    for t in new:
        if t == 1:
            groups.append(())
            continue
        while i < len(old) and old[i] == 1:
            dropped.extend(o.groups[i])
            i += 1
        acc, g = 1, []
        while i < len(old) and acc < t:
            acc *= old[i]
            g.extend(o.groups[i])
            i += 1
        if acc != t:
            return None
        groups.append(tuple(g))
    while i < len(old):
        if old[i] != 1:
            return None
        dropped.extend(o.groups[i])
        i += 1
    return dataclasses.replace(o, groups=tuple(groups), dropped=tuple(dropped))


def _origin_struct(o: _Origin, name: str, params: dict, in_shape, out_shape) -> _Origin | None:
    if name in _IDENTITY:
        return o
    if name == "transpose":
        return dataclasses.replace(o, groups=tuple(o.groups[p] for p in params["permutation"]))
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        return _origin_reshape(o, tuple(in_shape), tuple(out_shape))
    if name == "squeeze":
        dims = set(d % len(in_shape) for d in params["dimensions"])
        dropped = list(o.dropped)
        for d in sorted(dims):
            dropped.extend(o.groups[d])
        groups = tuple(g for i, g in enumerate(o.groups) if i not in dims)
        return dataclasses.replace(o, groups=groups, dropped=tuple(dropped))
    if name == "expand_dims":
        groups = list(o.groups)
        for d in sorted(params["dimensions"]):
            groups.insert(d, ())
        return dataclasses.replace(o, groups=tuple(groups))
    if name == "broadcast_in_dim":
        bd = params["broadcast_dimensions"]
        groups = []
        for j, n in enumerate(out_shape):
            if j in bd:
                i = bd.index(j)
                if in_shape[i] != n:
                    return None
                groups.append(o.groups[i])
            elif n == 1:
                groups.append(())
            else:
                return None
        return dataclasses.replace(o, groups=tuple(groups))
    return None


def _feature_index(o: _Origin, value_axes: Sequence[int], value_shape) -> np.ndarray:
    """Row-major feature id (over the sorted leaf axes of the groups) per position of value_axes."""
    leaf_axes = [a for ax in value_axes for a in o.groups[ax]]
    srt = sorted(leaf_axes)
    n = math.prod(o.leaf_shape[a] for a in srt)
    base = np.arange(n, dtype=np.int32).reshape([o.leaf_shape[a] for a in srt])
    perm = [srt.index(a) for a in leaf_axes]
    return base.transpose(perm).reshape([value_shape[ax] for ax in value_axes])


# --------------------------------------------------------------------------------------------
# Primitive tables
# --------------------------------------------------------------------------------------------

_IDENTITY = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "mesh_cast",
    "reshard",
    "pvary",
    "device_put",
    "optimization_barrier",
    "stop_gradient",
}
_FREE_ELEMENTWISE = {"copy", "copy_p", "bitcast_convert_type"}
# FLOPs per output element where XLA:CPU expands the op (flops + transcendentals of its
# cost_analysis); every other elementwise op costs 1.
_ELEM_COST = {"erfc": 61, "erf_inv": 39, "lgamma": 56, "digamma": 76, "logistic": 4, "exp2": 2}
_ELEMENTWISE = {
    # n-ary arithmetic / logic / comparison
    *"add sub mul div rem max min pow atan2 nextafter and or xor eq ne lt le gt ge".split(),
    *"add_any select_n clamp complex shift_left shift_right_logical shift_right_arithmetic".split(),
    # unary
    *"neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh".split(),
    *"cosh asinh acosh atanh abs sign floor ceil round is_finite sqrt rsqrt cbrt".split(),
    *"integer_pow square erf erfc erf_inv lgamma digamma not real imag conj".split(),
    *"population_count clz convert_element_type reduce_precision".split(),
    *_FREE_ELEMENTWISE,
}
_AFFINE_OPS = {"add", "sub", "mul", "div", "add_any"}
_STRUCTURAL = {
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "rev",
}
_REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
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


def _np_struct(name: str, params: dict, a: np.ndarray, out_shape: tuple) -> np.ndarray:
    """Applies a structural primitive to an index array with numpy."""
    if name == "reshape":
        if params.get("dimensions") is not None:
            a = a.transpose(params["dimensions"])
        return a.reshape(out_shape)
    if name == "transpose":
        return a.transpose(params["permutation"])
    if name == "broadcast_in_dim":
        tmp = [1] * len(out_shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            tmp[d] = a.shape[i]
        return np.broadcast_to(a.reshape(tmp), out_shape)
    if name == "squeeze":
        return a.reshape(out_shape)
    if name == "expand_dims":
        return a.reshape(out_shape)
    if name == "slice":
        st = params["strides"] or (1,) * a.ndim
        idx = tuple(
            slice(s, e, k)
            for s, e, k in zip(params["start_indices"], params["limit_indices"], st, strict=True)
        )
        return a[idx]
    if name == "rev":
        return np.flip(a, axis=tuple(params["dimensions"]))
    raise AssertionError(name)


_LIB_DIRS = tuple(
    p for p in {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib")} if p
)


def _user_frame(eqn: Any) -> str | None:
    """'file:line' of the innermost frame outside site-packages / the stdlib / this module."""
    tb = getattr(eqn.source_info, "traceback", None)
    if tb is None:
        return None
    for fr in tb.frames:
        fn = fr.file_name
        if fn == __file__ or fn.startswith(_LIB_DIRS) or "site-packages" in fn or fn[:1] == "<":
            continue
        return f"{fn}:{fr.line_num}"
    return None


# --------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, i: int) -> int:
        self.parent.setdefault(i, i)
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)



def walk_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
               eval_eqn: Callable[[Any, list[Any]], Sequence[Any]],
               literal: Callable[[Any], Any]) -> list[Any]:  # fmt: skip
    """The package's one jaxpr interpreter loop (host-only), shared by the tracer's abstract
    evaluation here and `compaction`'s record / replay: binds ``jaxpr``'s constvars to
    ``consts`` and invars to ``args``, runs ``eval_eqn(eqn, input values) -> output values`` on
    every equation in order (dropped outputs are not stored) and returns the outvars' values. A
    literal operand reads as ``literal(its value)``."""
    env: dict = {}

    def read(v: Any) -> Any:
        return literal(v.val) if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        outs = eval_eqn(eqn, [read(v) for v in eqn.invars])
        for v, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]

class _Tracer:
    """Host interpreter of a jaxpr over `_Derived` / `_Act` values (see module docstring)."""

    def __init__(self, leaf_shapes: dict[Path, tuple[int, ...]]) -> None:
        self.leaf_shapes = leaf_shapes
        self.layers: list[dict] = []
        self.kernel_users: dict[Path, int] = {}
        self.flops = 0
        self.uf = _UnionFind()
        self.ctx: list[tuple[str, str]] = []  # enclosing control flow (primitive, source line)
        self.calls: list[Any] = []  # enclosing call equations (for source lines)

    # ---- generic evaluation -------------------------------------------------------------

    def eval_jaxpr(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        return walk_jaxpr(jaxpr, consts, args, self.eval_eqn, _const)

    def eval_closed(self, closed: Any, args: Sequence[Any]) -> list[Any]:
        if hasattr(closed, "consts"):
            return self.eval_jaxpr(closed.jaxpr, [_const(c) for c in closed.consts], args)
        return self.eval_jaxpr(closed, [], args)

    def eval_eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        """Abstract values of `eqn`'s outputs; an output activation carries `_Act.nz` for the
        producers it carries: the inputs' (`elementwise_nz` for elementwise ops)."""
        outs = self._eval_eqn(eqn, ins)
        acts = [v for v in ins if _is_act(v)]
        if eqn.primitive.name in _CALLS or not acts:
            return outs
        if eqn.primitive.name in _ELEMENTWISE:
            nz = self.elementwise_nz(eqn, ins)
        else:
            nz = frozenset().union(*(v.nz for v in acts))
        return [_Act(o.prov, nz & set(o.prov)) if _is_act(o) and nz else o for o in outs]

    def elementwise_nz(self, eqn: Any, ins: list) -> frozenset:
        """`_Act.nz` of an elementwise op's output: producer p is in it when p's removed channels
        may be nonzero there. A product with a term the mask zeroes with p (BN's scale) makes
        them zero again; an op with f(0) != 0 (sigmoid, + 1, - a running mean) makes them
        nonzero; ops with f(0) == 0 (relu, tanh, * w, / t) keep what the inputs had."""
        name, acts = eqn.primitive.name, [v for v in ins if _is_act(v)]
        others = [v for v in ins if not _is_act(v)]
        known = [v.value for v in others if v.value is not None and not v.deps]
        nz_in = frozenset().union(*(v.nz for v in acts))
        out = set()
        for p in {p for v in acts for p in v.prov if p >= 0}:
            zeroed = {a for a in self.layers[p]["affine"] if a not in self.layers[p]["divisors"]}

            def zero(v, zeroed=zeroed) -> bool:  # zero wherever p's channel is removed
                if not v.deps:
                    return v.value is not None and not np.any(v.value)
                return v.zero_ok and all(d in zeroed for d in v.deps if d[0] == "params")

            if name in ("mul", "and"):  # zero when any factor is: a zero term, or a clean act
                keeps = True
                clears = any(zero(v) for v in others) or any(
                    p in v.prov and p not in v.nz for v in acts
                )
            elif name in _ZERO_AT_ZERO:
                keeps, clears = True, False
            elif name == "integer_pow":
                keeps, clears = int(eqn.params["y"]) > 0, False
            elif name == "div":
                keeps, clears = _is_act(ins[0]), False
            elif name in ("add", "sub", "add_any"):
                keeps, clears = all(zero(v) for v in others), False
            elif name in ("max", "min") and len(known) == len(others):
                keeps = all(np.all(c <= 0) if name == "max" else np.all(c >= 0) for c in known)
                clears = False
            elif name in ("max", "min"):
                keeps, clears = all(zero(v) for v in others), False
            elif name == "clamp" and _is_act(ins[1]) and len(known) == 2 == len(others):
                keeps, clears = bool(np.all(known[0] <= 0) and np.all(known[1] >= 0)), False
            else:
                keeps, clears = False, False
            if not clears and (not keeps or p in nz_in):
                out.add(p)
        return frozenset(out)

    def _eval_eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]
        if name in _CALLS:
            sub = eqn.params[_CALLS[name]]
            n_in = len(sub.jaxpr.invars if hasattr(sub, "jaxpr") else sub.invars)
            self.calls.append(eqn)
            try:
                return self.eval_closed(sub, ins[len(ins) - n_in :])
            finally:
                self.calls.pop()
        if name in _IDENTITY and name != "convert_element_type":
            return list(ins)
        if not any(_is_act(v) for v in ins):
            return self.eval_derived(eqn, name, ins, shapes)
        if name == "scan":
            return self.eval_scan(eqn, ins)
        if name == "cond":
            return self.eval_cond(eqn, ins, shapes)
        if name in ("while",):
            raise self.error(eqn, "a while_loop over activations cannot be analysed statically")
        out_shape = shapes[0] if shapes else ()
        size = math.prod(out_shape)
        if name in _ELEMENTWISE:
            if name == "integer_pow":
                self.flops += size * max(1, abs(int(eqn.params["y"])) - 1)
            elif name not in _FREE_ELEMENTWISE:
                self.flops += size * _ELEM_COST.get(name, 1)
            if name == "bitcast_convert_type" and tuple(eqn.invars[0].aval.shape) != out_shape:
                raise self.error(eqn, "bitcast_convert_type changing the shape of an activation")
            return [self.elementwise(name, ins, out_shape)]
        if name in _STRUCTURAL:
            return [
                _Act(
                    _map_prov(
                        ins[0].prov,
                        lambda a: _np_struct(name, eqn.params, a, out_shape),
                        drop_empty=name == "slice",
                    )
                )
            ]
        if name in _REDUCTIONS:
            self.flops += math.prod(eqn.invars[0].aval.shape)
            return [_Act(_reduce_prov(ins[0].prov, tuple(eqn.params["axes"]), out_shape))]
        if name in _WINDOW:
            wsize = math.prod(eqn.params["window_dimensions"])
            self.flops += size * wsize * len(eqn.outvars)
            outs = []
            for v in ins[: len(eqn.outvars)]:
                if not _is_act(v):
                    outs.append(_Derived(v.deps))
                    continue
                out: dict = {}
                alive = np.zeros(out_shape, bool)
                for p, a in v.prov.items():
                    r, mixed = _window_reduce(a, eqn.params)
                    if p == ALWAYS_ALIVE:
                        alive |= r >= 0
                        continue
                    alive |= mixed
                    if (r >= 0).any():
                        out[p] = r
                _set_alive(out, alive)
                outs.append(_Act(out))
            return outs
        if name == "pad":
            return [self.pad(ins, eqn.params)]
        if name == "concatenate":
            return [self.concatenate(ins, eqn.params["dimension"], eqn)]
        if name == "split":
            return self.split(ins[0], eqn.params, shapes)
        if name == "dynamic_slice":
            return [self.dynamic_slice(eqn, ins, out_shape)]
        if name == "dynamic_update_slice":
            return [self.dynamic_update_slice(eqn, ins, out_shape)]
        if name == "gather":
            return [self.gather(eqn, ins, out_shape)]
        if name == "dot_general":
            return [self.dot_general(eqn, ins, out_shape)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins, out_shape)]
        raise self.error(
            eqn,
            f"unsupported primitive '{name}' applied to an activation; the tracer cannot tell "
            "which channels flow through it",
            fix="express it with supported ops (elementwise, reshape/slice/concat, reductions, "
            "conv, dot_general) or keep it out of the traced apply function",
        )

    def where(self, eqn: Any) -> str:
        """Source line of `eqn`, else of the innermost enclosing call with a user frame."""
        for e in [eqn, *reversed(self.calls)]:
            line = _user_frame(e)
            if line:
                return line
        try:
            from jax._src import source_info_util

            return source_info_util.summarize(eqn.source_info) or "<unknown>"
        except Exception:  # pragma: no cover - best effort only
            return "<unknown>"

    def error(self, eqn: Any, msg: str, fix: str = "", cls: type = TraceError) -> TraceError:
        text = f"{msg} (primitive '{eqn.primitive.name}' at {self.where(eqn)})"
        if fix:
            text += f". Fix: {fix}"
        return cls(text)

    # ---- values without activations -----------------------------------------------------

    def eval_derived(self, eqn: Any, name: str, ins: list, shapes: list) -> list[_Derived]:
        deps = frozenset().union(*(v.deps for v in ins)) if ins else frozenset()
        if (
            not deps
            and all(v.value is not None for v in ins)
            and name not in ("scan", "cond", "while")
        ):
            if all(math.prod(s) <= _CONST_MAX_SIZE for s in shapes):
                try:
                    out = eqn.primitive.bind(*[v.value for v in ins], **eqn.params)
                    outs = out if eqn.primitive.multiple_results else [out]
                    return [_const(np.asarray(o)) for o in outs]
                except Exception:
                    pass
        if len(shapes) == 1 and ins:
            v0 = ins[0]
            if name in _STRUCTURAL or name in (
                "convert_element_type",
                "copy",
                "copy_p",
                "reduce_precision",
            ):
                in_shape = tuple(eqn.invars[0].aval.shape)
                origin = (
                    _origin_struct(v0.origin, name, eqn.params, in_shape, shapes[0])
                    if v0.origin is not None
                    else None
                )
                elem = v0.elem
                if isinstance(elem, np.ndarray):
                    elem = (
                        elem
                        if name not in _STRUCTURAL
                        else _np_struct(name, eqn.params, elem, shapes[0])
                    )
                return [_Derived(v0.deps, elem, origin, zero_ok=v0.zero_ok)]
            if name in _ELEMENTWISE:
                return [_Derived(deps, _merge_elem(ins, shapes[0]), zero_ok=_zero_ok(name, ins))]
        return [_Derived(deps) for _ in shapes]

    # ---- elementwise --------------------------------------------------------------------

    def elementwise(self, name: str, ins: list, out_shape: tuple) -> _Act:
        acts = [v for v in ins if _is_act(v)]
        if name in _AFFINE_OPS and len(acts) == 1 and (name != "div" or _is_act(ins[0])):
            others = [v for v in ins if not _is_act(v)]
            self.detect_affine(acts[0], others, out_shape, divisor=name == "div")
        if len(acts) == 1:
            return _Act({p: _bcast(a, out_shape) for p, a in acts[0].prov.items()})
        # coupling: distinct real producers meeting at the same element
        for i, vi in enumerate(acts):
            for vj in acts[i + 1 :]:
                for p, a in vi.prov.items():
                    for q, b in vj.prov.items():
                        if p < 0 or q < 0 or p == q or self.uf.find(p) == self.uf.find(q):
                            continue
                        if ((_bcast(a, out_shape) >= 0) & (_bcast(b, out_shape) >= 0)).any():
                            self.uf.union(p, q)
        out: dict = {}
        alive = np.zeros(out_shape, bool)
        for v in acts:
            for p, a in v.prov.items():
                a = _bcast(a, out_shape)
                if p not in out:
                    out[p] = a
                    continue
                b = out[p]
                if a is b or np.array_equal(a, b):
                    continue
                if p == ALWAYS_ALIVE:
                    out[p] = np.maximum(a, b)
                    continue
                conflict = (a >= 0) & (b >= 0) & (a != b)
                merged = np.where(b >= 0, b, a)
                if conflict.any():
                    merged = np.where(conflict, -1, merged)
                    alive |= conflict
                out[p] = merged.astype(np.int32)
        _set_alive(out, alive)
        return _Act(out)

    def detect_affine(self, act: _Act, others: list, out_shape: tuple, divisor: bool) -> None:
        """Record per-filter "params" leaves applied elementwise to layer output `act`: as
        affine (counted, removed with their filter) when zeroing them zeroes the term
        (`_Derived.zero_ok`), as affine and divisor (removed with the filter, never zeroed: 0 / 0
        is NaN) when they divide the activation."""
        if len(act.prov) != 1:
            return
        ((p, idx),) = act.prov.items()
        if p < 0:
            return
        layer = self.layers[p]
        idx = _bcast(idx, out_shape)
        if not (idx >= 0).all():
            return
        for v in others:
            if not v.deps or not isinstance(v.elem, np.ndarray) or not (divisor or v.zero_ok):
                continue
            if not np.array_equal(_bcast(v.elem, out_shape), idx):
                continue
            for path in sorted(v.deps):
                shape = self.leaf_shapes[path]
                if path[0] != "params" or math.prod(shape) != layer["out_features"]:
                    continue
                if len(shape) != 1 and shape != layer["out_shape_leaf"]:
                    continue
                if path not in layer["affine"]:
                    layer["affine"].append(path)
                if divisor and path not in layer["divisors"]:
                    layer["divisors"].append(path)

    # ---- data movement ------------------------------------------------------------------

    def pad(self, ins: list, params: dict) -> _Act:
        if _is_act(ins[1]):
            raise TraceError("pad with an activation as padding value is not supported")
        cfg = params["padding_config"]
        return _Act(_map_prov(ins[0].prov, lambda a: _np_pad(a, cfg, -1), drop_empty=True))

    def concatenate(self, ins: list, dim: int, eqn: Any) -> _Act:
        producers = sorted({p for v in ins if _is_act(v) for p in v.prov})
        shapes = [tuple(v.aval.shape) for v in eqn.invars]
        out = {}
        for p in producers:
            parts = []
            for v, s in zip(ins, shapes, strict=True):
                if _is_act(v) and p in v.prov:
                    parts.append(_bcast(v.prov[p], s))
                else:
                    parts.append(np.full(s, -1, np.int32))
            out[p] = np.concatenate(parts, axis=dim)
        return _Act(out)

    def split(self, v: _Act, params: dict, shapes: list) -> list[_Act]:
        cuts = np.cumsum([int(s) for s in params["sizes"]])[:-1]
        outs = [dict() for _ in shapes]
        for p, a in v.prov.items():
            for k, part in enumerate(np.split(a, cuts, axis=params["axis"])):
                if (part >= 0).any():
                    outs[k][p] = part
        return [_Act(o) for o in outs]

    def _static_starts(self, vals: list, shape: tuple, sizes: Sequence[int]) -> list:
        """Clamped start per axis, or None where it is data-dependent (and size < dim)."""
        starts = []
        for v, n, k in zip(vals, shape, sizes, strict=True):
            if k == n:
                starts.append(0)
            elif _is_act(v) or v.value is None:
                starts.append(None)
            else:
                starts.append(int(np.clip(int(v.value), 0, n - k)))
        return starts

    def dynamic_slice(self, eqn: Any, ins: list, out_shape: tuple) -> _Act:
        """Static starts slice the index arrays; a data-dependent start along an axis is handled
        conservatively: the output may come from anywhere along it (reduction over the axis)."""
        shape = tuple(eqn.invars[0].aval.shape)
        sizes = eqn.params["slice_sizes"]
        starts = self._static_starts(ins[1:], shape, sizes)
        prov = ins[0].prov
        dyn = tuple(i for i, st in enumerate(starts) if st is None)
        if dyn:
            red_shape = tuple(1 if i in dyn else n for i, n in enumerate(shape))
            prov = _reduce_prov(prov, dyn, red_shape)
            starts = [0 if st is None else st for st in starts]
            sizes = [1 if i in dyn else k for i, k in enumerate(sizes)]
        idx = tuple(slice(st, st + k) for st, k in zip(starts, sizes, strict=True))
        return _Act(_map_prov(prov, lambda a: _bcast(a[idx], out_shape), drop_empty=True))

    def dynamic_update_slice(self, eqn: Any, ins: list, out_shape: tuple) -> _Act:
        upd_shape = tuple(eqn.invars[1].aval.shape)
        starts = self._static_starts(ins[2:], out_shape, upd_shape)
        if None in starts:
            raise self.error(eqn, "dynamic_update_slice into an activation at non-constant offsets")
        idx = tuple(slice(s, s + k) for s, k in zip(starts, upd_shape, strict=True))
        base = ins[0].prov if _is_act(ins[0]) else {}
        upd = ins[1].prov if _is_act(ins[1]) else {}
        out = {}
        for p in sorted(set(base) | set(upd)):
            a = (
                np.array(_bcast(base[p], out_shape))
                if p in base
                else np.full(out_shape, -1, np.int32)
            )
            a[idx] = _bcast(upd[p], upd_shape) if p in upd else -1
            if (a >= 0).any():
                out[p] = a
        return _Act(out)

    def gather(self, eqn: Any, ins: list, out_shape: tuple) -> _Act:
        operand, indices = ins
        if not _is_act(operand):  # embedding lookup with data-dependent indices
            return _Act({ALWAYS_ALIVE: np.zeros(out_shape, np.int32)})
        if _is_act(indices) or indices.value is None:
            raise self.error(
                eqn,
                "gather from an activation at data-dependent indices",
                fix="index activations with static slices",
            )
        params = dict(eqn.params)
        if "FILL" in str(params.get("mode")):
            params["fill_value"] = -1
        out = {}
        for p, a in operand.prov.items():
            r = np.asarray(eqn.primitive.bind(jnp.asarray(a), jnp.asarray(indices.value), **params))
            r = np.maximum(r, -1).astype(np.int32)
            if (r >= 0).any():
                out[p] = r
        return _Act(out)

    # ---- control flow -------------------------------------------------------------------

    def eval_scan(self, eqn: Any, ins: list) -> list:
        prm = eqn.params
        n_c, n_carry, length = prm["num_consts"], prm["num_carry"], prm["length"]
        if length > 4096:
            raise self.error(eqn, f"scan of length {length} over activations is too long to unroll")
        consts, carry, xs = ins[:n_c], list(ins[n_c : n_c + n_carry]), ins[n_c + n_carry :]
        x_shapes = [tuple(v.aval.shape) for v in eqn.invars[n_c + n_carry :]]
        ys_per_it: dict[int, list] = {}
        self.ctx.append(("scan", self.where(eqn)))
        try:
            for it in range(length):
                i = length - 1 - it if prm["reverse"] else it
                x_i = [_index0(v, i, s) for v, s in zip(xs, x_shapes, strict=True)]
                outs = self.eval_closed(prm["jaxpr"], list(consts) + carry + x_i)
                carry = list(outs[:n_carry])
                ys_per_it[i] = list(outs[n_carry:])
        finally:
            self.ctx.pop()
        y_shapes = [tuple(v.aval.shape) for v in eqn.outvars[n_carry:]]
        ys = [
            _stack([ys_per_it[i][k] for i in range(length)], y_shapes[k][1:])
            for k in range(len(y_shapes))
        ]
        return carry + ys

    def eval_cond(self, eqn: Any, ins: list, shapes: list) -> list:
        index, ops = ins[0], ins[1:]
        branches = eqn.params["branches"]
        if not _is_act(index) and index.value is not None:
            return self.eval_closed(branches[int(np.clip(index.value, 0, len(branches) - 1))], ops)
        self.ctx.append(("cond", self.where(eqn)))
        results, flops = [], []
        try:
            for br in branches:
                f0 = self.flops
                results.append(self.eval_closed(br, ops))
                flops.append(self.flops - f0)
                self.flops = f0
        finally:
            self.ctx.pop()
        self.flops += max(flops)
        outs = []
        for k, s in enumerate(shapes):
            vals = [r[k] for r in results]
            acts = [v for v in vals if _is_act(v)]
            if not acts:
                outs.append(_Derived(frozenset().union(*(v.deps for v in vals))))
            else:
                outs.append(self.elementwise("max", acts, s) if len(acts) > 1 else acts[0])
        return outs

    # ---- prunable ops -------------------------------------------------------------------

    def kernel_origin(self, v: Any) -> _Origin | None:
        if isinstance(v, _Derived) and v.origin is not None:
            o = v.origin
            if o.path[0] == "params" and len(o.leaf_shape) >= 2:
                return o
        return None

    def check_kernel(self, eqn: Any, v: Any) -> None:
        """Raises when an activation meets a kernel computed from parameters that is not one leaf
        used as is (a slice of a stacked leaf, an ``nn.scan`` layer, weight standardisation, weight
        norm): it cannot become a prunable layer, and tracing on would drop the layer silently."""
        if not isinstance(v, _Derived) or self.kernel_origin(v) is not None:
            return
        paths = sorted("/".join(p) for p in v.deps if p and p[0] == "params")
        if not paths:
            return
        where = f" inside a '{self.ctx[-1][0]}' body" if self.ctx else ""
        raise self.error(
            eqn,
            f"the kernel of this op{where} is computed from {', '.join(paths[:3])} instead of "
            "being one parameter leaf used as is (a slice of a stacked parameter, an nn.scan "
            "layer, weight standardisation or weight norm), so it cannot be pruned as a layer",
            fix="give each conv/dense layer its own kernel parameter (unroll nn.scan into a "
            "Python loop of modules; keep derived kernels out of the layers to prune)",
        )

    def new_layer(self, eqn: Any, origin: _Origin, fields: dict) -> int:
        if self.ctx:
            prim, where = self.ctx[-1]
            raise TraceNotImplementedError(
                f"prunable op ({eqn.primitive.name} with kernel {'/'.join(origin.path)}) inside a "
                f"'{prim}' body (at {where}) is not supported: its channels would be carried "
                f"between iterations/branches. Fix: unroll the loop (e.g. a Python for loop over "
                f"layers instead of nn.scan / lax.scan) for pruning"
            )
        if origin.path in self.kernel_users:
            raise self.error(
                eqn,
                f"kernel {'/'.join(origin.path)} is used by two prunable ops (weight sharing)",
                fix="give each conv/dense layer its own kernel",
            )
        index = len(self.layers)
        self.kernel_users[origin.path] = index
        if any(f["name"] == fields["name"] for f in self.layers):
            fields["name"] = "/".join(origin.path[1:])
        fields.update(index=index, affine=[], divisors=[], source_line=self.where(eqn))
        self.layers.append(fields)
        return index

    def sources(self, prov: dict, in_shape: tuple, feat_axes: Sequence[int], feat_ids: np.ndarray):
        """Per-feature channels for each producer; feat_ids maps positions of feat_axes -> ids."""
        nd = len(in_shape)
        others = [a for a in range(nd) if a not in feat_axes]
        n_feat = int(feat_ids.size)
        order = feat_ids.reshape(-1)
        chans: dict[int, np.ndarray] = {}
        alive = np.zeros(n_feat, bool)
        for p, a in prov.items():
            m = _bcast(a, in_shape).transpose(others + list(feat_axes)).reshape(-1, n_feat)
            r, mixed = _reduce_index(m, (0,))
            if p == ALWAYS_ALIVE:
                alive[order] |= r >= 0
                continue
            alive[order] |= mixed
            c = np.full(n_feat, -1, np.int64)
            c[order] = r
            if (c >= 0).any():
                chans[p] = c
        if alive.any():
            chans[ALWAYS_ALIVE] = np.where(alive, 0, -1)
        return _make_sources(chans)

    def conv(self, eqn: Any, ins: list, out_shape: tuple) -> _Act:
        prm = eqn.params
        lhs, rhs = ins
        lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
        in_shape = tuple(eqn.invars[0].aval.shape)
        k_shape = tuple(eqn.invars[1].aval.shape)
        groups = prm["feature_group_count"]
        if prm["batch_group_count"] != 1:
            raise self.error(eqn, "convolution with batch_group_count != 1")
        if any(d != 1 for d in prm["lhs_dilation"]):
            raise self.error(
                eqn,
                "convolution with lhs_dilation (transposed convolution) is not supported",
                fix="use a regular strided convolution",
            )
        win = [k_shape[a] for a in rhs_spec[2:]]
        cin = in_shape[lhs_spec[1]]
        origin = self.kernel_origin(rhs)
        if _is_act(lhs):
            self.check_kernel(eqn, rhs)
        if origin is None or not _is_act(lhs):
            # not prunable: every output channel mixes all input features of its group
            self.flops += 2 * math.prod(out_shape) * math.prod(win) * (cin // groups)
            return _Act({ALWAYS_ALIVE: np.zeros(out_shape, np.int32)})
        g = origin.groups
        o_ax, i_ax, sp = rhs_spec[0], rhs_spec[1], rhs_spec[2:]
        spatial = sorted({a for ax in sp for a in g[ax]} | set(origin.dropped))
        out_ids = _feature_index(origin, [o_ax], k_shape)
        cout = k_shape[o_ax]
        out_spatial = tuple(out_shape[a] for a in out_spec[2:])
        n_pos = math.prod(out_spatial) * out_shape[out_spec[0]]
        fields = dict(
            name="/".join(origin.path[1:-1]),
            kind="conv",
            kernel_path=origin.path,
            kernel_shape=origin.leaf_shape,
            kernel_spatial_axes=tuple(spatial),
            kernel_in_axes=tuple(sorted(g[i_ax])),
            kernel_out_axes=tuple(sorted(g[o_ax])),
            out_shape_leaf=tuple(origin.leaf_shape[a] for a in sorted(g[o_ax])),
            in_features=cin,
            out_features=cout,
            groups=groups,
            kernel_size=tuple(win),
            strides=tuple(prm["window_strides"]),
            dilation=tuple(prm["rhs_dilation"]),
            padding=tuple((int(lo), int(hi)) for lo, hi in prm["padding"]),
            in_spatial=tuple(in_shape[a] for a in lhs_spec[2:]),
            out_spatial=out_spatial,
            n_positions=n_pos,
            cell_positions=(
                cells := _cell_positions(
                    tuple(in_shape[a] for a in lhs_spec[2:]),
                    out_spatial,
                    tuple(win),
                    tuple(prm["window_strides"]),
                    tuple(prm["rhs_dilation"]),
                    tuple(int(lo) for lo, _ in prm["padding"]),
                    n_pos // max(math.prod(out_spatial), 1),
                )
            ),
            macs=sum(cells) * (cin // groups) * cout,
            sources=self.sources(lhs.prov, in_shape, [lhs_spec[1]], np.arange(cin)),
            nonzero_dead=sorted(p for p in lhs.nz if p in lhs.prov),
        )
        index = self.new_layer(eqn, origin, fields)
        shape = [1] * len(out_shape)
        shape[out_spec[1]] = cout
        return _Act({index: np.broadcast_to(out_ids.reshape(shape).astype(np.int32), out_shape)})

    def dot_general(self, eqn: Any, ins: list, out_shape: tuple) -> _Act:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        shp = [tuple(v.aval.shape) for v in eqn.invars]
        k_side = None
        if _is_act(lhs) and self.kernel_origin(rhs) is not None:
            k_side = 1
        elif _is_act(rhs) and self.kernel_origin(lhs) is not None:
            k_side = 0
        if k_side is None:
            for a, b in ((lhs, rhs), (rhs, lhs)):
                if _is_act(a):
                    self.check_kernel(eqn, b)
            return self.dot_mixing(ins, shp, lc, rc, lb, rb, out_shape)
        if lb or rb:
            raise self.error(
                eqn,
                "dot_general between an activation and a kernel with batch dimensions",
                fix="use a plain Dense/DenseGeneral contraction without batch axes on the kernel",
            )
        origin = self.kernel_origin(ins[k_side])
        k_shape, a_shape = shp[k_side], shp[1 - k_side]
        kc, ac = (rc, lc) if k_side == 1 else (lc, rc)
        k_free = [a for a in range(len(k_shape)) if a not in kc]
        a_free = [a for a in range(len(a_shape)) if a not in ac]
        g = origin.groups
        in_ax = sorted({a for ax in kc for a in g[ax]})
        out_ax = sorted({a for ax in k_free for a in g[ax]})
        in_ids = _feature_index(origin, kc, k_shape)
        out_ids = _feature_index(origin, k_free, k_shape) if k_free else np.zeros((), np.int32)
        n_in, n_out = int(in_ids.size), int(out_ids.size)
        n_pos = math.prod(a_shape[a] for a in a_free)
        fields = dict(
            name="/".join(origin.path[1:-1]),
            kind="dense",
            kernel_path=origin.path,
            kernel_shape=origin.leaf_shape,
            kernel_spatial_axes=tuple(sorted(origin.dropped)),
            kernel_in_axes=tuple(in_ax),
            kernel_out_axes=tuple(out_ax),
            out_shape_leaf=tuple(origin.leaf_shape[a] for a in out_ax),
            in_features=n_in,
            out_features=n_out,
            groups=1,
            kernel_size=(),
            strides=(),
            dilation=(),
            padding=(),
            in_spatial=(),
            out_spatial=(),
            n_positions=n_pos,
            macs=n_pos * n_in * n_out,
            sources=self.sources(ins[1 - k_side].prov, a_shape, list(ac), in_ids),
            nonzero_dead=sorted(p for p in ins[1 - k_side].nz if p in ins[1 - k_side].prov),
        )
        index = self.new_layer(eqn, origin, fields)
        # output layout: lhs free dims then rhs free dims
        n_lhs_free = len(a_free) if k_side == 1 else len(k_free)
        kpos = list(range(n_lhs_free, len(out_shape))) if k_side == 1 else list(range(n_lhs_free))
        shape = [1] * len(out_shape)
        for j, ax in zip(kpos, k_free, strict=True):
            shape[j] = k_shape[ax]
        ids = out_ids.reshape(shape).astype(np.int32)
        return _Act({index: np.broadcast_to(ids, out_shape)})

    def dot_mixing(self, ins, shp, lc, rc, lb, rb, out_shape) -> _Act:
        """Non-prunable dot_general (activation-activation, or derived weight): reduce + union."""
        k = math.prod(shp[0][a] for a in lc)
        self.flops += 2 * math.prod(out_shape) * k
        parts = []
        nb = len(lb)
        n_lfree = len(shp[0]) - len(lc) - nb
        for side, (v, s, c, b) in enumerate(zip(ins, shp, (lc, rc), (lb, rb), strict=True)):
            if not _is_act(v):
                continue
            free = [a for a in range(len(s)) if a not in c and a not in b]
            perm = list(b) + free + list(c)
            red_shape = [s[a] for a in list(b) + free]
            prov = _reduce_prov(
                {p: _bcast(a, s).transpose(perm) for p, a in v.prov.items()},
                tuple(range(len(perm) - len(c), len(perm))),
                tuple(red_shape),
            )
            # place into output (batch, lhs free, rhs free)
            tmp = [1] * len(out_shape)
            pos = list(range(nb)) + (
                list(range(nb, nb + n_lfree))
                if side == 0
                else list(range(nb + n_lfree, len(out_shape)))
            )
            for j, n in zip(pos, red_shape, strict=True):
                tmp[j] = n
            parts.append(
                _Act({p: np.broadcast_to(a.reshape(tmp), out_shape) for p, a in prov.items()})
            )
        if len(parts) == 1:
            return parts[0]
        return self._union_nocouple(parts, out_shape)

    def _union_nocouple(self, parts: list, out_shape: tuple) -> _Act:
        saved = self.uf.parent.copy()
        out = self.elementwise("max", parts, out_shape)
        self.uf.parent = saved
        return out


def _make_sources(chans: dict[int, np.ndarray]) -> tuple[InputSource, ...]:
    fed = {p: c >= 0 for p, c in chans.items()}
    out = []
    for p in sorted(chans):
        others = np.zeros_like(fed[p])
        for q, f in fed.items():
            if q != p:
                others |= f
        if (fed[p] & others).any():
            kind = "residual"
        elif not fed[p].all():
            kind = "concat"
        else:
            kind = "seq"
        out.append(InputSource(int(p), tuple(int(c) for c in chans[p]), kind))
    return tuple(out)


# Unary ops with f(0) == 0: zeroing their input's leaves zeroes their output.
_ZERO_AT_ZERO = {
    *"neg abs sign sqrt cbrt square tanh sin tan sinh asinh asin atan atanh erf erf_inv".split(),
    *"expm1 log1p floor ceil round real imag conj copy copy_p".split(),
    *"convert_element_type reduce_precision".split(),
}


def _zero_ok(name: str, ins: list) -> bool:
    """`_Derived.zero_ok` of an elementwise op on values without activations."""

    def zero(v) -> bool:  # zero once the leaves are zeroed: zero_ok, or a known zero constant
        return v.zero_ok if v.deps else v.value is not None and not np.any(v.value)

    if name in _ZERO_AT_ZERO:
        return len(ins) == 1 and zero(ins[0])
    if name in ("mul", "and"):
        return any(zero(v) for v in ins)
    if name in ("add", "sub", "add_any", "max", "min"):
        return all(zero(v) for v in ins)
    if name == "div":  # 0 / d, with a denominator no mask touches
        return zero(ins[0]) and not any(p[0] == "params" for p in ins[1].deps)
    return False


def _merge_elem(ins: list, shape: tuple) -> Any:
    arrs = []
    for v in ins:
        if v.elem is None:
            return None
        if isinstance(v.elem, np.ndarray):
            arrs.append(_bcast(v.elem, shape))
    if not arrs:
        return _WILD
    for a in arrs[1:]:
        if not np.array_equal(a, arrs[0]):
            return None
    return arrs[0]


def _index0(v: Any, i: int, shape: tuple) -> Any:
    if _is_act(v):
        return _Act({p: _bcast(a, shape)[i] for p, a in v.prov.items()})
    elem = v.elem[i] if isinstance(v.elem, np.ndarray) else v.elem
    value = v.value[i] if v.value is not None else None
    return _Derived(v.deps, elem, None, value, v.zero_ok)


def _stack(vals: list, shape: tuple) -> Any:
    acts = [v for v in vals if _is_act(v)]
    if not acts:
        return _Derived(frozenset().union(*(v.deps for v in vals)))
    producers = sorted({p for v in acts for p in v.prov})
    out = {}
    for p in producers:
        out[p] = np.stack(
            [
                _bcast(v.prov[p], shape)
                if _is_act(v) and p in v.prov
                else np.full(shape, -1, np.int32)
                for v in vals
            ]
        )
    return _Act(out)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


def trace_model(
    apply_fn: Callable, variables: Any, sample_input: Any, *, train: bool = False
) -> LayerGraph:
    """Traces a pure model function into a static `LayerGraph` (host-only, once per model).

    Args:
      apply_fn: pure ``apply_fn(variables, x, train=False) -> output`` (Linen: ``model.apply``).
      variables: nested dict of leaves (arrays or ShapeDtypeStruct), collection names first
        ("params", "batch_stats", ...). Only shapes and dtypes are used.
      sample_input: array or ShapeDtypeStruct ``[B, ...]``; only ``shape[1:]`` and dtype are used
        (the model is traced at batch 1).
      train: passed to ``apply_fn``.

    Returns:
      The `LayerGraph` of the model's prunable conv/dense layers (see `sculpt_jax.types` and this
      module's docstring for the conventions).

    Raises:
      TraceError: an op the tracer cannot analyse is applied to an activation; the message names
        the primitive and the source line.
    """
    if not hasattr(sample_input, "shape") or len(sample_input.shape) < 1:
        raise ValueError(
            "sample_input must be an array or ShapeDtypeStruct with a leading batch axis, e.g. "
            "jnp.zeros((1, 32, 32, 3)); got " + repr(type(sample_input))
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    if not flat:
        raise ValueError(
            "variables has no leaves; pass the model's variables dict ({'params': ...})"
        )
    paths = [path_of(kp) for kp, _ in flat]
    leaves = [_abstract(x) for _, x in flat]
    x1 = jax.ShapeDtypeStruct((1,) + tuple(sample_input.shape[1:]), sample_input.dtype)

    def fn(leaves_, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves_), x, train=train)

    closed = jax.make_jaxpr(fn)(leaves, x1)
    leaf_shapes = {p: tuple(leaf.shape) for p, leaf in zip(paths, leaves, strict=True)}
    tracer = _Tracer(leaf_shapes)
    args = []
    for p, leaf in zip(paths, leaves, strict=True):
        shape = tuple(leaf.shape)
        size = math.prod(shape)
        if size <= _ELEM_MAX_SIZE and shape:
            elem = np.arange(size, dtype=np.int32).reshape(shape)
        else:
            elem = _WILD if not shape else None
        origin = _Origin(p, shape, tuple((i,) for i in range(len(shape))))
        args.append(_Derived(frozenset([p]), elem, origin, zero_ok=p[0] == "params"))
    args.append(_Act({ALWAYS_ALIVE: np.broadcast_to(np.zeros((), np.int32), x1.shape)}))
    outs = tracer.eval_closed(closed, args)

    # model output: the last axis of every activation leaf, in order
    output_sources: tuple[InputSource, ...] = ()
    out_avals = [tuple(v.aval.shape) for v in closed.jaxpr.outvars]
    for v, s in zip(outs, out_avals, strict=True):
        if _is_act(v):
            full = s if s else (1,)
            prov = {p: _bcast(a, s).reshape(full) for p, a in v.prov.items()}
            output_sources += tracer.sources(prov, full, [len(full) - 1], np.arange(full[-1]))
    return _finish(tracer, x1, output_sources)


def _finish(tracer: _Tracer, x1: Any, output_sources: tuple) -> LayerGraph:
    uf = tracer.uf
    all_sources = [f["sources"] for f in tracer.layers] + [output_sources]
    for srcs in all_sources:
        res = [s.producer for s in srcs if s.kind == "residual" and s.producer >= 0]
        for p in res[1:]:
            uf.union(res[0], p)
    depth: list[int] = []
    layers = []
    for f in tracer.layers:
        d = max((depth[s.producer] + 1 for s in f["sources"] if s.producer >= 0), default=0)
        depth.append(d)
        layers.append(
            Layer(
                index=f["index"],
                name=f["name"],
                kind=f["kind"],
                kernel_path=f["kernel_path"],
                affine_paths=tuple(f["affine"]),
                divisor_paths=tuple(f["divisors"]),
                nonzero_dead_sources=tuple(f["nonzero_dead"]),
                kernel_shape=f["kernel_shape"],
                kernel_spatial_axes=f["kernel_spatial_axes"],
                kernel_in_axes=f["kernel_in_axes"],
                kernel_out_axes=f["kernel_out_axes"],
                in_features=f["in_features"],
                out_features=f["out_features"],
                groups=f["groups"],
                kernel_size=f["kernel_size"],
                strides=f["strides"],
                dilation=f["dilation"],
                padding=f["padding"],
                in_spatial=f["in_spatial"],
                out_spatial=f["out_spatial"],
                n_positions=f["n_positions"],
                macs=f["macs"],
                sources=f["sources"],
                depth=d,
                source_line=f["source_line"],
                cell_positions=f.get("cell_positions", ()),
            )
        )
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        groups.setdefault(uf.find(i), []).append(i)
    coupled = tuple(sorted(tuple(sorted(g)) for g in groups.values()))
    total = sum(math.prod(s) for p, s in tracer.leaf_shapes.items() if p and p[0] == "params")
    return LayerGraph(
        layers=tuple(layers),
        input_shape=tuple(x1.shape[1:]),
        output_sources=output_sources,
        coupled_groups=coupled,
        other_flops=int(tracer.flops),
        total_params=int(total),
    )


def _cell_positions(in_spatial, out_spatial, win, strides, dilation, pad_lo, batch) -> tuple:
    """Per kernel cell (row-major), output positions where it reads an in-bounds input."""
    per_dim = []
    for n_in, n_out, k, s, d, lo in zip(in_spatial, out_spatial, win, strides, dilation, pad_lo,
                                       strict=True):  # fmt: skip
        pos = np.arange(n_out)[:, None] * s - lo + np.arange(k)[None, :] * d
        per_dim.append(((pos >= 0) & (pos < n_in)).sum(axis=0))
    grid = np.ones((), np.int64)
    for c in per_dim:
        grid = np.multiply.outer(grid, c)
    return tuple(int(v) * batch for v in np.asarray(grid).reshape(-1))


def valid_macs(layer: Layer) -> int:
    """MACs of `layer` counting only kernel taps that land inside the unpadded input (host-only).

    This is what XLA's ``cost_analysis()`` counts for a padded convolution (``2 * valid_macs``
    FLOPs); `Layer.macs` counts every tap. Equal to ``layer.macs`` for dense layers.
    """
    if layer.kind != "conv":
        return layer.macs
    taps = 1
    for n_in, n_out, k, s, d, (lo, _) in zip(
        layer.in_spatial,
        layer.out_spatial,
        layer.kernel_size,
        layer.strides,
        layer.dilation,
        layer.padding,
        strict=True,
    ):
        pos = np.arange(n_out)[:, None] * s - lo + np.arange(k)[None, :] * d
        taps *= int(((pos >= 0) & (pos < n_in)).sum())
    batch = layer.n_positions // max(math.prod(layer.out_spatial), 1)
    return batch * taps * (layer.in_features // layer.groups) * layer.out_features


# --------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def nnx_split(module: Any) -> tuple[Any, dict]:
    """Splits an ``nnx.Module`` into ``(graphdef, state)`` with ``state`` a pure nested dict.

    ``state = {"params": ..., "batch_stats": ..., "other": ...}`` holds the ``nnx.Param``,
    ``nnx.BatchStat`` and remaining variables (empty collections omitted) as plain dicts of arrays
    with string keys, so `sculpt_jax.tree_util` paths address it like Linen variables. Host-only.
    """
    from flax import nnx

    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    state = {}
    for name, st in (("params", params), ("batch_stats", stats), ("other", rest)):
        pure = _str_keys(nnx.to_pure_dict(st))
        if jax.tree.leaves(pure):
            state[name] = pure
    return graphdef, state


def nnx_apply_fn(graphdef: Any) -> Callable:
    """The pure Linen-style apply of an NNX graphdef (state from `nnx_split`).

    ``apply_fn(state, x, train=False)`` -> output, and in training
    ``apply_fn(state, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})`` ->
    ``(output, {"batch_stats": ...})`` as `sculpt_jax.training` wants it. Merges the module inside
    the call (jittable), switches it to ``.train()`` / ``.eval()`` mode, reseeds its "dropout"
    stream from ``rngs`` when it has one, and calls it on ``x``; other in-place updates (RNG
    counters) are discarded.
    """
    from flax import nnx

    def apply_fn(state: dict, x: Any, train: bool = False, mutable: Any = False,
                 rngs: Any = None) -> Any:  # fmt: skip
        model = nnx.merge(graphdef, *state.values())
        if train:
            model.train()
        else:
            model.eval()
        if rngs and "dropout" in rngs and _has_stream(model, "dropout"):
            nnx.reseed(model, dropout=rngs["dropout"])
        out = model(x)
        if not mutable:
            return out
        _, new = nnx_split(model)
        return out, {k: new[k] for k in mutable if k in new}

    return apply_fn


def _has_stream(model: Any, name: str) -> bool:
    """True when an NNX module holds an RNG stream called `name` (``nnx.Rngs(name=...)``)."""
    from flax import nnx

    return any(isinstance(v, nnx.RngStream) and getattr(v, "tag", None) == name
               for _, v in nnx.iter_graph(model))  # fmt: skip


def trace_nnx(
    module: Any, sample_input: Any, *, train: bool = False
) -> tuple[LayerGraph, Any, dict]:
    """Traces an ``nnx.Module``: returns ``(layer_graph, graphdef, state)`` (host-only).

    ``state`` is the pure dict of `nnx_split` (paths like ``("params", "conv1", "kernel")``) and
    ``nnx_apply_fn(graphdef)`` is the matching pure apply function.
    """
    graphdef, state = nnx_split(module)
    graph = trace_model(nnx_apply_fn(graphdef), state, sample_input, train=train)
    return graph, graphdef, state
