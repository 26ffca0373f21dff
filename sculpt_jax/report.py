"""Result tables (markdown / CSV / JSON) and plots of a run (layer 5; host-only; writes files).

A *row* is the flat dict `pipeline.run` returns for one (model, dataset, method, seed): accuracies
are fractions in [0, 1], reductions fractions of the dense model, FLOPs/params exact integer counts,
times in seconds. `aggregate_rows` turns rows of several seeds into one row of means with
``<key>_std`` beside each numeric key; `format_row_table` prints either kind as markdown, showing
``mean ± std`` where a std is given.

`write_run_report(report_dir, row, searched, cfg)` writes, into `report_dir`:

* ``results.json``: {"row", "search" (the search summary), "config", "plots", "notes"};
* ``results.csv``: the row's keys as a one-line CSV (lists as JSON text);
* ``report.md``: the table, exact counts, the kept candidates, links to the plots (or why a plot
  is missing), a note on how the numbers were obtained, and the config;
* PNG plots read from the run's workdir (the parent of `report_dir`):
  ``accuracy_vs_flops.png`` (every evaluated candidate of ``search/candidates.jsonl``, the target
  band shaded, in-band candidates highlighted, the Pareto front marked),
  ``pattern_distribution.png`` (``export/pattern_ids.json``: per layer, a stacked bar of how many
  filters got each pattern id) and ``search_curves.png`` (``search/metrics.jsonl``: reward_mean,
  in_band_rate, best_accuracy per iteration) and ``training_curves.png`` (train loss and validation
  accuracy per epoch of the pretrain and of every fine-tuned candidate).

Plots are drawn with `matplotlib.figure.Figure` on the Agg canvas, without `pyplot`, so no global
backend is switched (safe inside notebooks and on headless machines). A missing or unreadable input
skips only its plot; report.md says which and why. `cfg.report.plots = False` skips all plots.

The honest-number rules of DESIGN.md section 1.8 / REFERENCE.md section 6 are stated in report.md:
exact FLOPs (the reference formula beside them, labelled "ref. formula"), selection on validation
data, the test split touched once, pruned weights exactly zero.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sculpt_jax import checkpoint as ckpt
from sculpt_jax import paths as paths_lib
from sculpt_jax.sharding import is_primary as _primary  # only process 0 writes reports

log = logging.getLogger(__name__)

__all__ = [
    "PLOT_FILES",
    "aggregate_rows",
    "format_row_table",
    "pareto_front",
    "rows_to_csv",
    "plot_accuracy_vs_flops",
    "plot_pattern_distribution",
    "plot_search_curves",
    "plot_training_curves",
    "write_run_report",
]

PLOT_FILES = {
    "accuracy_vs_flops": "accuracy_vs_flops.png",
    "pattern_distribution": "pattern_distribution.png",
    "search_curves": "search_curves.png",
    "training_curves": "training_curves.png",
}

# Keys that identify a run rather than measure it: never averaged.
_ID_KEYS = ("seed", "chosen_candidate", "rank")


# ----------------------------------------------------------------------------------------------
# Small helpers.


def _plain(x: Any) -> Any:
    """A 0-d numpy / jax array (or numpy scalar) as the Python scalar; anything else unchanged."""
    if hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (list, tuple, dict)):
        arr = np.asarray(x)
        if arr.ndim == 0:
            return arr.item()
    return x


def _num(x: Any) -> float | None:
    """A finite float from a number / numeric string / 0-d array, else None (bools excluded)."""
    x = _plain(x)
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float, np.integer, np.floating)):
        v = float(x)
    elif isinstance(x, str):
        try:
            v = float(x)
        except ValueError:
            return None
    else:
        return None
    return v if math.isfinite(v) else None


def _is_numeric(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def _floats(values: Any) -> np.ndarray:
    """float64 array of a list that may hold None / "nan" strings (-> NaN)."""
    if values is None:
        return np.zeros((0,), np.float64)
    out = [_num(v) for v in np.asarray(values, dtype=object).reshape(-1)]
    return np.array([np.nan if v is None else v for v in out], np.float64)


def _cfg_dict(cfg: Any) -> dict:
    """A plain dict of a ConfigDict / mapping / None."""
    if cfg is None:
        return {}
    if hasattr(cfg, "to_json_best_effort"):
        return json.loads(cfg.to_json_best_effort())
    if hasattr(cfg, "to_dict"):
        return ckpt.to_jsonable(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return ckpt.to_jsonable(dict(cfg))
    raise TypeError(f"cfg must be a ConfigDict, a mapping or None, got {type(cfg).__name__}")


def _get(d: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# Tables.


def _pm(mean: float | None, std: float | None, scale: float, digits: int, unit: str) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text + unit


def _seconds(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    scale, unit = (1.0, "s") if mean < 120 else (1 / 60, "min") if mean < 7200 else (1 / 3600, "h")
    return _pm(mean, std, scale, 1, " " + unit)


def _delta(row: Mapping) -> tuple[float | None, float | None]:
    if _num(row.get("accuracy_delta")) is not None:
        return _num(row["accuracy_delta"]), _num(row.get("accuracy_delta_std"))
    a, b = _num(row.get("test_accuracy")), _num(row.get("dense_test_accuracy"))
    return (None, None) if a is None or b is None else (a - b, None)


# Latency keys of `pipeline.measure_latency` shown in the table (the rest stay in results.json).
LATENCY_COLUMNS = {
    "latency_ms_dense_b1": "dense ms (b=1)",
    "latency_ms_compact_b1": "compact ms (b=1)",
    "speedup_compact_b1": "compact speedup (b=1)",
    "speedup_compact_b256": "compact speedup (b=256)",
}


def format_row_table(rows: Sequence[Mapping]) -> str:
    """Markdown table of result rows, one line per row (host-only, pure).

    Columns: model, dataset, method, dense acc. (dense test top-1, %), pruned acc. (pruned +
    fine-tuned test top-1, %), delta (percentage points), FLOPs red. (true) (exact count of the
    masked model), FLOPs red. (ref. formula) (the reference code's channel formula,
    `flops.reference_flops_reduction`), MACs red. (conventional) (only when a row has
    ``conventional_macs_reduction``: every kernel tap including zero padding, convs and dense layers,
    as thop / fvcore / Torch-Pruning count), params red., search time; then the `LATENCY_COLUMNS` any
    row has, and ``seeds`` when a row aggregates several (``n_seeds``). Optional columns appear only when a row
    has the key: ``config`` (first) and ``seed`` (after method). A value with a ``<key>_std``
    beside it prints as ``mean ± std``; delta is pruned minus dense test accuracy (or the row's
    ``accuracy_delta``). Missing values print as ``n/a``.

    Args:
      rows: result rows (`pipeline.run`) or aggregated rows (`aggregate_rows`).
    Returns:
      the table as a string ending without a newline.
    """
    rows = [dict(r) for r in rows]
    latency = [k for k in LATENCY_COLUMNS if any(k in r for r in rows)]
    show_seeds = any((_num(r.get("n_seeds")) or 1) > 1 for r in rows)
    show_config = any("config" in r for r in rows)
    show_seed = any(_num(r.get("seed")) is not None for r in rows)
    show_conv = any(_num(r.get("conventional_macs_reduction")) is not None for r in rows)
    header = [
        *(["config"] if show_config else []),
        "model",
        "dataset",
        "method",
        *(["seed"] if show_seed else []),
        "dense acc.",
        "pruned acc.",
        "delta",
        "FLOPs red. (true)",
        "FLOPs red. (ref. formula)",
        *(["MACs red. (conventional)"] if show_conv else []),
        "params red.",
        "search time",
        *(LATENCY_COLUMNS[k] for k in latency),
    ]
    if show_seeds:
        header.append("seeds")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def val(r, k, scale=100.0, digits=2, unit="%"):
        return _pm(_num(r.get(k)), _num(r.get(k + "_std")), scale, digits, unit)

    for r in rows:
        d, d_std = _delta(r)
        seed = _num(r.get("seed"))
        cells = [
            *([_md(r.get("config", "n/a"))] if show_config else []),
            _md(r.get("model", "n/a")),
            _md(r.get("dataset", "n/a")),
            _md(r.get("method", "n/a")),
            *([("n/a" if seed is None else str(int(seed)))] if show_seed else []),
            val(r, "dense_test_accuracy"),
            val(r, "test_accuracy"),
            "n/a"
            if d is None
            else (f"{d * 100:+.2f}" + ("" if d_std is None else f" ± {d_std * 100:.2f}") + " pp"),
            val(r, "flops_reduction", digits=1),
            val(r, "reference_formula_flops_reduction", digits=1),
            *([val(r, "conventional_macs_reduction", digits=1)] if show_conv else []),
            val(r, "params_reduction", digits=1),
            _seconds(_num(r.get("search_seconds")), _num(r.get("search_seconds_std"))),
        ]
        for k in latency:
            m, s = _num(r.get(k)), _num(r.get(k + "_std"))
            cells.append("n/a" if m is None else f"{m:.4g}" + ("" if s is None else f" ± {s:.2g}"))
        if show_seeds:
            cells.append(str(int(_num(r.get("n_seeds")) or 1)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate_rows(rows: Sequence[Mapping]) -> dict:
    """One row of means over seeds, with ``<key>_std`` (sample std, ddof=1) beside numeric keys.

    Rules, per key (in first-seen order):
      * numbers (None / non-finite values ignored): the mean; ``<key>_std`` when >= 2 rows have a
        value; a value identical in every row (e.g. dense_flops) is kept exactly, std 0.0;
      * booleans: True only if True in every row (e.g. pruned_weights_exactly_zero);
      * strings / lists / dicts: kept when equal in every row, else the list of per-row values;
      * ``seed`` becomes ``seeds`` (the list); ``chosen_candidate`` / ``rank`` become lists.
    Also adds ``n_seeds`` and, when rows have both test accuracies, ``accuracy_delta`` (per-row
    pruned minus dense test accuracy, so its std is the std of the differences). A single row
    comes back with ``n_seeds`` = 1 and no ``_std`` keys.

    Raises:
      ValueError: `rows` is empty.
    """
    rows = [{k: _plain(v) for k, v in r.items()} for r in rows]
    if not rows:
        raise ValueError("aggregate_rows needs at least one row; run at least one seed")
    for r in rows:
        if "accuracy_delta" not in r:
            a, b = _num(r.get("test_accuracy")), _num(r.get("dense_test_accuracy"))
            if a is not None and b is not None:
                r["accuracy_delta"] = a - b
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    out: dict[str, Any] = {}
    for k in keys:
        if k.endswith("_std") and k[:-4] in keys:
            continue
        vals = [r.get(k) for r in rows]
        if k in _ID_KEYS:
            out["seeds" if k == "seed" else k] = vals
            continue
        present = [v for v in vals if v is not None]
        if present and all(isinstance(v, (bool, np.bool_)) for v in present):
            out[k] = all(bool(v) for v in present)
        elif present and all(_is_numeric(v) for v in present):
            nums = [float(v) for v in present if math.isfinite(float(v))]
            if not nums:
                out[k] = None
            elif all(v == present[0] for v in present) and len(present) == len(rows):
                out[k] = present[0]
                if len(rows) > 1:
                    out[k + "_std"] = 0.0
            else:
                out[k] = float(np.mean(nums))
                if len(nums) > 1:
                    out[k + "_std"] = float(np.std(nums, ddof=1))
        elif all(
            json.dumps(ckpt.to_jsonable(v), sort_keys=True)
            == json.dumps(ckpt.to_jsonable(vals[0]), sort_keys=True)
            for v in vals
        ):
            out[k] = vals[0]
        else:
            out[k] = vals
    out["n_seeds"] = len(rows)
    return out


def rows_to_csv(rows: Sequence[Mapping]) -> str:
    """CSV text of rows: a header of every key (first-seen order), one line per row; lists and
    dicts as JSON text, None as an empty cell."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        cells = []
        for k in keys:
            v = ckpt.to_jsonable(r.get(k))
            cells.append("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
        w.writerow(cells)
    return buf.getvalue()


def _write_text(path: str, text: str) -> None:
    if not _primary():
        return
    paths_lib.write_text(path, text)


# ----------------------------------------------------------------------------------------------
# Pareto front.


def pareto_front(x_reduction, y_accuracy) -> np.ndarray:
    """Indices of the Pareto-optimal points when both x (reduction) and y (accuracy) are maximised.

    A point is on the front when no other point has x >= and y >= with one of them strictly
    greater; of exact duplicates the first is kept. Points with a non-finite coordinate are ignored.
    Host-only numpy.

    Args:
      x_reduction: float [N]; y_accuracy: float [N].
    Returns:
      int64 [M] indices into the inputs, ordered by increasing x (so accuracy decreases along it).
    Raises:
      ValueError: the inputs have different lengths or are not 1-D.
    """
    x = np.asarray(x_reduction, np.float64)
    y = np.asarray(y_accuracy, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"pareto_front needs two 1-D arrays of equal length, got shapes {x.shape} and "
            f"{y.shape}; flatten the candidate lists first"
        )
    idx = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    # x descending, then y descending, then index ascending (first duplicate wins).
    order = idx[np.lexsort((idx, -y[idx], -x[idx]))]
    keep, best_y = [], -np.inf
    for i in order:
        if y[i] > best_y:
            keep.append(i)
            best_y = y[i]
    return np.array(keep[::-1], np.int64)


# ----------------------------------------------------------------------------------------------
# Plots (Figure + Agg canvas, no pyplot).


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: str) -> str:
    if not _primary():
        return path
    with paths_lib.open_write(path) as f:  # a file object: local, mounted or a URL
        fig.savefig(f, format="png")
    return path


def load_candidates(path: str) -> dict[str, np.ndarray]:
    """Every evaluated candidate of a ``candidates.jsonl``: flat float arrays reduction,
    flops_reduction, accuracy (NaN where not evaluated), in_band (bool) and iteration.

    Raises:
      FileNotFoundError: the file does not exist; ValueError: it holds no candidate.
    """
    if not paths_lib.isfile(path):
        raise FileNotFoundError(f"{path} not found (the search stage writes it)")
    cols: dict[str, list] = {
        k: [] for k in ("reduction", "flops_reduction", "accuracy", "in_band", "iteration")
    }
    for rec in ckpt.read_jsonl(path):
        acc = _floats(rec.get("accuracy"))
        n = acc.size
        red = _floats(rec.get("reduction", rec.get("flops_reduction")))
        fr = _floats(rec.get("flops_reduction", rec.get("reduction")))
        if red.size != n or fr.size != n:
            continue
        ib = rec.get("in_band")
        ib = np.asarray(ib, bool).reshape(-1) if ib is not None else np.zeros(n, bool)
        cols["accuracy"].append(acc)
        cols["reduction"].append(red)
        cols["flops_reduction"].append(fr)
        cols["in_band"].append(ib if ib.size == n else np.zeros(n, bool))
        cols["iteration"].append(np.full(n, float(rec.get("iteration", np.nan))))
    if not cols["accuracy"]:
        raise ValueError(f"{path} holds no candidate")
    return {k: np.concatenate(v) for k, v in cols.items()}


def plot_accuracy_vs_flops(
    path: str,
    candidates: Mapping[str, np.ndarray],
    *,
    target: float | None = None,
    band: float | None = None,
    flops_kind: str = "true",
    kept: Sequence[Mapping] = (),
    final: tuple[float, float] | None = None,
    title: str = "",
) -> str:
    """Scatter of every evaluated candidate's reward-set accuracy against its FLOPs reduction.

    x is the reduction the search used (`flops_kind`: "true" = exact count, "reference" = the
    reference formula). The target band [target - band, target + band] is shaded, in-band
    candidates are highlighted, the Pareto front (over all finite candidates) is drawn as a step
    line, `kept` = [(x, y)] candidates kept for fine-tuning are starred, `final` = (x, val acc.
    after fine-tuning) is marked. Writes a PNG to `path` and returns it.
    """
    x = np.asarray(candidates["reduction"], np.float64)
    y = np.asarray(candidates["accuracy"], np.float64)
    ib = np.asarray(candidates.get("in_band", np.zeros(x.shape, bool)), bool)
    ok = np.isfinite(x) & np.isfinite(y)
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    if target is not None and band is not None:
        ax.axvspan(
            100 * (target - band),
            100 * (target + band),
            color="tab:green",
            alpha=0.12,
            label=f"target band {100 * target:.0f} ± {100 * band:.0f}%",
        )
        ax.axvline(100 * target, color="tab:green", lw=0.8, ls="--")
    out = ok & ~ib
    ax.scatter(
        100 * x[out],
        100 * y[out],
        s=8,
        c="0.6",
        alpha=0.5,
        lw=0,
        label=f"out of band ({int(out.sum())})",
    )
    inn = ok & ib
    ax.scatter(
        100 * x[inn],
        100 * y[inn],
        s=14,
        c="tab:blue",
        alpha=0.8,
        lw=0,
        label=f"in band ({int(inn.sum())})",
    )
    front = pareto_front(np.where(ok, x, np.nan), np.where(ok, y, np.nan))
    if front.size:
        ax.step(
            100 * x[front],
            100 * y[front],
            where="pre",
            color="tab:red",
            lw=1.2,
            marker="o",
            ms=3,
            label=f"Pareto front ({front.size})",
        )
    kept = [(a, b) for a, b in kept if _num(a) is not None and _num(b) is not None]
    if kept:
        kx, ky = np.array(kept, np.float64).T
        ax.scatter(
            100 * kx,
            100 * ky,
            marker="*",
            s=120,
            c="gold",
            edgecolors="k",
            lw=0.6,
            zorder=5,
            label="kept for fine-tuning",
        )
    if final is not None and all(_num(v) is not None for v in final):
        ax.scatter(
            [100 * final[0]],
            [100 * final[1]],
            marker="D",
            s=50,
            c="tab:purple",
            edgecolors="k",
            lw=0.6,
            zorder=6,
            label="chosen, after fine-tune (val)",
        )
    kind = "true, exact count" if flops_kind == "true" else "ref. formula"
    ax.set_xlabel(f"FLOPs reduction (%, {kind})")
    ax.set_ylabel("validation accuracy (%), reward set, before fine-tuning")
    skipped = int((~ok).sum())
    ax.set_title(title + (f"  [{skipped} not evaluated]" if skipped else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_pattern_distribution(
    path: str, pattern_ids: Mapping[str, Any], *, library: str | None = None, title: str = ""
) -> str:
    """Stacked bars, one per layer (graph order), of how many filters got each pattern id.

    Args:
      pattern_ids: {layer name: list of per-filter ids (or one id for layer-level libraries)}, as
        in ``export/pattern_ids.json``.
      library: pattern library name for the legend's pruned fractions (optional).
    Raises:
      ValueError: no layer or no id.
    """
    names = list(pattern_ids)
    ids = [np.asarray(pattern_ids[n], np.int64).reshape(-1) for n in names]
    if not names or not any(i.size for i in ids):
        raise ValueError("pattern_ids holds no layer with pattern ids")
    n_pat = int(max(int(i.max()) for i in ids if i.size) + 1)
    fractions = None
    if library:
        try:
            from sculpt_jax import patterns as pat

            lib = pat.get_library(library)
            n_pat = max(n_pat, lib.n_patterns)
            fractions = np.asarray(lib.pruned_fraction, np.float64)
        except (ValueError, AttributeError):
            fractions = None
    counts = np.stack([np.bincount(i, minlength=n_pat) for i in ids])  # [L, P]
    fig = _figure(min(30.0, max(6.0, 0.28 * len(names) + 2.5)), 4.8)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n_pat <= 10 else "viridis"]
    pos = np.arange(len(names))
    bottom = np.zeros(len(names))
    for p in range(n_pat):
        label = f"id {p}"
        if fractions is not None and p < fractions.size:
            label += f" ({100 * fractions[p]:.0f}% pruned)"
        ax.bar(
            pos,
            counts[:, p],
            bottom=bottom,
            width=0.8,
            color=cmap(p % cmap.N if n_pat <= 10 else p / max(1, n_pat - 1)),
            label=label,
        )
        bottom += counts[:, p]
    step = max(1, len(names) // 60)
    ax.set_xticks(
        pos[::step], [names[i] for i in range(0, len(names), step)], rotation=90, fontsize=6
    )
    ax.set_ylabel("filters (count)")
    ax.set_title(title or "pattern ids per layer (chosen model)", fontsize=9)
    ax.legend(fontsize=7, ncols=min(n_pat, 3), loc="upper left")
    return _save(fig, path)


def plot_search_curves(path: str, history: Sequence[Mapping], title: str = "") -> str:
    """Three panels over search iterations: reward_mean, in_band_rate, best_accuracy (per-seed
    lines too when ``best_accuracy_per_seed`` is present).

    Raises:
      ValueError: no record has any of the three keys.
    """
    keys = ("reward_mean", "in_band_rate", "best_accuracy")
    history = [h for h in history if any(k in h for k in keys)]
    if not history:
        raise ValueError("no search metrics (reward_mean / in_band_rate / best_accuracy) recorded")
    it = np.array([_num(h.get("iteration")) or (i + 1) for i, h in enumerate(history)], np.float64)
    fig = _figure(7.0, 6.0)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, k in zip(axes, keys, strict=True):
        ax.plot(it, _floats([h.get(k) for h in history]), marker=".", lw=1.2, label=k)
        if k == "best_accuracy" and any("best_accuracy_per_seed" in h for h in history):
            per = [h.get("best_accuracy_per_seed") or [] for h in history]
            n = max(len(p) for p in per)
            for s in range(n):
                ax.plot(
                    it,
                    _floats([p[s] if s < len(p) else None for p in per]),
                    lw=0.7,
                    alpha=0.6,
                    label=f"seed {s}",
                )
            ax.legend(fontsize=7)
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("search iteration")
    axes[0].set_title(title or "search curves", fontsize=9)
    return _save(fig, path)


def plot_training_curves(path: str, runs: Mapping[str, Sequence[Mapping]], title: str = "") -> str:
    """Two panels over epochs, one line per training run (pretrain, each fine-tuned candidate):
    train loss and validation accuracy (`training.fit`'s metrics.jsonl records).

    Raises:
      ValueError: no run has an epoch record.
    """
    runs = {k: [r for r in v if "train_loss" in r] for k, v in runs.items()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise ValueError("no epoch records (train_loss / val_accuracy) in any metrics.jsonl")
    fig = _figure(7.0, 5.0)
    axes = fig.subplots(2, 1, sharex=True)
    for name, recs in runs.items():
        ep = np.array([_num(r.get("epoch")) or (i + 1) for i, r in enumerate(recs)], np.float64)
        axes[0].plot(ep, _floats([r.get("train_loss") for r in recs]), marker=".", lw=1.2,
                     label=name)  # fmt: skip
        axes[1].plot(ep, _floats([r.get("val_accuracy") for r in recs]), marker=".", lw=1.2,
                     label=name)  # fmt: skip
    for ax, k in zip(axes, ("train loss", "validation accuracy"), strict=True):
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("epoch")
    axes[0].set_title(title or "training curves", fontsize=9)
    return _save(fig, path)


def _training_runs(workdir: str) -> dict[str, list[dict]]:
    """{"pretrain": records, "finetune cand0": ...} of the metrics.jsonl files present."""
    runs = {"pretrain": ckpt.read_jsonl(os.path.join(workdir, "pretrain", "metrics.jsonl"))}
    ft_dir = os.path.join(workdir, "finetune")
    for d in paths_lib.listdir(ft_dir):
        runs[f"finetune {d}"] = ckpt.read_jsonl(os.path.join(ft_dir, d, "metrics.jsonl"))
    return runs


# ----------------------------------------------------------------------------------------------
# The run report.


def _search_summary(searched: Mapping | None, workdir: str) -> dict:
    if searched and isinstance(searched.get("summary"), Mapping):
        return dict(searched["summary"])
    p = os.path.join(workdir, "search", "best.json")
    try:
        return dict(ckpt.load_json(p))
    except (FileNotFoundError, ValueError):
        return {}


def _history(searched: Mapping | None, workdir: str) -> list[dict]:
    p = os.path.join(workdir, "search", "metrics.jsonl")
    hist = ckpt.read_jsonl(p)  # [] when absent
    if not hist and searched and searched.get("history"):
        hist = [dict(h) for h in searched["history"]]
    return hist


def _make_plots(
    report_dir: str,
    workdir: str,
    row: Mapping,
    summary: Mapping,
    cfg_d: Mapping,
    history: list[dict],
) -> tuple[dict[str, str], dict[str, str]]:
    """(written {name: file name}, skipped {name: reason})."""
    written, skipped = {}, {}
    kind = summary.get("flops_kind", _get(cfg_d, "search.flops_kind", "true"))
    target = _num(summary.get("target_flops_reduction", _get(cfg_d, "search.target_flops")))
    band = _num(summary.get("band") or summary.get("tolerance") or _get(cfg_d, "search.band"))
    label = f"{row.get('model', '?')} on {row.get('dataset', '?')} ({row.get('method', '?')})"

    def attempt(name, fn):
        try:
            fn(os.path.join(report_dir, PLOT_FILES[name]))
            written[name] = PLOT_FILES[name]
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            skipped[name] = str(e)
        except Exception as e:  # noqa: BLE001 - a plot must never lose a finished run
            log.warning("plot %s failed: %s", name, e)
            skipped[name] = f"plotting failed: {type(e).__name__}: {e}"

    def acc_flops(path):
        cands = load_candidates(os.path.join(workdir, "search", "candidates.jsonl"))
        xk = "flops_reduction" if kind == "true" else "reference_formula_reduction"
        kept = [(c.get(xk), c.get("search_val_accuracy")) for c in summary.get("candidates", [])]
        fx = row.get("flops_reduction" if kind == "true" else "reference_formula_flops_reduction")
        n_in = int(np.sum(cands["in_band"]))
        plot_accuracy_vs_flops(
            path,
            cands,
            target=target,
            band=band,
            flops_kind=kind,
            kept=kept,
            final=(fx, row.get("val_accuracy")),
            title=f"{label}: {cands['accuracy'].size} candidates, {n_in} in band",
        )

    def patterns(path):
        p = os.path.join(workdir, "export", "pattern_ids.json")
        if not paths_lib.isfile(p):
            raise FileNotFoundError(f"{p} not found (the fine-tune stage exports it)")
        plot_pattern_distribution(
            path,
            ckpt.load_json(p),
            library=_get(cfg_d, "search.library"),
            title=f"{label}: pattern ids per layer",
        )

    def curves(path):
        if not history:
            raise FileNotFoundError(f"{os.path.join(workdir, 'search', 'metrics.jsonl')} not found")
        plot_search_curves(path, history, title=f"{label}: search")

    attempt("accuracy_vs_flops", acc_flops)
    attempt("pattern_distribution", patterns)
    def training(path):
        plot_training_curves(path, _training_runs(workdir), title=f"{label}: training")

    attempt("search_curves", curves)
    attempt("training_curves", training)
    return written, skipped


_PLOT_TITLES = {
    "accuracy_vs_flops": "Accuracy vs FLOPs reduction of every evaluated candidate",
    "pattern_distribution": "Pattern ids per layer of the chosen model",
    "search_curves": "Search curves",
    "training_curves": "Pretrain and fine-tune curves (train loss, validation accuracy per epoch)",
}


def _reward_set_text(summary: Mapping, cfg_d: Mapping) -> str:
    """How many validation images scored each candidate (and how many re-scored the top-K)."""
    n, held = summary.get("reward_set_size"), summary.get("heldout_size")
    if n is None:  # a best.json written before the sizes were recorded
        n = _get(cfg_d, "search.reward_set_size", -1)
        return f"{n} validation examples" if n and n > 0 else "the validation examples not held out"
    text = f"{n} validation examples"
    return text + (f"; the top candidates re-scored on {held} others" if held else "")


def _conventional_text(row: Mapping) -> str:
    """The literature's MACs of the row (thop / fvcore convention), when recorded."""
    dense, masked = _num(row.get("dense_conventional_macs")), _num(row.get("masked_conventional_macs"))
    if dense is None or masked is None:
        return ""
    red = _num(row.get("conventional_macs_reduction"))
    return (f" For comparison with papers and thop / fvcore / Torch-Pruning, which count every "
            f"kernel tap including those on zero padding (convs and dense layers only): "
            f"{dense / 1e6:.2f}M MACs dense, {masked / 1e6:.2f}M pruned"
            + (f" ({red * 100:.1f}% fewer)." if red is not None else "."))  # fmt: skip


def _honest_note(row: Mapping, summary: Mapping, cfg_d: Mapping) -> list[str]:
    zero = row.get("pruned_weights_exactly_zero")
    kind = summary.get("flops_kind", _get(cfg_d, "search.flops_kind", "true"))
    return [
        "## How these numbers were obtained",
        "",
        "- **FLOPs and parameters are exact counts** of the masked model (every multiply-add "
        "with a zeroed weight removed), from the traced layer graph: `FLOPs red. (true)`. The "
        "AutoSculpt reference code's channel-pruning formula is shown beside it as "
        "`FLOPs red. (ref. formula)`; it over-states pattern sparsity, treating a layer's "
        "pruned kernel fraction as removed channels of that layer and of the next one (e.g. "
        "0.555 for ResNet-56 with every 3x3 filter at a 1/3 pattern, where the true 3x3 MAC "
        "reduction is 1/3). "
        f"The search's budget (tolerance or band) used the `{kind}` measure."
        + _conventional_text(row),
        "- **Selection used validation data only**: the search reward (a reward set carved from "
        "the training data), the choice among the kept candidates and the best fine-tune epoch. "
        "The **test split was evaluated once** on the final pruned model (and once on the dense "
        "model for the `dense acc.` column).",
        "- **Pruned weights are exactly zero**: the masks are re-applied after every optimizer "
        "update and the exported weights were checked: "
        f"`pruned_weights_exactly_zero = {zero if zero is not None else 'not recorded'}`.",
        "- Search accuracies are measured *before* fine-tuning, on the reward set "
        f"({_reward_set_text(summary, cfg_d)}), with "
        f"{_get(cfg_d, 'search.bn_recalib_batches', '?')} batches of BatchNorm recalibration.",
        "- Published AutoSculpt numbers were withdrawn by its authors (arXiv, June 2025); compare "
        "against re-measurements, not the paper's tables.",
    ]


def write_run_report(
    report_dir: str, row: Mapping, searched: Mapping | None = None, cfg: Any = None
) -> dict:
    """Writes results.json, results.csv, report.md and the PNG plots of one run (host-only).

    Args:
      report_dir: output folder (created); the run's workdir is its parent.
      row: the result row (`pipeline.run`).
      searched: the dict `pipeline.prune` returns (uses "summary" and "history"); None: read
        ``<workdir>/search/best.json`` and ``metrics.jsonl``.
      cfg: the run's ConfigDict (or a mapping); ``cfg.report.plots = False`` skips the plots.
    Returns:
      {"report", "results_json", "results_csv", "plots": {name: path}, "skipped": {name: why}}.
      On a process other than 0 of a multi-process job nothing is written and every path is None.
    """
    report_dir = paths_lib.resolve(report_dir)  # absolute, or a URL kept as it is
    if not _primary():
        return {"report": None, "results_json": None, "results_csv": None, "plots": {},
                "skipped": {}}  # fmt: skip
    workdir = os.path.dirname(report_dir)
    paths_lib.makedirs(report_dir)
    row = dict(row)
    cfg_d = _cfg_dict(cfg)
    summary = _search_summary(searched, workdir)
    history = _history(searched, workdir)
    if _get(cfg_d, "report.plots", True):
        written, skipped = _make_plots(report_dir, workdir, row, summary, cfg_d, history)
    else:
        written, skipped = {}, {n: "plots disabled (cfg.report.plots = False)" for n in PLOT_FILES}

    results = {
        "row": row,
        "search": summary,
        "config": cfg_d,
        "plots": written,
        "notes": {"skipped_plots": skipped},
    }
    paths = {
        "report": os.path.join(report_dir, "report.md"),
        "results_json": os.path.join(report_dir, "results.json"),
        "results_csv": os.path.join(report_dir, "results.csv"),
    }
    ckpt.save_json(paths["results_json"], results)
    _write_text(paths["results_csv"], rows_to_csv([row]))

    md = [
        f"# sculpt-jax: {row.get('model', '?')} on {row.get('dataset', '?')} "
        f"({row.get('method', '?')})",
        "",
    ]
    if row.get("device_count") is not None:
        md += [f"Devices: {row['device_count']} x {row.get('device_kind', '?')} (one 1-D data "
               f"mesh; top-K fine-tuning: {row.get('topk_mode', '?')})", ""]  # fmt: skip
    md += [format_row_table([row]), ""]
    md += ["## Exact counts", "", "| quantity | dense | pruned |", "|---|---|---|"]
    for q in ("flops", "params"):
        d, m = row.get(f"dense_{q}"), row.get(f"masked_{q}")
        md.append(f"| {q} | {d if d is not None else 'n/a'} | {m if m is not None else 'n/a'} |")
    md.append("")
    acc_lines = [
        ("validation accuracy, dense", "dense_val_accuracy"),
        ("validation accuracy, pruned after fine-tune", "val_accuracy"),
        (
            "validation accuracy (reward set), chosen candidate before fine-tune",
            "search_val_accuracy_before_finetune",
        ),
        (
            "validation accuracy (held-out part), chosen candidate before fine-tune",
            "heldout_accuracy_before_finetune",
        ),
        ("search time (this command)", "search_seconds"),
        ("pretraining epochs, all sessions", "pretrain_epoch_seconds"),
        ("fine-tuning epochs, all sessions", "finetune_epoch_seconds"),
        ("wall time of this command (a resumed run counts only its own part)", "total_seconds"),
    ]
    for text, k in acc_lines:
        v = _num(row.get(k))
        if v is not None:
            md.append(
                f"- {text}: " + (_seconds(v, None) if k.endswith("seconds") else f"{100 * v:.2f}%")
            )
    md.append("")
    if summary:
        md += [
            "## Search",
            "",
            f"- method `{summary.get('method', '?')}`, target reduction "
            f"{summary.get('target_reduction', summary.get('target_flops_reduction', '?'))} ± "
            f"{summary.get('tolerance') or summary.get('band', '?')} "
            f"({summary.get('target_measure', summary.get('flops_kind', '?'))} measure)",
            f"- candidates evaluated: {summary.get('n_evals', '?')}, on budget and fully scored: "
            f"{summary.get('n_in_band', '?')}"
            + ("" if summary.get("on_budget_rate") is None
               else f", on-budget rate {100 * summary['on_budget_rate']:.1f}%"),
            "",
        ]
        cands = summary.get("candidates") or []
        if cands:
            md += [
                "| rank | search val acc. | held-out val acc. | FLOPs red. (true) | "
                "FLOPs red. (ref. formula) | params red. | seed |",
                "|---|---|---|---|---|---|---|",
            ]
            for i, c in enumerate(cands):
                f = lambda k, c=c: "n/a" if _num(c.get(k)) is None else f"{100 * _num(c[k]):.2f}%"
                md.append(
                    f"| {c.get('rank', i)} | {f('search_val_accuracy')} | "
                    f"{f('heldout_accuracy')} | {f('flops_reduction')} | {f('reference_formula_reduction')} | "
                    f"{f('params_reduction')} | {c.get('seed', '?')} |"
                )
            md.append("")
    md += ["## Plots", ""]
    for name, fname in PLOT_FILES.items():
        if name in written:
            md += [f"### {_PLOT_TITLES[name]}", "", f"![{name}]({fname})", ""]
        else:
            md.append(f"- {_PLOT_TITLES[name]}: skipped ({skipped.get(name, 'unknown reason')})")
    md += [""] + _honest_note(row, summary, cfg_d)
    md += ["", "## Config", "", "```json", json.dumps(cfg_d, indent=2, sort_keys=True), "```", ""]
    md += ["Machine-readable: [results.json](results.json), [results.csv](results.csv).", ""]
    _write_text(paths["report"], "\n".join(md))
    return dict(
        paths, plots={k: os.path.join(report_dir, v) for k, v in written.items()}, skipped=skipped
    )
