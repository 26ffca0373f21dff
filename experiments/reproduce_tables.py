"""Reproduces the paper-table rows: every (config, seed) end to end, then mean ± std tables.

    python experiments/reproduce_tables.py \
        --configs experiments/configs/resnet20_cifar10.py:smoke \
                  experiments/configs/digits_resnet20.py \
        --seeds 0 1 2 --out results/

Each run is `sculpt_jax.pipeline.run(cfg)` with ``cfg.seed = k`` and ``cfg.workdir =
<out>/<name>/seed<k>``, where <name> is the config file's stem joined with its variant tokens
(``resnet20_cifar10_t30_smoke``). Every pipeline stage is resumable, so running the command again
only redoes what is missing. Rows are aggregated per config with `report.aggregate_rows` (mean and
sample std over seeds) and written to ``<out>/tables.md`` (the aggregated table, the per-seed
table, the published claims beside them, clearly labelled, and any failures), ``tables.csv``
(aggregated rows) and ``tables.json`` (aggregated rows, per-seed rows, failures, claims, command).

Options: ``--set KEY=VALUE`` (repeatable) overrides any config field for every run, e.g.
``--set search.iterations=20``; ``--quiet`` hides progress bars; ``--fail-fast`` stops at the first
failing run (by default a failure is recorded and the other runs go on; the exit code is 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback

from sculpt_jax import checkpoint as ckpt
from sculpt_jax import config as config_lib
from sculpt_jax import paths as paths_lib
from sculpt_jax import report

PUBLISHED_CLAIMS = (
    (
        "AutoSculpt abstract (arXiv 2412.18091; metrics WITHDRAWN)",
        "various",
        "pruning rates of up to 90%",
    ),
    (
        "AutoSculpt abstract (arXiv 2412.18091; metrics WITHDRAWN)",
        "various",
        "nearly 18% improvement in FLOPs reduction, outperforming all baselines",
    ),
    (
        "AutoSculpt abstract (arXiv 2412.18091; metrics WITHDRAWN)",
        "various",
        "inference up to 29% faster",
    ),
    ("GNN-RL (ICML 2022)", "ResNet-56, CIFAR-10", "93.49% top-1 at 50% FLOPs reduction"),
    ("GNN-RL (ICML 2022)", "ResNet-110, CIFAR-10", "94.31% top-1 at 50% FLOPs reduction"),
    ("GNN-RL (ICML 2022)", "ResNet-44, CIFAR-10", "93.23% top-1 at 50% FLOPs reduction"),
    ("GNN-RL (ICML 2022)", "MobileNet-V1, ImageNet", "69.5% top-1 at 40% FLOPs reduction"),
    ("AMC (ECCV 2018)", "MobileNet, ImageNet", "70.5% top-1 at 50% FLOPs reduction"),
)

CAUTION = (
    "These are published claims, NOT reproduced here; they are listed for orientation only. "
    "AutoSculpt's authors withdrew their reported metrics (arXiv, June 2025: a flaw in the "
    "training procedure of Section 3 makes them unreliable), so its numbers are not a target. "
    "Peer numbers come from other methods, pipelines and FLOPs conventions; our FLOPs "
    "reductions are exact counts of the masked model."
)


def config_name(spec: str) -> str:
    """``"dir/resnet20_cifar10.py:t30,smoke"`` -> ``"resnet20_cifar10_t30_smoke"``."""
    path, _, variant = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    tokens = [t.strip() for t in variant.split(",") if t.strip()]
    return "_".join([stem, *tokens])


def run_config(spec: str, seed: int, out: str, overrides: dict[str, str], quiet: bool = False):
    """The locked config of one run: `spec` loaded, overrides applied, seed and workdir set."""
    cfg = config_lib.load_config(spec)
    over = dict(overrides)
    over["seed"] = str(seed)
    over["workdir"] = os.path.join(paths_lib.resolve(out), config_name(spec), f"seed{seed}")
    if quiet:
        over["progress"] = "false"
    config_lib.apply_overrides(cfg, over)
    from sculpt_jax import pipeline

    return pipeline.validate_config(cfg).lock()


def run_all(specs, seeds, out, overrides=None, *, quiet=False, fail_fast=False):
    """Runs every (config, seed); returns (aggregated rows, per-seed rows, failures)."""
    from sculpt_jax import pipeline

    runs, failures, aggregated = [], [], []
    for spec in specs:
        name = config_name(spec)
        rows = []
        for seed in seeds:
            print(f"=== {name} seed {seed} ===", flush=True)
            try:
                cfg = run_config(spec, seed, out, overrides or {}, quiet)
                row = dict(pipeline.run(cfg), config=name, seed=seed)
            except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
                if fail_fast:
                    raise
                traceback.print_exc()
                failures.append({"config": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append(row)
            runs.append(row)
        if rows:
            aggregated.append(dict(report.aggregate_rows(rows), config=name))
    return aggregated, runs, failures


def tables_markdown(aggregated, runs, failures, command: str) -> str:
    """The text of tables.md."""
    try:
        import jax

        device = f"{jax.devices()[0].platform} x {jax.device_count()}"
    except Exception:  # noqa: BLE001 - informational only
        device = "unknown"
    md = [
        "# sculpt-jax: reproduced table rows",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: "
        f"{platform.platform()}, {os.cpu_count()} CPUs, JAX devices {device}.",
        "",
        "## Measured here (mean ± sample std over seeds)",
        "",
        report.format_row_table(aggregated) if aggregated else "(no run finished)",
        "",
        "Accuracies are test top-1 (the test split evaluated once per run, after selection on "
        "validation data); delta = pruned - dense in percentage points; `FLOPs red. (true)` is the "
        "exact count of the masked model, `FLOPs red. (ref. formula)` the AutoSculpt reference "
        "code's formula beside it.",
        "",
        "## Per seed",
        "",
        report.format_row_table(runs) if runs else "(no run finished)",
        "",
        "## Published claims (not reproduced; for orientation)",
        "",
        f"**Caution.** {CAUTION}",
        "",
        "| source | model, data | claim |",
        "|---|---|---|",
        *[f"| {s} | {m} | {c} |" for s, m, c in PUBLISHED_CLAIMS],
        "",
    ]
    if failures:
        md += ["## Failed runs", ""]
        md += [f"- {f['config']} seed {f['seed']}: {f['error']}" for f in failures]
        md.append("")
    return "\n".join(md)


def write_tables(out, aggregated, runs, failures, command: str) -> dict:
    """Writes tables.md, tables.csv (aggregated rows) and tables.json; returns their paths."""
    out = paths_lib.resolve(out)  # a local folder or a gs:// URL
    paths = {k: os.path.join(out, f"tables.{k}") for k in ("md", "csv", "json")}
    paths_lib.write_text(paths["md"], tables_markdown(aggregated, runs, failures, command))
    paths_lib.write_text(paths["csv"], report.rows_to_csv(aggregated))
    claims = [{"source": s, "model_data": m, "claim": c} for s, m, c in PUBLISHED_CLAIMS]
    ckpt.save_json(
        paths["json"],
        {
            "command": command,
            "aggregated": aggregated,
            "runs": runs,
            "failures": failures,
            "published_claims": claims,
            "published_claims_caution": CAUTION,
        },
    )
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", required=True, help="FILE.py[:variant] ...")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. search.iterations=20",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0: all runs finished, 1: some failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r} (e.g. search.iterations=20)")
        overrides[key.strip()] = value
    for spec in args.configs:  # fail early on a typo, before hours of compute
        run_config(spec, args.seeds[0], args.out, overrides, args.quiet)
    aggregated, runs, failures = run_all(
        args.configs, args.seeds, args.out, overrides, quiet=args.quiet, fail_fast=args.fail_fast
    )
    command = " ".join(["python experiments/reproduce_tables.py", *argv])
    paths = write_tables(args.out, aggregated, runs, failures, command)
    if aggregated:
        print(report.format_row_table(aggregated))
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
