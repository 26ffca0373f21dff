"""The benchmark scripts that a test can run in a reduced form keep running (they are what an
accelerator session executes in its few minutes: a broken one wastes the device)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def test_accelerator_check_runs_reduced_and_writes_json_and_markdown(tmp_path):
    # its own process, as a user runs it: `header` sets JAX's PRNG for the whole process
    out_json, out_md = tmp_path / "acc.json", tmp_path / "acc.md"
    subprocess.run([sys.executable, str(BENCH / "accelerator.py"), "--reduced", "--repeats", "1",
                    "--json", str(out_json), "--md", str(out_md)], check=True, timeout=900)  # fmt: skip
    saved = json.loads(out_json.read_text())
    assert saved["reduced"] is True and saved["device_count"] == len(jax.devices())
    sections = saved["sections"]
    assert list(sections) == [
        "candidate evaluations", "train step", "top-K fine-tuning", "compacted latency",
        "input pipeline", "jpeg decoding"]  # fmt: skip
    evals = sections["candidate evaluations"]
    assert {(r["n"], r["mode"], r["devices"]) for r in evals} == {
        (n, m, 1) for n in (1, 4) for m in ("map", "vmap")}  # one CPU device in the test
    assert all(r["evals_per_s"] > 0 for r in evals)
    train = sections["train step"][0]
    assert train["dense_train_ips"] > 0 and train["masked_train_ips"] > 0
    assert sections["top-K fine-tuning"]["one_program_over_sequential"] > 0
    lat = sections["compacted latency"]
    assert {r["batch"] for r in lat} == {1, 16} and all(0 < r["flops_ratio"] < 1 for r in lat)
    assert {r["pipeline"] for r in sections["input pipeline"]} == {"cifar", "imagenet"}
    assert [r["workers"] for r in sections["jpeg decoding"]] == [0]
    assert sections["jpeg decoding"][0]["img_per_s"] > 0
    md = out_md.read_text()
    assert "### top-K fine-tuning" in md and "| pipeline | stored | size | batch | img_per_s |" in md


def test_input_pipeline_benchmark_runs_reduced(tmp_path):
    out = tmp_path / "input.json"
    subprocess.run([sys.executable, str(BENCH / "input_pipeline.py"), "--workers", "0", "1",
                    "--n-images", "24", "--batch", "8", "--cifar-n", "256", "--json", str(out)],
                   check=True, timeout=300)  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["pipeline"], r["workers"]) for r in rows] == [
        ("imagenet", 0), ("imagenet", 1), ("cifar", 0), ("cifar", 0)]  # fmt: skip
    assert all(r["img_per_s"] > 0 for r in rows)


def test_latency_table_benchmark_runs_reduced(tmp_path):
    # predicted vs measured latency of decoded candidates, in the taps lowering
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, str(BENCH / "latency.py"), "--models", "resnet8_tiny",
                    "--batches", "1", "--parts", "table", "--table-lowerings", "taps",
                    "--table-targets", "0.2", "--table-random", "1", "--repeats", "1",
                    "--taps-min-width", "0", "--json", str(out)], check=True, timeout=600)  # fmt: skip
    (row,) = json.loads(out.read_text())["table"]
    assert row["lowering"] == "taps" and row["lowered_layers"] > 0
    assert [c["candidate"] for c in row["candidates"]] == ["t0.2_uniform", "t0.2_r1"]
    assert all(c["measured_ms"] > 0 and c["predicted_ms"] > 0 for c in row["candidates"])
