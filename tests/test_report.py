"""Tests for sculpt_jax.report (tables, Pareto front, aggregation, run report) and the table
reproduction driver experiments/reproduce_tables.py (with pipeline.run faked: no training)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from sculpt_jax import checkpoint as ckpt
from sculpt_jax import config as config_lib
from sculpt_jax import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROW = {
    "model": "resnet56",
    "dataset": "cifar10",
    "method": "ppo",
    "dense_val_accuracy": 0.9400,
    "dense_test_accuracy": 0.9350,
    "val_accuracy": 0.9330,
    "test_accuracy": 0.9312,
    "search_val_accuracy_before_finetune": 0.4100,
    "flops_reduction": 0.5012,
    "reference_formula_flops_reduction": 0.7321,
    "params_reduction": 0.4567,
    "dense_flops": 250_000_000,
    "masked_flops": 124_700_000,
    "dense_params": 850_000,
    "masked_params": 461_800,
    "search_seconds": 5400.0,
    "total_seconds": 20000.0,
    "pruned_weights_exactly_zero": True,
}

HEADER = (
    "| model | dataset | method | dense acc. | pruned acc. | delta | FLOPs red. (true) | "
    "FLOPs red. (ref. formula) | params red. | search time |"
)


# ------------------------------------------------------------------------------------------------
# format_row_table
# ------------------------------------------------------------------------------------------------


def test_format_row_table_golden():
    expected = "\n".join([
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|",
        "| resnet56 | cifar10 | ppo | 93.50% | 93.12% | -0.38 pp | 50.1% | 73.2% | 45.7% | "
        "90.0 min |",
    ])  # fmt: skip
    assert report.format_row_table([ROW]) == expected


def test_format_row_table_mean_std_missing_and_optional_columns():
    agg = dict(
        ROW,
        config="resnet56_cifar10",
        test_accuracy_std=0.001,
        dense_test_accuracy_std=0.002,
        accuracy_delta=-0.0038,
        accuracy_delta_std=0.0015,
        flops_reduction_std=0.004,
        search_seconds=30.0,
        search_seconds_std=1.5,
        n_seeds=3,
        latency_ms_compact_b1=1.234,
        latency_ms_compact_b1_std=0.05,
        latency_ms_masked_b1=2.0,  # not a table column: stays in results.json
    )
    missing = {"model": "vgg|19", "dataset": "cifar100", "method": "random"}
    lines = report.format_row_table([agg, missing]).split("\n")
    assert lines[0] == (
        "| config | model | dataset | method | dense acc. | pruned acc. | delta | "
        "FLOPs red. (true) | FLOPs red. (ref. formula) | params red. | search time | "
        "compact ms (b=1) | seeds |"
    )
    assert lines[2] == (
        "| resnet56_cifar10 | resnet56 | cifar10 | ppo | 93.50 ± 0.20% | 93.12 ± 0.10% | "
        "-0.38 ± 0.15 pp | 50.1 ± 0.4% | 73.2% | 45.7% | 30.0 ± 1.5 s | 1.234 ± 0.05 | 3 |"
    )
    # Missing values print n/a; a "|" inside a cell is escaped.
    assert lines[3] == (
        "| n/a | vgg\\|19 | cifar100 | random | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 1 |"
    )


def test_format_row_table_conventional_macs_column_only_when_recorded():
    lines = report.format_row_table([dict(ROW, conventional_macs_reduction=0.4876), ROW]).split("\n")
    assert "| FLOPs red. (ref. formula) | MACs red. (conventional) | params red. |" in lines[0]
    assert "| 50.1% | 73.2% | 48.8% | 45.7% |" in lines[2]
    assert "| 50.1% | 73.2% | n/a | 45.7% |" in lines[3]
    assert "conventional" not in report.format_row_table([ROW])


def test_format_row_table_seed_column_and_hours():
    line = report.format_row_table([dict(ROW, seed=2, search_seconds=9000.0)]).split("\n")
    assert "| method | seed | dense acc." in line[0]
    assert line[2].startswith("| resnet56 | cifar10 | ppo | 2 | 93.50% |")
    assert line[2].endswith("| 2.5 h |")


# ------------------------------------------------------------------------------------------------
# pareto_front
# ------------------------------------------------------------------------------------------------


def test_pareto_front_hand_made_set():
    x = [0.1, 0.2, 0.3, 0.2, 0.4, 0.3, np.nan, 0.05]
    y = [0.9, 0.8, 0.85, 0.8, 0.5, 0.7, 1.0, 0.9]
    # (0.2, 0.8) and (0.3, 0.7) are dominated by (0.3, 0.85); (0.05, 0.9) by (0.1, 0.9); the NaN
    # point is ignored.
    front = report.pareto_front(x, y)
    assert front.dtype == np.int64
    np.testing.assert_array_equal(front, [0, 2, 4])


def test_pareto_front_duplicates_empty_and_errors():
    np.testing.assert_array_equal(report.pareto_front([0.5, 0.5, 0.1], [0.7, 0.7, 0.8]), [2, 0])
    assert report.pareto_front([], []).size == 0
    assert report.pareto_front([np.nan], [0.3]).size == 0
    with pytest.raises(ValueError, match="equal length"):
        report.pareto_front([0.1, 0.2], [0.3])


# ------------------------------------------------------------------------------------------------
# aggregate_rows
# ------------------------------------------------------------------------------------------------


def test_aggregate_rows_golden_values():
    rows = [
        dict(ROW, seed=0, test_accuracy=0.90, dense_test_accuracy=0.95, search_seconds=10.0,
             candidates_val_accuracy=[0.1, 0.2]),
        dict(ROW, seed=1, test_accuracy=0.92, dense_test_accuracy=0.95, search_seconds=None,
             candidates_val_accuracy=[0.3]),
        dict(ROW, seed=2, test_accuracy=0.94, dense_test_accuracy=0.95, search_seconds=20.0,
             candidates_val_accuracy=[0.1, 0.2], pruned_weights_exactly_zero=False),
    ]  # fmt: skip
    agg = report.aggregate_rows(rows)
    assert agg["n_seeds"] == 3
    assert agg["seeds"] == [0, 1, 2]
    assert agg["test_accuracy"] == pytest.approx(0.92)
    assert agg["test_accuracy_std"] == pytest.approx(0.02)  # sample std (ddof=1)
    assert agg["accuracy_delta"] == pytest.approx(-0.03)  # per-row differences
    assert agg["accuracy_delta_std"] == pytest.approx(0.02)
    assert agg["search_seconds"] == pytest.approx(15.0)  # the None is ignored
    assert agg["search_seconds_std"] == pytest.approx(math.sqrt(50.0))
    # Identical values are kept exactly (ints stay ints) with std 0.
    assert agg["dense_flops"] == 250_000_000 and isinstance(agg["dense_flops"], int)
    assert agg["dense_flops_std"] == 0.0
    assert agg["model"] == "resnet56"
    assert agg["pruned_weights_exactly_zero"] is False
    assert agg["candidates_val_accuracy"] == [[0.1, 0.2], [0.3], [0.1, 0.2]]
    assert "seed" not in agg


def test_aggregate_rows_single_row_and_empty():
    agg = report.aggregate_rows([ROW])
    assert agg["n_seeds"] == 1
    assert not any(k.endswith("_std") for k in agg)
    assert agg["test_accuracy"] == ROW["test_accuracy"]
    assert agg["accuracy_delta"] == pytest.approx(0.9312 - 0.9350)
    with pytest.raises(ValueError, match="at least one row"):
        report.aggregate_rows([])


def test_numpy_and_jax_scalars_are_numbers():
    import jax.numpy as jnp

    rows = [dict(ROW, test_accuracy=np.float32(0.5)), dict(ROW, test_accuracy=jnp.asarray(0.7))]
    agg = report.aggregate_rows(rows)
    assert agg["test_accuracy"] == pytest.approx(0.6)
    assert agg["test_accuracy_std"] == pytest.approx(math.sqrt(0.02), rel=1e-6)
    line = report.format_row_table([dict(ROW, test_accuracy=jnp.asarray(0.9312))]).split("\n")[2]
    assert "| 93.12% |" in line


# ------------------------------------------------------------------------------------------------
# write_run_report on a synthetic workdir
# ------------------------------------------------------------------------------------------------


def _synthetic_workdir(root: pathlib.Path) -> pathlib.Path:
    wd = root / "wd"
    ckpt.write_jsonl(wd / "search" / "candidates.jsonl", [
        {"iteration": 0, "reduction": [0.30, 0.48, 0.52, 0.70],
         "flops_reduction": [0.30, 0.48, 0.52, 0.70], "accuracy": [0.80, 0.60, 0.55, "nan"],
         "in_band": [False, True, True, False]},
        {"iteration": 1, "reduction": [0.50, 0.62], "flops_reduction": [0.50, 0.62],
         "accuracy": [0.65, 0.40], "in_band": [True, False]},
    ])  # fmt: skip
    ckpt.write_jsonl(wd / "search" / "metrics.jsonl", [
        {"iteration": 1, "reward_mean": 0.5, "in_band_rate": 0.5, "best_accuracy": 0.60},
        {"iteration": 2, "reward_mean": 30.0, "in_band_rate": 0.5, "best_accuracy": 0.65},
    ])  # fmt: skip
    epochs = lambda loss, acc: [{"epoch": e + 1, "train_loss": lo, "val_accuracy": a}  # noqa: E731
                                for e, (lo, a) in enumerate(zip(loss, acc, strict=True))]
    ckpt.write_jsonl(wd / "pretrain" / "metrics.jsonl",
                     epochs([2.0, 1.2, 0.8], [0.4, 0.6, 0.7]) + [{"best_epoch": 3}])  # fmt: skip
    ckpt.write_jsonl(wd / "finetune" / "cand0" / "metrics.jsonl", epochs([1.0, 0.7], [0.6, 0.68]))
    ids = {"stem_conv": [0, 5, 5, 3], "block/conv1": [1, 2, 4, 5, 5, 5], "head": [5, 5]}
    ckpt.save_json(wd / "export" / "pattern_ids.json", ids)
    return wd


SEARCHED = {
    "summary": {
        "method": "ppo", "target_flops_reduction": 0.5, "band": 0.05, "flops_kind": "true",
        "n_evals": 6, "n_in_band": 3,
        "candidates": [{"search_val_accuracy": 0.65, "heldout_accuracy": 0.62, "flops_reduction": 0.50,
                        "reference_formula_reduction": 0.71, "params_reduction": 0.44,
                        "seed": 0, "rank": 0}],
    },
    "best": [],
    "history": [],
}  # fmt: skip


def test_write_run_report_writes_tables_and_pngs(tmp_path):
    wd = _synthetic_workdir(tmp_path)
    cfg = config_lib.get_default_config().lock()
    out = report.write_run_report(str(wd / "report"), ROW, SEARCHED, cfg)
    rep = wd / "report"
    assert out["skipped"] == {}
    for name in ("accuracy_vs_flops.png", "pattern_distribution.png", "search_curves.png",
                 "training_curves.png"):  # fmt: skip
        data = (rep / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5_000, name
    md = (rep / "report.md").read_text()
    assert report.format_row_table([ROW]) in md
    for link in ("![accuracy_vs_flops](accuracy_vs_flops.png)",
                 "![pattern_distribution](pattern_distribution.png)",
                 "![search_curves](search_curves.png)",
                 "![training_curves](training_curves.png)"):  # fmt: skip
        assert link in md
    assert "exact counts" in md and "ref. formula" in md
    assert "test split was evaluated once" in md
    assert "pruned_weights_exactly_zero = True" in md
    conv = dict(ROW, dense_conventional_macs=40_551_040, masked_conventional_macs=20_000_000,
                conventional_macs_reduction=0.5068)  # fmt: skip
    report.write_run_report(str(wd / "report2"), conv, SEARCHED, cfg)
    md2 = (wd / "report2" / "report.md").read_text()
    assert "40.55M MACs dense, 20.00M pruned (50.7% fewer)" in md2 and "thop" in md2
    assert "thop" not in md  # not recorded in ROW: no line
    assert '"target_flops": 0.5' in md  # the config is embedded
    assert "| 0 | 65.00% | 62.00% | 50.00% | 71.00% | 44.00% | 0 |" in md  # the kept candidate
    results = json.loads((rep / "results.json").read_text())
    assert results["row"] == ROW
    assert results["search"]["n_in_band"] == 3
    assert results["config"]["search"]["library"] == "reference6"
    with open(rep / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 1
    assert float(lines[0]["test_accuracy"]) == ROW["test_accuracy"]
    assert int(lines[0]["dense_flops"]) == ROW["dense_flops"]
    assert lines[0]["pruned_weights_exactly_zero"] == "True"


def test_report_names_the_reward_set_and_cites_only_files_users_have(tmp_path):
    # It printed "-1 validation examples" (the config's "all not held out") and cited
    # REFERENCE.md, which lives outside the repository.
    wd = _synthetic_workdir(tmp_path)
    cfg = config_lib.get_default_config().lock()
    report.write_run_report(str(wd / "r1"), ROW, SEARCHED, cfg)
    md = (wd / "r1" / "report.md").read_text()
    assert "-1 validation" not in md and "the validation examples not held out" in md
    assert "REFERENCE.md" not in md and "DESIGN.md" not in md
    sized = {**SEARCHED, "summary": {**SEARCHED["summary"], "reward_set_size": 200,
                                     "heldout_size": 150}}  # fmt: skip
    report.write_run_report(str(wd / "r2"), ROW, sized, cfg)
    md = (wd / "r2" / "report.md").read_text()
    assert "(200 validation examples; the top candidates re-scored on 150 others)" in md


def test_write_run_report_missing_inputs_and_plots_off(tmp_path):
    # No search/ or export/ files and no searched dict: every plot is skipped with a reason.
    out = report.write_run_report(str(tmp_path / "wd" / "report"), ROW, None, None)
    assert set(out["skipped"]) == set(report.PLOT_FILES)
    md = (tmp_path / "wd" / "report" / "report.md").read_text()
    assert "candidates.jsonl not found" in md and "pattern_ids.json not found" in md
    assert not list((tmp_path / "wd" / "report").glob("*.png"))
    # Plots disabled by the config: no PNG even though the inputs exist.
    wd = _synthetic_workdir(tmp_path / "off")
    cfg = config_lib.get_default_config()
    cfg.report.plots = False
    out = report.write_run_report(str(wd / "report"), ROW, SEARCHED, cfg.lock())
    assert out["plots"] == {}
    assert not list((wd / "report").glob("*.png"))
    assert "plots disabled" in (wd / "report" / "report.md").read_text()


def test_load_candidates_flattens_and_keeps_nan(tmp_path):
    wd = _synthetic_workdir(tmp_path)
    c = report.load_candidates(str(wd / "search" / "candidates.jsonl"))
    np.testing.assert_allclose(c["reduction"], [0.30, 0.48, 0.52, 0.70, 0.50, 0.62])
    assert np.isnan(c["accuracy"][3]) and np.isfinite(np.delete(c["accuracy"], 3)).all()
    np.testing.assert_array_equal(c["in_band"], [False, True, True, False, True, False])
    np.testing.assert_array_equal(c["iteration"], [0, 0, 0, 0, 1, 1])


# ------------------------------------------------------------------------------------------------
# experiments/reproduce_tables.py with a fake pipeline.run
# ------------------------------------------------------------------------------------------------


def _load_driver():
    path = ROOT / "experiments" / "reproduce_tables.py"
    spec = importlib.util.spec_from_file_location("reproduce_tables_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_tables_main_with_fake_runs(tmp_path, monkeypatch, capsys):
    from sculpt_jax import pipeline

    driver = _load_driver()
    seen = []

    def fake_run(cfg, *, overwrite=False):
        seen.append((cfg.seed, cfg.workdir, cfg.search.iterations, cfg.progress))
        assert cfg.is_locked
        acc = {0: 0.90, 1: 0.94}[cfg.seed]
        return dict(ROW, model=cfg.model, dataset=cfg.dataset, test_accuracy=acc,
                    dense_test_accuracy=0.95, search_seconds=10.0 + cfg.seed)  # fmt: skip

    monkeypatch.setattr(pipeline, "run", fake_run)
    out = tmp_path / "results"
    spec = str(ROOT / "experiments" / "configs" / "digits_resnet20.py") + ":t30,smoke"
    code = driver.main(["--configs", spec, "--seeds", "0", "1", "--out", str(out),
                        "--set", "search.iterations=3", "--quiet"])  # fmt: skip
    assert code == 0
    name = "digits_resnet20_t30_smoke"
    assert seen == [
        (0, str(out / name / "seed0"), 3, False),
        (1, str(out / name / "seed1"), 3, False),
    ]
    md = (out / "tables.md").read_text()
    assert (
        "| digits_resnet20_t30_smoke | resnet20 | digits | ppo | 95.00 ± 0.00% | 92.00 ± 2.83% |"
        in md
    )
    assert "| digits_resnet20_t30_smoke | resnet20 | digits | ppo | 1 | 95.00% | 94.00% |" in md
    for claim in ("pruning rates of up to 90%", "nearly 18% improvement in FLOPs reduction",
                  "93.49%", "94.31%", "93.23%", "70.5%", "withdrew"):  # fmt: skip
        assert claim in md, claim
    data = json.loads((out / "tables.json").read_text())
    assert len(data["runs"]) == 2 and data["failures"] == []
    agg = data["aggregated"][0]
    assert agg["config"] == name and agg["n_seeds"] == 2 and agg["seeds"] == [0, 1]
    assert agg["test_accuracy"] == pytest.approx(0.92)
    assert agg["test_accuracy_std"] == pytest.approx(0.04 / math.sqrt(2))
    with open(out / "tables.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["search_seconds"]) == pytest.approx(10.5)
    assert "92.00 ± 2.83%" in capsys.readouterr().out


def test_reproduce_tables_records_failures_and_rejects_bad_config(tmp_path, monkeypatch):
    from sculpt_jax import pipeline

    driver = _load_driver()

    def fake_run(cfg, *, overwrite=False):
        if cfg.seed == 1:
            raise pipeline.PipelineError("no in-band candidate")
        return dict(ROW, test_accuracy=0.9)

    monkeypatch.setattr(pipeline, "run", fake_run)
    spec = str(ROOT / "experiments" / "configs" / "resnet20_cifar10.py") + ":smoke"
    out = tmp_path / "r"
    assert driver.main(["--configs", spec, "--seeds", "0", "1", "--out", str(out)]) == 1
    md = (out / "tables.md").read_text()
    assert "resnet20_cifar10_smoke seed 1: PipelineError: no in-band candidate" in md
    assert json.loads((out / "tables.json").read_text())["aggregated"][0]["n_seeds"] == 1
    with pytest.raises(ValueError, match="unknown config variant"):
        driver.main(["--configs", spec.replace(":smoke", ":t40"), "--out", str(out)])
    assert driver.config_name("a/b/vgg19_cifar100.py") == "vgg19_cifar100"


def test_epoch_seconds_counts_each_epoch_once_across_sessions(tmp_path):
    """A run resumed over sessions: the report's training time sums every epoch once (the last
    record of an epoch written twice wins), over the stage folder and its candidate folders."""
    from sculpt_jax.pipeline import epoch_seconds

    pre = tmp_path / "pretrain"
    pre.mkdir()
    ckpt.write_jsonl(pre / "metrics.jsonl", [
        {"epoch": 1, "epoch_time_s": 10.0}, {"epoch": 2, "epoch_time_s": 99.0},
        {"epoch": 2, "epoch_time_s": 20.0},  # epoch 2 re-run after an interruption
        {"final": True, "test_accuracy": 0.5},
    ])  # fmt: skip
    assert epoch_seconds(str(pre)) == 30.0
    ft_dir = tmp_path / "finetune"
    for k, secs in enumerate((5.0, 7.0)):
        (ft_dir / f"cand{k}").mkdir(parents=True)
        ckpt.write_jsonl(ft_dir / f"cand{k}" / "metrics.jsonl", [{"epoch": 1, "epoch_time_s": secs}])
    assert epoch_seconds(str(ft_dir)) == 12.0
    assert epoch_seconds(str(tmp_path / "missing")) is None
