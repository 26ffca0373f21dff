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
dense latency.

The model assumes the "filters" lowering of `compaction.compact` with ``align=1`` (the decoder
needs a prediction that moves with every filter; an aligned compact model runs its outputs rounded
up to the alignment, so its measured latency can sit above the prediction: the pipeline reports
both). Depthwise convs run one channel per group, so their table is indexed by the smaller width.

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
LOWERINGS = ("filters",)  # lowerings a table can model (`compaction.compact`)
VERSION = 1  # bump when what a table measures changes (old caches are then re-measured)

# A timer: ``timer(build, info) -> milliseconds`` of ``fn(*args)`` where ``(fn, args) = build()``
# (built lazily, so a fake timer in a test allocates nothing); info names what is timed:
# {"layer": name or None (the whole dense model), "c_in": int, "c_out": int}.
Timer = Callable[[Callable, tuple, dict], float]


class LatencyTable(NamedTuple):
    """A model's measured latency model on one backend (see the module docstring).

    key: `table_key` (what it was measured for). in_widths / out_widths: per layer, int
    ``[n_in]`` / ``[n_out]`` strictly increasing, starting at 0. ms: per layer float ``[n_in,
    n_out]`` milliseconds, non-decreasing along both axes. dense_ms: the whole dense model.
    rest_ms: dense_ms minus the dense per-layer entries (the constant T_rest).
    """

    key: dict
    in_widths: tuple[np.ndarray, ...]
    out_widths: tuple[np.ndarray, ...]
    ms: tuple[np.ndarray, ...]
    dense_ms: float
    rest_ms: float


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
              backend: str | None = None, grid: Sequence[float] = GRID) -> dict:  # fmt: skip
    """What a table depends on (JSON-able; host). `backend` defaults to `backend_name()`."""
    if lowering not in LOWERINGS:
        raise ValueError(f"latency tables model the lowerings {LOWERINGS}, not {lowering!r}")
    return {"version": VERSION, "graph": graph_signature(graph),
            "backend": backend or backend_name(), "jax": jax.__version__, "batch": int(batch),
            "lowering": lowering, "grid": [float(f) for f in grid]}  # fmt: skip


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
) -> LatencyTable:
    """Times every prunable layer of `graph` on its width grid and the dense model (host-only).

    Args:
      graph: the model's `LayerGraph`; apply_fn: ``apply_fn(variables, x, train=False)``;
        sample_input ``[B, ...]`` gives the model's example shape (its values are unused).
      batch: the batch size the table models. grid: width fractions per axis (`GRID`).
      timer: a `Timer` (default `time_fn`); tests pass a deterministic one.
      backend: the backend string stored in the key (default `backend_name()`).
      progress: optional ``progress(done, total)`` callback.
    Returns: a `LatencyTable` keyed by `table_key`.
    """
    timer = timer or time_fn
    key = table_key(graph, batch=batch, backend=backend, grid=grid)
    memo: dict = {}
    plans = []
    for layer in graph.layers:
        mult = 1 if _is_depthwise(layer) else layer.groups
        plans.append((grid_widths(layer.in_features, grid, mult),
                      grid_widths(layer.out_features, grid, mult)))  # fmt: skip
    total, done = sum((len(a) - 1) * (len(b) - 1) for a, b in plans) + 1, 0
    tables = []
    for layer, (win, wout) in zip(graph.layers, plans, strict=True):
        ms = np.zeros((len(win), len(wout)))
        for i, ci in enumerate(win):
            for j, co in enumerate(wout):
                if ci == 0 or co == 0:
                    continue
                if _is_depthwise(layer):
                    ci = co = min(ci, co)
                sig = (_op_signature(layer), int(ci), int(co))
                if sig not in memo:
                    build = lambda ly=layer, a=int(ci), b=int(co): layer_op(ly, a, b, batch)  # noqa: E731
                    memo[sig] = float(timer(build, {"layer": layer.name, "c_in": int(ci),
                                                    "c_out": int(co)}))  # fmt: skip
                ms[i, j] = memo[sig]
                done += 1
                if progress is not None:
                    progress(done, total)
        ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
        tables.append(ms)

    def build_dense():
        x = jnp.zeros((batch, *np.shape(sample_input)[1:]), jnp.asarray(sample_input).dtype)
        return jax.jit(lambda v, x: apply_fn(v, x, train=False)), (variables, x)

    dense_ms = float(timer(build_dense, {"layer": None, "c_in": 0, "c_out": 0}))
    if progress is not None:
        progress(total, total)
    rest = dense_ms - float(sum(t[-1, -1] for t in tables))
    return LatencyTable(key, tuple(p[0] for p in plans), tuple(p[1] for p in plans),
                        tuple(tables), dense_ms, rest)  # fmt: skip


def to_json(table: LatencyTable) -> dict:
    """A JSON-able dict of `table` (`from_json` reads it back)."""
    return {"key": table.key, "dense_ms": table.dense_ms, "rest_ms": table.rest_ms,
            "in_widths": [w.tolist() for w in table.in_widths],
            "out_widths": [w.tolist() for w in table.out_widths],
            "ms": [m.tolist() for m in table.ms]}  # fmt: skip


def from_json(d: dict) -> LatencyTable:
    """The `LatencyTable` of a `to_json` dict (ValueError naming the problem on a malformed one)."""
    try:
        t = LatencyTable(dict(d["key"]), tuple(np.asarray(w, np.int64) for w in d["in_widths"]),
                         tuple(np.asarray(w, np.int64) for w in d["out_widths"]),
                         tuple(np.asarray(m, np.float64) for m in d["ms"]),
                         float(d["dense_ms"]), float(d["rest_ms"]))  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a latency table (missing or malformed field {e})") from e
    for a, b, m in zip(t.in_widths, t.out_widths, t.ms, strict=True):
        if m.shape != (len(a), len(b)):
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
                      progress: Callable | None = None) -> tuple[LatencyTable, bool]:  # fmt: skip
    """(table, measured_now): the `to_json` dict `cached` when it was measured for this model,
    backend, batch and grid (`table_key`), else a fresh `measure_table` (host; the caller reads
    and writes the cache file). A malformed cache is re-measured too."""
    key = table_key(graph, batch=batch, backend=backend, grid=grid)
    if cached is not None:
        try:
            table = from_json(cached)
        except ValueError:
            table = None
        if table is not None and table.key == key and len(table.ms) == graph.n_layers:
            return table, False
    table = measure_table(graph, apply_fn, variables, sample_input, batch=batch, grid=grid,
                          timer=timer, backend=backend, progress=progress)  # fmt: skip
    return table, True


def _interp2(win: np.ndarray, wout: np.ndarray, ms: np.ndarray, c_in, c_out):
    """Bilinear interpolation of ``ms[win, wout]`` at (c_in, c_out) (jittable; clamped)."""

    def frac(w, c):
        f = jnp.interp(c, jnp.asarray(w, jnp.float32), jnp.arange(len(w), dtype=jnp.float32))
        i0 = jnp.clip(jnp.floor(f), 0, len(w) - 2).astype(jnp.int32)
        return i0, f - i0

    i, s = frac(win, c_in)
    j, t = frac(wout, c_out)
    m = jnp.asarray(ms, jnp.float32)
    return ((1 - s) * (1 - t) * m[i, j] + s * (1 - t) * m[i + 1, j]
            + (1 - s) * t * m[i, j + 1] + s * t * m[i + 1, j + 1])  # fmt: skip


def make_predictor(graph: LayerGraph, table: LatencyTable,
                   library: str | pat.PatternLibrary = "reference6") -> Callable:  # fmt: skip
    """``predict(layer_ids) -> predicted ms`` (float32 scalar; jittable): T_rest plus every
    layer's table at its alive widths (`flops.alive_widths_ids`); ``layer_ids`` as `count_ids`."""
    if len(table.ms) != graph.n_layers:
        raise ValueError(f"latency table has {len(table.ms)} layers, the model {graph.n_layers}")
    lib = pat.get_library(library)

    def predict(layer_ids):
        widths = flops_lib.alive_widths_ids(graph, tuple(layer_ids), lib)
        total = jnp.float32(table.rest_ms)
        for (ci, co), a, b, m in zip(widths, table.in_widths, table.out_widths, table.ms,
                                     strict=True):  # fmt: skip
            total = total + _interp2(a, b, m, ci, co)
        return total

    return predict
