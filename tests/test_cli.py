"""The command line and the main job at smoke size: outputs, sanity, export round trip, resume,
and one clear error per bad input."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

from sculpt_jax import cli, pipeline
from sculpt_jax import compaction as C

SMOKE = [
    "--model", "resnet8_tiny",
    "--config.pretrain.epochs=2", "--config.pretrain.batch_size=64",
    "--config.search.iterations=2", "--config.search.n_envs=2", "--config.search.n_steps=4",
    "--config.search.target_flops=0.5", "--config.search.tolerance=0.05",
    "--config.search.top_k=2",
    "--config.search.bn_recalib_batches=1", "--config.search.bn_recalib_batch_size=64",
    "--config.ppo.hidden=16", "--config.ppo.gnn_layers=1", "--config.ppo.heads=2",
    "--config.finetune.epochs=1", "--quiet",
]  # fmt: skip


def test_info_json_reports_exact_counts(capsys):
    assert cli.main(["info", "--model", "resnet20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 269_722  # option-A ResNet-20
    assert info["conv_layers"] == 19 and info["dense_layers"] == 1 and info["traced_layers"] == 20
    assert info["input_shape"] == [32, 32, 3]
    assert info["dense_conventional_macs"] == 40_551_040  # the 40.55M MACs of the literature
    # exact dense FLOPs agree with XLA's cost analysis of the compiled forward within 2%
    assert abs(info["dense_flops_exact"] / info["xla_cost_analysis_flops"] - 1) < 0.02
    assert info["graph_nodes"] > 698  # 698 filters plus feature-map nodes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["pretrain", "--dataset", "mnist", "--workdir", "{tmp}"], "unknown dataset 'mnist'"),
        (["pretrain", "--dataset", "folder", "--data-dir", "{tmp}/nope", "--workdir", "{tmp}"],
         "nope"),
        (["run", "--config", "{tmp}/missing.py"], "config file"),
        (["prune", "--target-flops", "1.5", "--model", "resnet8_tiny", "--workdir", "{tmp}",
          "--config.pretrain.epochs=1"], "target FLOPs reduction must be in (0, 1)"),
        (["pretrain", "--model", "vit_b16", "--workdir", "{tmp}"], "cannot take digits inputs"),
        (["run", "--workdir", "{tmp}", "--config.report.compact_align=-1"],
         "report.compact_align must be an int >= 0"),
        (["run", "--workdir", "{tmp}", "--config.report.compact_lowering=fastest"],
         "report.compact_lowering must be filters, grouped, taps or auto"),
        (["prune", "--target-flops", "0.999", "--model", "resnet8_tiny", "--workdir", "{tmp}"],
         "is not reachable"),
        (["prune", "--tolerance", "0", "--workdir", "{tmp}"], "search.tolerance must be in (0, 1)"),
        (["prune", "--model", "resnet8_tiny", "--workdir", "{tmp}", "--tolerance", "0.0001"],
         "too coarse for search.tolerance"),
        (["run", "--workdir", "{tmp}", "--config.search.heldout_size=400"],
         "do not fit in the validation split"),
        (["run", "--workdir", "{tmp}", "--config.bandit.minibatches=3"],
         "bandit.minibatches >= 1 dividing"),
        (["run", "--workdir", "{tmp}", "--config.search.halving_images=200"],
         "halving would change nothing"),
        (["pretrain", "--workdir", "{tmp}", "--config.search.library=reference7"],
         "search.library='reference7' is not one of"),
        (["pretrain", "--workdir", "{tmp}", "--config.autocompress.scheme=channel"],
         "autocompress.scheme='channel' is not one of"),
        (["pretrain", "--workdir", "{tmp}", "--config.finetune.schedule=linear"],
         "finetune.schedule='linear' is not one of"),
        (["pretrain", "--workdir", "{tmp}", "--config.search.n_seeds=0"], "search.n_seeds must be"),
        (["pretrain", "--workdir", "{tmp}", "--head", "paper", "--config.ppo.minibatches=3"],
         "ppo.minibatches >= 1 dividing"),
        (["pretrain", "--workdir", "{tmp}", "--config.pretrain.lr=-0.1"], "pretrain.lr must be > 0"),
        (["pretrain", "--workdir", "{tmp}", "--config.finetune.momentum=-0.5"],
         "finetune.momentum must be in [0, 1)"),
        (["pretrain", "--workdir", "{tmp}", "--config.finetune.weight_decay=-1e-4"],
         "finetune.weight_decay >= 0"),
        (["pretrain", "--workdir", "{tmp}", "--config.val_size=0"], "not a fraction"),
        (["pretrain", "--workdir", "{tmp}", "--config.autocompress.cooling=1.5"],
         "0 < cooling < 1"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_clear_error(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_file_errors_and_corrupt_checkpoints_are_one_line(tmp_path, capsys, monkeypatch):
    # a workdir that is a file (NotADirectoryError) and an unreadable checkpoint used to print
    # tracebacks; every error the package raises reaches the user as one "error:" line
    from sculpt_jax import checkpoint, pipeline

    (tmp_path / "f").write_text("x")
    assert cli.main(["pretrain", "--workdir", str(tmp_path / "f" / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err

    def corrupt(cfg, overwrite=False):
        raise checkpoint.CorruptCheckpointError("checkpoint step 3 in W is unreadable; delete it")

    monkeypatch.setattr(pipeline, "pretrain", corrupt)
    assert cli.main(["pretrain", "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    assert capsys.readouterr().err == "error: checkpoint step 3 in W is unreadable; delete it\n"


def test_bad_budgets_fail_before_pretraining(tmp_path, capsys):
    wd = tmp_path / "w"
    assert cli.main(["run", "--model", "resnet8_tiny", "--workdir", str(wd), "--target-flops",
                     "0.999", "--quiet"]) == 2  # fmt: skip
    assert "is not reachable" in capsys.readouterr().err
    assert not (wd / "pretrain").exists(), "the check must come before any training"


def test_unknown_config_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--config.search.no_such_key=1"])
    assert "unknown config key 'search.no_such_key'" in capsys.readouterr().err


def test_a_shortcut_and_a_config_field_that_disagree_are_rejected(tmp_path, capsys):
    # `--method autocompress --config.search.method=random` used to run random search silently
    with pytest.raises(SystemExit):
        cli.main(["run", "--workdir", str(tmp_path / "w"), "--method", "autocompress",
                  "--config.search.method=random"])  # fmt: skip
    assert ("--method autocompress and --config.search.method=random disagree"
            in capsys.readouterr().err)
    assert not (tmp_path / "w").exists()


def test_main_job_smoke_end_to_end(tmp_path, capsys):
    wd = str(tmp_path / "My Drive" / "run 1")  # a mounted-Drive style path: spaces kept
    assert cli.main(["run", "--workdir", wd, *SMOKE, "--config.report.compact_lowering=auto"]) == 0
    table = capsys.readouterr().out
    assert "| resnet8_tiny | digits | ppo |" in table
    for f in ("report.md", "results.csv", "results.json", "accuracy_vs_flops.png"):
        assert os.path.exists(os.path.join(wd, "report", f)), f
    row = json.load(open(os.path.join(wd, "report", "results.json")))
    row = row["row"]
    for k in ("dense_test_accuracy", "test_accuracy", "val_accuracy"):
        assert 0.0 <= row[k] <= 1.0
    assert abs(row["flops_reduction"] - 0.5) <= 0.05 + 1e-6  # within the decoder's tolerance
    assert row["pruned_weights_exactly_zero"] is True
    assert row["masked_flops"] < row["dense_flops"]
    assert row["masked_conventional_macs"] < row["dense_conventional_macs"]
    for b in ("b1", "b256"):  # latency of dense, masked and compacted models was measured
        assert all(row[f"latency_ms_{k}_{b}"] > 0 for k in ("dense", "masked", "compact"))
    assert os.path.exists(os.path.join(wd, "export", "compact", "compact.json"))
    for stage in ("pretrain", "search", os.path.join("finetune", "cand0")):  # TensorBoard events
        assert any(f.startswith("events.out.tfevents")
                   for f in os.listdir(os.path.join(wd, stage, "tensorboard"))), stage  # fmt: skip
    assert os.path.exists(os.path.join(wd, "report", "training_curves.png"))
    assert row["compact_align"] == C.auto_align() and row["compact_align"] >= 1
    assert row["compact_stored_params"] >= row["compact_params"]
    # the export's convs each run on the lowering timed fastest for them (at the batch-256 row)
    assert row["compact_lowering"] == "auto"
    exported = json.load(open(os.path.join(wd, "export", "compact", "compact.json")))
    auto = exported["auto_lowering"]
    assert auto["batch"] == 256 and auto["kept"] in ("per_layer", "filters")
    assert sum(row["compact_lowering_layers"].values()) == 7  # resnet8_tiny's convs
    assert 0 < row["pretrain_epoch_seconds"] and 0 < row["finetune_epoch_seconds"]
    ids = json.load(open(os.path.join(wd, "export", "pattern_ids.json")))
    assert set(ids["head"]) == {5}, "the classifier head must never be pruned (it deletes classes)"
    best = json.load(open(os.path.join(wd, "search", "best.json")))
    assert best["tolerance"] == 0.05 and best["in_band_rate"] == 1.0
    assert best["on_budget_rate"] == 1.0
    held = [c["heldout_accuracy"] for c in best["candidates"]]
    assert held == sorted(held, reverse=True) and all(0.0 <= h <= 1.0 for h in held)
    assert 0.0 <= row["heldout_accuracy_before_finetune"] <= 1.0

    # The trained policy was saved; another search starts from it, an incompatible one is refused.
    assert os.path.exists(os.path.join(wd, "search", "policy", "policy.json"))
    wd2 = str(tmp_path / "warm")
    warm = ["prune", "--workdir", wd2, "--checkpoint", wd, "--policy-from", wd, *SMOKE]
    assert cli.main(warm) == 0
    assert json.load(open(os.path.join(wd2, "search", "best.json")))["policy_from"].endswith(
        os.path.join("search", "policy"))
    capsys.readouterr()
    bad = ["prune", "--workdir", str(tmp_path / "bad"), "--checkpoint", wd, "--policy-from", wd,
           *SMOKE, "--config.ppo.hidden=8"]  # fmt: skip
    assert cli.main(bad) == 2
    assert "cannot start this search (hidden: saved 16 vs here 8)" in capsys.readouterr().err
    assert cli.main(["prune", "--workdir", str(tmp_path / "none"), "--checkpoint", wd,
                     "--policy-from", str(tmp_path), *SMOKE]) == 2  # fmt: skip
    assert "no trained policy" in capsys.readouterr().err

    # The export loads back without the search and evaluates to the same accuracy, pruned = 0.
    from sculpt_jax import config as config_lib
    from sculpt_jax import masking
    from sculpt_jax import training as ft

    args, cfg = cli.parse(["run", "--workdir", wd, *SMOKE])
    s = pipeline.setup(cfg)
    variables, masks, summary = pipeline.load_export(os.path.join(wd, "export"),
                                                     s.init_variables)  # fmt: skip
    acc = ft.evaluate(ft.make_eval_step(s.apply_fn), variables, *s.splits.test.arrays, 256)
    assert acc["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    masked = masking.apply_masks(variables["params"], masks)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(variables["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    del config_lib

    # Running again in the same workdir reuses every finished stage and gives the same row.
    assert cli.main(["run", "--workdir", wd, *SMOKE]) == 0
    row2 = json.load(open(os.path.join(wd, "report", "results.json")))
    row2 = row2["row"]
    assert row2["test_accuracy"] == row["test_accuracy"]
    assert row2["flops_reduction"] == row["flops_reduction"]


def test_resnet20_cifar10_smoke_on_shared_data(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """The ResNet-20 CIFAR-10 row at smoke size on the real CIFAR-10 (JPEG) from ../shared/data."""
    from conftest import shared_data_file

    path = shared_data_file("cifar10-jpeg.tar.gz")
    if path is None:
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not present (developer/CI data only)")
    # share the decoded-array cache with tests/test_data.py
    monkeypatch.setenv("SCULPT_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "sculpt_jax_cache"))
    wd = str(tmp_path / "cifar")
    argv = [
        "run", "--workdir", wd, "--model", "resnet20", "--dataset", "cifar10", "--data-dir", path,
        "--config.max_train_examples=512", "--config.pretrain.epochs=1",
        "--config.search.reward_set_size=128", "--config.search.iterations=1",
        "--config.search.n_envs=2", "--config.search.n_steps=2", "--config.search.heldout_size=64",
        "--config.search.method=magnitude", "--config.search.bn_recalib_batches=1",
        "--config.search.bn_recalib_batch_size=64", "--config.finetune.epochs=1", "--quiet",
        "--config.report.latency=false",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "| resnet20 | cifar10 | magnitude |" in capsys.readouterr().out
    row = json.load(open(os.path.join(wd, "report", "results.json")))["row"]
    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["dense_test_accuracy"] <= 1.0
    assert abs(row["flops_reduction"] - 0.5) <= 0.005 + 1e-6
    assert row["pruned_weights_exactly_zero"] is True


def test_latency_constraint_in_the_taps_lowering_through_the_main_job(tmp_path, capsys):
    # the table models the pattern-grouped (taps) lowering; the chosen model is compacted so and
    # timed, beside the prediction
    from conftest import SMOKE_MAIN_JOB

    wd = tmp_path / "lat"
    argv = ["run", "--workdir", str(wd), *SMOKE_MAIN_JOB, "--config.search.constraint=latency",
            "--config.search.target_latency=0.3", "--config.search.tolerance=0.2",
            "--config.search.latency_lowering=taps"]  # fmt: skip
    assert cli.main([*argv, "--config.report.latency=true"]) == 0
    row = json.load(open(wd / "report" / "results.json"))["row"]
    assert row["target_measure"] == "latency" and row["latency_table_lowering"] == "taps"
    assert row["latency_table_lowered_layers"] > 0
    # the export runs those convs on taps too (the rest on report.compact_lowering, filters)
    assert row["compact_lowering_layers"]["taps"] == row["latency_table_lowered_layers"]
    assert abs(row["latency_predicted_reduction"] - 0.3) <= 0.2 + 1e-6
    assert row["latency_measured_ms"] > 0 and row["latency_predicted_ms"] > 0
    table = json.load(open(wd / "search" / "latency_table.json"))
    assert table["key"]["lowering"] == "taps" and "taps" in table["lowerings"]
    assert cli.main([*argv[:3], *SMOKE_MAIN_JOB, "--config.search.latency_lowering=pallas"]) == 2
    assert "latency_lowering='pallas' is not one of" in capsys.readouterr().err


def test_autocompress_method_through_the_main_job(tmp_path, capsys):
    wd = str(tmp_path / "ac")
    argv = ["run", "--workdir", wd, *SMOKE, "--method", "autocompress",
            "--config.autocompress.rounds=1", "--config.autocompress.admm_iterations=1",
            "--config.autocompress.admm_steps=2", "--config.autocompress.scheme=filter",
            "--config.report.latency=false"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "| resnet8_tiny | digits | autocompress |" in capsys.readouterr().out
    row = json.load(open(os.path.join(wd, "report", "results.json")))["row"]
    assert row["flops_reduction"] >= 0.5 - 0.03  # AutoCompress meets the hard constraint
    assert row["pruned_weights_exactly_zero"] is True
    # a second run reuses the saved AutoCompress result
    assert cli.main(argv) == 0
    row2 = json.load(open(os.path.join(wd, "report", "results.json")))["row"]
    assert row2["test_accuracy"] == row["test_accuracy"]


def test_stage_chain_reads_the_workdir_config(tmp_path, capsys, caplog):
    # `prune --workdir W` after `pretrain --workdir W ...` continues that run (W/config.json):
    # before, it fell back to the defaults (ResNet-20, 12 epochs) and clashed with W's pretrain
    wd = str(tmp_path / "chain")
    assert cli.main(["pretrain", "--workdir", wd, *SMOKE]) == 0
    caplog.set_level(logging.INFO)
    assert cli.main(["prune", "--workdir", wd, "--quiet"]) == 0
    # the resume messages come from the sculpt_jax loggers, which the CLI shows (absl's it hides)
    resumed = [r for r in caplog.records if "fit: resumed" in r.getMessage()]
    assert resumed and resumed[0].name == "sculpt_jax.training"
    assert resumed[0].getMessage().endswith("at epoch 2")
    assert any("config.json" in r.getMessage() for r in caplog.records)
    assert cli.main(["finetune", "--workdir", wd, "--quiet", "--config.finetune.lr=0.02"]) == 0
    lines = open(os.path.join(wd, "pretrain", "metrics.jsonl")).read().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines if "train_loss" in line]
    assert epochs == [1, 2], "the pretrain stage was reused, not extended or redone"
    summary = json.load(open(os.path.join(wd, "export", "summary.json")))
    assert summary["model"] == "resnet8_tiny" and summary["pruned_weights_exactly_zero"]
    saved = json.load(open(os.path.join(wd, "config.json")))
    assert saved["finetune"]["lr"] == 0.02 and saved["pretrain"]["epochs"] == 2
    assert len(summary["candidates_val_accuracy"]) == 2  # SMOKE's search.top_k


USER_MODEL = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        x = nn.relu(nn.Conv(24, (3, 3))(x))
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def no_train_flag():
    return nn.Dense(3)
'''


def test_user_model_by_import_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["info", "--model", "my_nets:Net", "--input-shape", "8,8,1", "--num-classes",
                     "10", "--json"]) == 0  # fmt: skip
    info = json.loads(capsys.readouterr().out)
    assert info["traced_layers"] == 3 and info["conv_layers"] == 2
    assert info["params"] == 3 * 3 * 16 + 16 + 2 * 16 + 3 * 3 * 16 * 24 + 24 + 24 * 10 + 10
    wd = str(tmp_path / "user")
    assert cli.main(["run", "--workdir", wd, *SMOKE, "--model", "my_nets:Net",
                     "--config.search.tolerance=0.1", "--config.report.latency=false"]) == 0
    assert "| my_nets:Net | digits |" in capsys.readouterr().out
    summary = json.load(open(os.path.join(wd, "export", "summary.json")))
    assert summary["pruned_weights_exactly_zero"] and summary["masked_flops"] < summary["dense_flops"]
    for argv, message in [
        (["info", "--model", "my_nets:Net"], "give --input-shape H,W,C and --num-classes N"),
        (["info", "--model", "no_such_pkg.mod:Net"], "cannot import module 'no_such_pkg.mod'"),
        (["info", "--model", "my_nets:Missing"], "my_nets has no attribute 'Missing'"),
        (["pretrain", "--model", "my_nets:no_train_flag", "--workdir", wd + "2"],
         "__call__ must accept train"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_info_list_names_every_zoo_model(capsys):
    from sculpt_jax.models import list_models

    assert cli.main(["info", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    assert "32x32x3" in lines[list_models().index("resnet20")]
