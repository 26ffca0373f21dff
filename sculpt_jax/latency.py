"""Per-layer latency lookup tables and the latency model the decoder can target (layer 2).

Hardware-aware budgets in the style of NetAdapt (Yang et al., ECCV 2018, Sec. 3.2: per-layer
lookup tables) and AMC (He et al., ECCV 2018, latency-constrained compression): the latency of a
pruned model on one backend is modelled as

    T(ids) = T_rest + sum_l T_l(c_in_l, c_out_l),

where ``c_in_l`` / ``c_out_l`` are layer l's alive input features and filters
(`flops.alive_widths_ids`: the widths the compacted model runs it at, residual coupling included)
and ``T_l`` is a table measured by timing the layer ALONE (its conv / dense op, plus a per-channel
bias, at those widths, on random input of the layer's spatial size and the table's batch size), on
a small grid of widths per axis (0 and ``ceil(f * C)`` for f in `GRID`), interpolated bilinearly.
Every table is made non-decreasing in both widths by a cumulative maximum (timing noise must not
make pruning look slower), so T only falls when alive counts fall: the decoder's bisection on its
shift stays monotone (`decode.make_decoder(kind="latency")`). ``T_rest`` (everything that is not a
prunable op: pooling, activations not fused into the layer, the framework's overhead) is the dense
model measured whole minus the sum of the dense per-layer entries, a constant (reported; it may be
negative where the per-layer timings overcount a fused model), so T(dense) equals the measured
dense latency. Where the dense model as a whole runs slower than compaction's replay of it (BN
folded, params as constants; XLA:CPU on VGG), the caller passes the unpruned compacted model
(`measure_table(unpruned=...)`) and ``T_rest`` is calibrated on it instead: T(no pruning) is then
that model's time, below the dense latency, and the decoder refuses a target that compaction alone
already passes.

The default table models the "filters" lowering of `compaction.compact` with ``align=1`` (the
decoder needs a prediction that moves with every filter; an aligned compact model runs its outputs
rounded up to the alignment, so its measured latency can sit above the prediction: the pipeline
reports both). Depthwise convs run one channel per group, so their table is indexed by the smaller
width.

Pattern-grouped lowerings (``lowering="grouped"`` or ``"taps"``, `compaction.compact`): a conv
that takes the lowering (`unit_lowering_ok`: a 3x3, ungrouped, undilated conv of a per-filter
library with at least ``min_width`` filters; every other layer keeps the filter table) runs as a
few dense ops, its *units*, each on the filters of some patterns:

    T_l = sum_u T_lu(c_in_l, n_lu),   n_lu = sum_p U_up count_lp,

where ``count_lp`` is how many of layer l's filters carry pattern p and ``U [n_units, P]`` is 0/1:
under "taps" one unit per kernel tap (the strided window of the padded input times the ``[c_in,
n]`` weights of the filters keeping that tap, ``U_tp`` = pattern p keeps tap t); under "grouped"
one unit per distinct non-empty footprint (a conv with the kernel cropped to the footprint's
bounding box and the padding shifted, ``U_gp`` = pattern p has footprint g). Each ``T_lu`` is
timed alone on the (c_in, n) grid, with n = 1 added to it (an op's launch cost is what a
one-filter group pays) and ``T_lu(., 0) = 0`` (an empty group runs nothing). Such a prediction is
not monotone in the decoder's shift (a filter moving to a footprint no other filter has starts an
op), which the decoder tolerates (its bisection keeps a bracket; on-budget is checked per
decode). Uncalibrated, ``T_rest`` stays the dense model minus its per-layer FILTER entries at full
width (the dense model runs filter ops); calibrated (``unpruned``), it is the unpruned model in the
table's lowerings minus the units it runs (the keep pattern's, at full width). Either way the
reduction is against the dense model (a tap-lowered model can predict slower than dense). The
residual gathers of coupled grouped convs (`compaction`'s ``group_coupled``) are
not modelled: the pipeline reports predicted beside measured latency.

A table is measured once per model and backend: `table_key` names what it depends on (the layer
shapes, the backend platform and device kind, the JAX version, the batch size, the lowering and
the grid); the pipeline caches it as JSON (`to_json`) under that key and re-measures when the key
changes. Host-only: `measure_table`, `table_key`, `time_fn`, `to_json`, `from_json`. Jittable: the
function `make_predictor` returns.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sculpt_jax import flops as flops_lib
from sculpt_jax import patterns as pat
from sculpt_jax.types import Layer, LayerGraph

GRID = (0.25, 0.5, 0.75, 1.0)  # width fractions timed per axis (plus width 0, which costs 0)
LOWERINGS = ("filters", "grouped", "taps")  # lowerings a table can model (`compaction.compact`)
VERSION = 2  # bump when what a table measures changes (old caches are then re-measured)

# A timer: ``timer(build, info) -> milliseconds`` of ``fn(*args)`` where ``(fn, args) = build()``
# (built lazily, so a fake timer in a test allocates nothing); info names what is timed:
# {"layer": name or None (the whole dense model), "c_in": int, "c_out": int, "unit": None (the
# layer's filter op) or the unit's op ("tap" or "box:r0:r1:c0:c1", `layer_units`)}.
Timer = Callable[[Callable, tuple, dict], float]


class LatencyTable(NamedTuple):
    """A model's measured latency model on one backend (see the module docstring).

    key: `table_key` (what it was measured for). in_widths / out_widths: per layer, int
    ``[n_in]`` / ``[n_out]`` strictly increasing, starting at 0. ms: per layer float ``[n_in,
    n_out]`` milliseconds (a layer on the filter lowering) or ``[n_units, n_in, n_out]`` (a layer
    on a pattern-grouped lowering: one table per unit), non-decreasing along both width axes.
    dense_ms: the whole dense model. rest_ms: the constant T_rest (dense_ms minus the dense
    per-layer filter entries, or, calibrated, the unpruned compacted model minus its entries). lowerings: per layer "filters" or the table's grouped lowering (empty
    = all "filters"). units: per layer None (filters) or float ``[n_units, P]`` 0/1, which
    patterns' filters each unit runs (`layer_units`).
    """

    key: dict
    in_widths: tuple[np.ndarray, ...]
    out_widths: tuple[np.ndarray, ...]
    ms: tuple[np.ndarray, ...]
    dense_ms: float
    rest_ms: float
    lowerings: tuple[str, ...] = ()
    units: tuple[np.ndarray | None, ...] = ()

    def layer_lowerings(self, graph: LayerGraph) -> dict[str, str]:
        """`lowered_layers` of this table: what `compaction.compact(layer_lowerings=...)` takes
        to build the model this table models."""
        return lowered_layers(graph, self.lowerings or ("filters",) * graph.n_layers)


def _is_depthwise(layer: Layer) -> bool:
    return layer.groups > 1 and layer.groups == layer.in_features == layer.out_features


def graph_signature(graph: LayerGraph) -> str:
    """sha256 of the layer shapes the timings depend on (names, kinds, kernel shapes, widths,
    groups, strides, padding, spatial sizes) and the model's parameter and FLOP totals."""
    parts = [(l.name, l.kind, l.kernel_shape, l.in_features, l.out_features, l.groups,
              l.kernel_size, l.strides, l.dilation, l.padding, l.in_spatial, l.n_positions)
             for l in graph.layers]  # fmt: skip  # noqa: E741
    text = repr((parts, graph.total_params, graph.other_flops))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backend_name() -> str:
    """``"<platform>:<device kind>"`` of JAX's default device, e.g. ``"cpu:cpu"``."""
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind}"


def table_key(graph: LayerGraph, *, batch: int, lowering: str = "filters",
              backend: str | None = None, grid: Sequence[float] = GRID, min_width: int = 0,
              library: str | pat.PatternLibrary = "reference6") -> dict:  # fmt: skip
    """What a table depends on (JSON-able; host). `backend` defaults to `backend_name()`;
    `min_width` and `library` matter to the grouped lowerings only (which layers take them, and
    their units)."""
    if lowering not in LOWERINGS:
        raise ValueError(f"latency tables model the lowerings {LOWERINGS}, not {lowering!r}")
    if min_width < 0:
        raise ValueError(f"latency table min_width must be >= 0, got {min_width}")
    return {"version": VERSION, "graph": graph_signature(graph),
            "backend": backend or backend_name(), "jax": jax.__version__, "batch": int(batch),
            "lowering": lowering, "grid": [float(f) for f in grid], "min_width": int(min_width),
            "library": pat.get_library(library).name}  # fmt: skip


def key_digest(key: dict) -> str:
    """A short file-name-safe digest of a `table_key`."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def grid_widths(width: int, grid: Sequence[float] = GRID, multiple: int = 1) -> np.ndarray:
    """int ``[n]``: 0 and ``ceil(f * width)`` for f in `grid`, rounded up to `multiple`, capped at
    `width`, unique and increasing (so n >= 2 for any width >= 1)."""
    w = [min(width, -(-int(np.ceil(f * width)) // multiple) * multiple) for f in grid]
    return np.unique(np.asarray([0, width, *(x for x in w if x > 0)], np.int64))


def layer_op(layer: Layer, c_in: int, c_out: int, batch: int) -> tuple[Callable, tuple]:
    """(jitted fn, args) running `layer`'s op alone at widths (c_in, c_out) on a batch of random
    input, plus a per-channel bias (host). Conv layers are feature-last (NHWC-like)."""
    k = jax.random.split(jax.random.key(0), 3)
    if layer.kind == "dense":
        shape = (batch, layer.n_positions, c_in) if layer.n_positions > 1 else (batch, c_in)
        x = jax.random.normal(k[0], shape, jnp.float32)
        w = jax.random.normal(k[1], (c_in, c_out), jnp.float32)
        b = jnp.zeros((c_out,), jnp.float32)
        return jax.jit(lambda x, w, b: x @ w + b), (x, w, b)
    nd = len(layer.kernel_size)
    g = min(c_in, c_out) if _is_depthwise(layer) else layer.groups
    if _is_depthwise(layer):
        c_in = c_out = g
    spatial = "DHW"[3 - nd :] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"layer {layer.name!r}: latency tables support 1-3 spatial dims")
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    x = jax.random.normal(k[0], (batch, *layer.in_spatial, c_in), jnp.float32)
    w = jax.random.normal(k[1], (*layer.kernel_size, c_in // g, c_out), jnp.float32)
    b = jnp.zeros((c_out,), jnp.float32)

    def conv(x, w, b):
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=layer.strides, padding=layer.padding,
            rhs_dilation=layer.dilation or None, dimension_numbers=dn, feature_group_count=g,
        )  # fmt: skip
        return y + b

    return jax.jit(conv), (x, w, b)


def time_fn(build: Callable, info: dict | None = None, *, repeats: int = 10,
            warmup: int = 2) -> float:  # fmt: skip
    """Median milliseconds of ``fn(*args)``, ``(fn, args) = build()`` (compiled and warmed first;
    host). A `Timer`; the pipeline passes one built on `compaction.measure_latency` instead."""
    fn, args = build()
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(ts))


def unit_lowering_ok(layer: Layer, library: str | pat.PatternLibrary = "reference6") -> bool:
    """Whether a table models `layer` under a pattern-grouped lowering (host): an ungrouped,
    undilated 2-D conv whose kernel every pattern of the per-filter `library` applies to (3x3).
    The other layers keep the filter table (as `compaction.compact` keeps them on filters)."""
    lib = pat.get_library(library)
    return (layer.kind == "conv" and layer.groups == 1 and len(layer.kernel_size) == 2
            and all(d == 1 for d in layer.dilation) and lib.kind == "filter"
            and tuple(layer.kernel_size) == lib.kernel_shape
            and bool(pat.valid_patterns(layer, lib).all()))  # fmt: skip


def layer_units(lowering: str, library: str | pat.PatternLibrary = "reference6"
                ) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """(unit ops, U float32 ``[n_units, P]``) of a conv under `lowering` (host; module doc):
    "taps": one unit per kernel tap (row-major), op "tap", ``U_tp`` = pattern p keeps tap t;
    "grouped": one unit per distinct non-empty footprint, op ``"box:r0:r1:c0:c1"`` (its bounding
    box, inclusive), ``U_gp`` = pattern p has that footprint."""
    lib = pat.get_library(library)
    cells = np.asarray(lib.masks) > 0  # [P, kh, kw]
    if lowering == "taps":
        return ["tap"] * cells[0].size, cells.reshape(lib.n_patterns, -1).T.astype(np.float32)
    if lowering != "grouped":
        raise ValueError(f"units exist for the lowerings 'grouped' and 'taps', not {lowering!r}")
    foot: dict[bytes, list[int]] = {}
    for p in range(lib.n_patterns):
        if cells[p].any():
            foot.setdefault(cells[p].tobytes(), []).append(p)
    ops, rows = [], []
    for ps in foot.values():
        r, c = np.nonzero(cells[ps[0]])
        ops.append(f"box:{r.min()}:{r.max()}:{c.min()}:{c.max()}")
        rows.append(np.isin(np.arange(lib.n_patterns), ps).astype(np.float32))
    return ops, np.stack(rows)


def unit_op(layer: Layer, op: str, c_in: int, n: int, batch: int) -> tuple[Callable, tuple]:
    """(jitted fn, args) running one unit of `layer`'s grouped lowering alone (host; feature-last
    layout, as `compaction`'s lowerings): "tap", the strided window of the padded input times a
    ``[c_in, n]`` matrix; "box:r0:r1:c0:c1", a conv with that crop of the kernel and the padding
    shifted by it (negative padding crops the input, as `compaction` does)."""
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (batch, *layer.in_spatial, c_in), jnp.float32)
    pads = [tuple(p) for p in layer.padding]
    if op == "tap":
        w = jax.random.normal(k[1], (c_in, n), jnp.float32)
        cfg = [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)]
        limit = [batch, *((o - 1) * s + 1 for o, s in zip(layer.out_spatial, layer.strides,
                                                          strict=True)), c_in]  # fmt: skip

        def tap(x, w):
            xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
            xs = jax.lax.slice(xp, [0] * x.ndim, limit, [1, *layer.strides, 1])
            return xs @ w

        return jax.jit(tap), (x, w)
    r0, r1, c0, c1 = (int(v) for v in op.split(":")[1:])
    (kh, kw), box = layer.kernel_size, ((r0, r1), (c0, c1))
    w = jax.random.normal(k[1], (r1 - r0 + 1, c1 - c0 + 1, c_in, n), jnp.float32)
    padding = [(lo - a, hi - (size - 1 - b)) for (lo, hi), (a, b), size in
               zip(pads, box, (kh, kw), strict=True)]  # fmt: skip

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, layer.strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    return jax.jit(conv), (x, w)


def _op_signature(layer: Layer) -> tuple:
    """Layers with equal signatures time the same at equal widths (measured once)."""
    return (
        layer.kind,
        layer.kernel_size,
        layer.strides,
        layer.dilation,
        layer.padding,
        layer.in_spatial,
        layer.n_positions,
        "dw" if _is_depthwise(layer) else layer.groups,
    )


def table_lowerings(graph: LayerGraph, lowering: str = "filters", min_width: int = 0,
                    library: str | pat.PatternLibrary = "reference6") -> tuple[str, ...]:  # fmt: skip
    """Per layer, the lowering a table of `lowering` models it in (host): `lowering` for the
    layers `unit_lowering_ok` with at least `min_width` filters, else "filters"."""
    return tuple(lowering if lowering != "filters" and layer.out_features >= min_width
                 and unit_lowering_ok(layer, library) else "filters"
                 for layer in graph.layers)  # fmt: skip


def lowered_layers(graph: LayerGraph, lowerings: Sequence[str]) -> dict[str, str]:
    """``{layer name: lowering}`` of the layers not on the filter lowering (host), from per-layer
    `lowerings` (`table_lowerings`): `compaction.compact`'s ``layer_lowerings``."""
    return {la.name: low for la, low in zip(graph.layers, lowerings, strict=True)
            if low != "filters"}  # fmt: skip


class _Timings:
    """Memoised table entries of one measurement: equal signatures are timed once (host)."""

    def __init__(self, timer, batch, total, progress):
        self.timer, self.batch, self.total, self.progress = timer, batch, total, progress
        self.memo: dict = {}
        self.done = 0

    def __call__(self, layer: Layer, ci: int, co: int, op: str | None = None) -> float:
        sig = (_op_signature(layer), op, int(ci), int(co))
        if sig not in self.memo:
            if op is None:
                build = lambda: layer_op(layer, int(ci), int(co), self.batch)  # noqa: E731
            else:
                build = lambda: unit_op(layer, op, int(ci), int(co), self.batch)  # noqa: E731
            self.memo[sig] = float(self.timer(build, {"layer": layer.name, "c_in": int(ci),
                                                      "c_out": int(co), "unit": op}))  # fmt: skip
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        return self.memo[sig]


def _grid_table(t: _Timings, layer: Layer, win, wout, op: str | None = None) -> np.ndarray:
    """float ``[n_in, n_out]``: `layer`'s op (or unit `op`) on the width grid, 0 at width 0,
    made non-decreasing along both axes by a cumulative maximum."""
    ms = np.zeros((len(win), len(wout)))
    for i, ci in enumerate(win):
        for j, co in enumerate(wout):
            if ci == 0 or co == 0:
                continue
            a, b = (min(ci, co),) * 2 if op is None and _is_depthwise(layer) else (ci, co)
            ms[i, j] = t(layer, a, b, op)
    return np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)


def measure_table(
    graph: LayerGraph,
    apply_fn: Callable,
    variables: Any,
    sample_input: Any,
    *,
    batch: int = 1,
    grid: Sequence[float] = GRID,
    timer: Timer | None = None,
    backend: str | None = None,
    progress: Callable | None = None,
    lowering: str = "filters",
    min_width: int = 0,
    library: str | pat.PatternLibrary = "reference6",
    unpruned: Callable | None = None,
) -> LatencyTable:
    """Times every prunable layer of `graph` on its width grid and the dense model (host-only).

    Args:
      graph: the model's `LayerGraph`; apply_fn: ``apply_fn(variables, x, train=False)``;
        sample_input ``[B, ...]`` gives the model's example shape (its values are unused).
      batch: the batch size the table models. grid: width fractions per axis (`GRID`).
      timer: a `Timer` (default `time_fn`); tests pass a deterministic one.
      backend: the backend string stored in the key (default `backend_name()`).
      progress: optional ``progress(done, total)`` callback.
      lowering: the `compaction` lowering modelled (`LOWERINGS`): "grouped" / "taps" time the
        units of every layer `table_lowerings` puts on it; min_width, library: as there.
      unpruned: optional ``build() -> (fn, args)`` of the unpruned model as the compacted form
        runs it (`compaction.unpruned_build`: no masks, the table's lowerings, align 1): T_rest
        is then its time minus the full-width entries, so the prediction at no pruning is that
        model's time (what compaction alone gives) while reductions stay against the dense
        model. Needed where the dense model as a whole runs slower than its layers alone (XLA:CPU
        on VGG at batch 1: 115 ms dense vs 78 ms for its layers timed apart); None: the dense
        model itself (prediction at no pruning = dense).
    Returns: a `LatencyTable` keyed by `table_key`.
    """
    key = table_key(graph, batch=batch, backend=backend, grid=grid, lowering=lowering,
                    min_width=min_width, library=library)  # fmt: skip
    lows = table_lowerings(graph, lowering, min_width, library)
    plans, unit_of = [], {}
    for layer, low in zip(graph.layers, lows, strict=True):
        mult = 1 if _is_depthwise(layer) else layer.groups
        wout = grid_widths(layer.out_features, grid, mult)
        if low != "filters":
            unit_of[layer.index] = layer_units(low, library)
            wout = np.union1d(wout, [1])
        plans.append((grid_widths(layer.in_features, grid, mult), wout))
    total = 1 + sum((len(a) - 1) * (len(b) - 1) * len(unit_of.get(i, ([None],))[0])
                    for i, (a, b) in enumerate(plans))  # fmt: skip
    t = _Timings(timer or time_fn, batch, total, progress)
    keep = pat.get_library(library).keep_id
    tables, units, full, unpruned_entry = [], [], [], []
    for layer, (win, wout) in zip(graph.layers, plans, strict=True):
        if layer.index not in unit_of:
            tables.append(_grid_table(t, layer, win, wout))
            units.append(None)
            full.append(tables[-1][-1, -1])
            unpruned_entry.append(full[-1])
            continue
        ops, u = unit_of[layer.index]
        tables.append(np.stack([_grid_table(t, layer, win, wout, op) for op in ops]))
        units.append(u)
        full.append(t(layer, layer.in_features, layer.out_features))  # the dense filter op
        # unpruned, every filter keeps all: the units of the keep pattern run at full width
        unpruned_entry.append(float(np.sum(u[:, keep] * tables[-1][:, -1, -1])))

    def build_dense():
        x = jnp.zeros((batch, *np.shape(sample_input)[1:]), jnp.asarray(sample_input).dtype)
        return jax.jit(lambda v, x: apply_fn(v, x, train=False)), (variables, x)

    dense_ms = float(t.timer(build_dense, {"layer": None, "c_in": 0, "c_out": 0, "unit": None}))
    if progress is not None:
        progress(total, total)
    rest = dense_ms - float(sum(full))  # the dense model runs every layer's filter op
    if unpruned is not None:  # the unpruned model in the table's lowerings runs their units
        base_ms = float(t.timer(unpruned, {"layer": None, "c_in": 0, "c_out": 0, "unit": "model"}))
        rest = base_ms - float(sum(unpruned_entry))
    return LatencyTable(key, tuple(p[0] for p in plans), tuple(p[1] for p in plans),
                        tuple(tables), dense_ms, rest, lows, tuple(units))  # fmt: skip


def to_json(table: LatencyTable) -> dict:
    """A JSON-able dict of `table` (`from_json` reads it back)."""
    return {"key": table.key, "dense_ms": table.dense_ms, "rest_ms": table.rest_ms,
            "in_widths": [w.tolist() for w in table.in_widths],
            "out_widths": [w.tolist() for w in table.out_widths],
            "ms": [m.tolist() for m in table.ms], "lowerings": list(table.lowerings),
            "units": [None if u is None else u.tolist() for u in table.units]}  # fmt: skip


def from_json(d: dict) -> LatencyTable:
    """The `LatencyTable` of a `to_json` dict (ValueError naming the problem on a malformed one)."""
    try:
        n = len(d["ms"])
        t = LatencyTable(dict(d["key"]), tuple(np.asarray(w, np.int64) for w in d["in_widths"]),
                         tuple(np.asarray(w, np.int64) for w in d["out_widths"]),
                         tuple(np.asarray(m, np.float64) for m in d["ms"]),
                         float(d["dense_ms"]), float(d["rest_ms"]),
                         tuple(d.get("lowerings") or ("filters",) * n),
                         tuple(None if u is None else np.asarray(u, np.float32)
                               for u in (d.get("units") or (None,) * n)))  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a latency table (missing or malformed field {e})") from e
    if not len(t.lowerings) == len(t.units) == n:
        raise ValueError("malformed latency table: lowerings / units do not list every layer")
    for a, b, m, u in zip(t.in_widths, t.out_widths, t.ms, t.units, strict=True):
        if m.shape != ((len(a), len(b)) if u is None else (len(u), len(a), len(b))):
            raise ValueError("malformed latency table: an entry's shape does not match its widths")
    return t


def check_table(table: LatencyTable, key: dict) -> None:
    """ValueError unless `table` was measured for `key` (names the fields that differ)."""
    bad = {k: (table.key.get(k), v) for k, v in key.items() if table.key.get(k) != v}
    if bad:
        diff = ", ".join(f"{k}: table {a!r} vs here {b!r}" for k, (a, b) in bad.items())
        raise ValueError(
            f"the latency table was measured for another model or backend ({diff}); measure one "
            "here (leave --config.search.latency_table empty) or pass the table of this setup"
        )


def cached_or_measure(cached: dict | None, graph: LayerGraph, apply_fn: Callable, variables: Any,
                      sample_input: Any, *, batch: int = 1, grid: Sequence[float] = GRID,
                      timer: Timer | None = None, backend: str | None = None,
                      progress: Callable | None = None, lowering: str = "filters",
                      min_width: int = 0, library: str | pat.PatternLibrary = "reference6",
                      unpruned: Callable | None = None) -> tuple[LatencyTable, bool]:  # fmt: skip
    """(table, measured_now): the `to_json` dict `cached` when it was measured for this model,
    backend, batch, grid, lowering, min width and library (`table_key`), else a fresh
    `measure_table` (`unpruned` as there; host; the caller reads and writes the cache file). A malformed cache is
    re-measured too."""
    opts = dict(batch=batch, backend=backend, grid=grid, lowering=lowering, min_width=min_width,
                library=library)  # fmt: skip
    key = table_key(graph, **opts)
    if cached is not None:
        try:
            table = from_json(cached)
        except ValueError:
            table = None
        if table is not None and table.key == key and len(table.ms) == graph.n_layers:
            return table, False
    table = measure_table(graph, apply_fn, variables, sample_input, timer=timer,
                          progress=progress, unpruned=unpruned, **opts)  # fmt: skip
    return table, True


def _interp2(win: np.ndarray, wout: np.ndarray, ms: np.ndarray, c_in, c_out):
    """Bilinear interpolation of ``ms[win, wout]`` at (c_in, c_out) (jittable; clamped). With
    ``ms [U, n_in, n_out]`` and ``c_out [U]``: one interpolation per unit, summed."""

    def frac(w, c):
        f = jnp.interp(c, jnp.asarray(w, jnp.float32), jnp.arange(len(w), dtype=jnp.float32))
        i0 = jnp.clip(jnp.floor(f), 0, len(w) - 2).astype(jnp.int32)
        return i0, f - i0

    i, s = frac(win, c_in)
    j, t = frac(wout, c_out)
    m = jnp.asarray(ms, jnp.float32)
    m = m[None] if m.ndim == 2 else m
    u = jnp.arange(m.shape[0])
    return jnp.sum((1 - s) * (1 - t) * m[u, i, j] + s * (1 - t) * m[u, i + 1, j]
                   + (1 - s) * t * m[u, i, j + 1] + s * t * m[u, i + 1, j + 1])  # fmt: skip


def make_predictor(graph: LayerGraph, table: LatencyTable,
                   library: str | pat.PatternLibrary = "reference6") -> Callable:  # fmt: skip
    """``predict(layer_ids) -> predicted ms`` (float32 scalar; jittable): T_rest plus every
    layer's table at its alive widths (`flops.alive_widths_ids`), or, for a layer on a grouped
    lowering, every unit's table at (alive inputs, the unit's filter count ``U @ counts``);
    ``layer_ids`` as `count_ids`."""
    if len(table.ms) != graph.n_layers:
        raise ValueError(f"latency table has {len(table.ms)} layers, the model {graph.n_layers}")
    lib = pat.get_library(library)
    units = table.units or (None,) * graph.n_layers
    if any(u is not None for u in units) and table.key.get("library") != lib.name:
        raise ValueError(f"the latency table's units were measured for the pattern library "
                         f"{table.key.get('library')!r}, not {lib.name!r}; measure it again")  # fmt: skip

    def predict(layer_ids):
        widths = flops_lib.alive_widths_ids(graph, tuple(layer_ids), lib)
        total = jnp.float32(table.rest_ms)
        for (ci, co), a, b, m, u, ids in zip(widths, table.in_widths, table.out_widths, table.ms,
                                             units, layer_ids, strict=True):  # fmt: skip
            if u is None:
                total = total + _interp2(a, b, m, ci, co)
                continue
            ids = jnp.asarray(ids, jnp.int32).reshape(-1)
            ids = jnp.where((ids >= 0) & (ids < lib.n_patterns), ids, lib.keep_id)
            n = jnp.asarray(u) @ jnp.sum(jax.nn.one_hot(ids, lib.n_patterns), axis=0)
            total = total + _interp2(a, b, m, ci, n)
        return total

    return predict
