"""Many hosts (JAX's multi-controller runtime) on one machine: TWO CPU processes joined through a
localhost coordinator with gloo collectives, one fake device each, run the smoke main job; they
give the masks and metrics of the one-process run on two devices, and results.json is written
once (by process 0) with the global device count. An inconsistent multi-process environment is
one clear error before any work.

Every subprocess has a timeout so that a hung collective cannot block the suite.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SMOKE_MAIN_JOB

from sculpt_jax import checkpoint as ckpt
from sculpt_jax import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = SMOKE_MAIN_JOB
TIMEOUT = 400


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCULPT_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(workdir: str, *more: str, stage: str = "run", entry=("-m", "sculpt_jax")) -> list[str]:
    return [sys.executable, *entry, stage, "--workdir", workdir, *SMOKE, *more]


def _run_two(workdir: str, *more: str, stage: str = "run",
             entry=("-m", "sculpt_jax")) -> list[subprocess.CompletedProcess]:  # fmt: skip
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(SCULPT_NUM_PROCESSES="2", SCULPT_PROCESS_ID=str(i),
                   SCULPT_COORDINATOR=f"localhost:{port}")  # fmt: skip
        procs.append(subprocess.Popen(_cmd(workdir, *more, stage=stage, entry=entry), env=env,
                                      cwd=ROOT,
                                      text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _row(workdir: str) -> dict:
    with open(os.path.join(workdir, "report", "results.json")) as f:
        return json.load(f)["row"]


def _assert_same_run(full, resumed) -> None:
    """The resumed run's workdir ends with the uninterrupted one's masks and metrics."""
    ids = [json.load(open(d / "export" / "pattern_ids.json")) for d in (full, resumed)]
    assert ids[0] == ids[1]
    a, b = _row(str(full)), _row(str(resumed))
    for k in ("dense_val_accuracy", "val_accuracy", "test_accuracy", "flops_reduction",
              "search_val_accuracy_before_finetune"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # two smoke main jobs (1 process x 2 devices, 2 processes x 1): ~3 min
    tmp = tmp_path_factory.mktemp("dist")
    one = subprocess.run(_cmd(str(tmp / "one")), cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_two(str(tmp / "two"))
    for p in two:
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return {"tmp": tmp, "two": two}


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
    tmp = runs["tmp"]
    one, two = _row(str(tmp / "one")), _row(str(tmp / "two"))
    assert one["device_count"] == two["device_count"] == 2
    ids = [json.load(open(tmp / n / "export" / "pattern_ids.json")) for n in ("one", "two")]
    assert ids[0] == ids[1], "the same masks from two processes as from one"
    for k in ("dense_val_accuracy", "dense_test_accuracy", "val_accuracy", "test_accuracy",
              "search_val_accuracy_before_finetune", "flops_reduction", "params_reduction"):
        assert two[k] == pytest.approx(one[k], abs=1e-6), k


@pytest.mark.slow
def test_only_process_0_writes_and_logs(runs):
    p0, p1 = runs["two"]
    assert "| resnet8_tiny |" in p0.stdout and "| resnet8_tiny |" not in p1.stdout
    assert "[process 0/2]" in p0.stderr and "INFO [process 1/2] sculpt_jax" not in p1.stderr
    tmp = runs["tmp"]
    lines = open(tmp / "two" / "pretrain" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2, lines  # one epoch record + the final record, not one per process
    leftovers = [f for f in os.listdir(tmp / "two" / "report") if f.endswith((".part", ".tmp"))]
    assert not leftovers


@pytest.mark.slow
def test_two_processes_resume_a_run_cut_after_pretraining(runs):
    # A run cut after its pretrain stage (the disconnect case: `pretrain` ran, the job died) and
    # started again with the same command continues from the collectively written checkpoint
    # (restored by both processes) and ends with the uninterrupted two-process run's masks and
    # metrics; nothing is pretrained twice.
    tmp = runs["tmp"]
    wd = str(tmp / "cut")
    for p in _run_two(wd, stage="pretrain") + _run_two(wd):
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    _assert_same_run(tmp / "two", tmp / "cut")
    lines = open(tmp / "cut" / "pretrain" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2, lines  # the pretrain epoch was not run again


# `python -m sculpt_jax`, except that every process dies (os._exit, no cleanup, as under SIGKILL)
# right after the pretrain checkpoint of optimizer step KILL_AT_STEP is committed.
_KILLED_MID_STAGE = """
import os, runpy, sys, time
from sculpt_jax import checkpoint
_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
    _save(self, step, *args, **kwargs)
    if int(step) == int(os.environ["KILL_AT_STEP"]) and "pretrain" in self.directory:
        t = time.time()  # the step is committed (by process 0) before any process dies
        while int(step) not in self.all_steps() and time.time() - t < 60:
            time.sleep(0.1)
        os._exit(137)
checkpoint.Checkpointer.save = save
sys.argv[0] = "sculpt_jax"
runpy.run_module("sculpt_jax", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_two_processes_killed_inside_a_stage_resume_mid_epoch(runs, monkeypatch):
    # Both processes are killed inside pretraining, right after the collective checkpoint of step 3
    # of the epoch's 8 (`checkpoint_every_steps=3`). The same command again resumes there (batch 3
    # of epoch 0, restored by both processes) and ends with the uninterrupted run's masks and metrics.
    tmp = runs["tmp"]
    wd = str(tmp / "killed")
    script = tmp / "killed_mid_stage.py"
    script.write_text(_KILLED_MID_STAGE)
    monkeypatch.setenv("KILL_AT_STEP", "3")
    every = "--config.checkpoint_every_steps=3"
    # whichever process dies second may see the other go and abort first (as under a real kill)
    for p in _run_two(wd, every, entry=(str(script),)):
        assert p.returncode != 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    c = ckpt.Checkpointer(os.path.join(wd, "pretrain", "checkpoints"))
    assert c.all_steps() == [3] and c.read_meta(3)["batch_in_epoch"] == 3
    c.close()
    assert not os.path.exists(os.path.join(wd, "pretrain", "result.json"))
    again = _run_two(wd, every)
    for p in again:
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "fit: resumed" in again[0].stderr and "batch 3" in again[0].stderr
    _assert_same_run(tmp / "two", tmp / "killed")


AC = ["--config.search.method=autocompress", "--config.autocompress.rounds=1",
      "--config.autocompress.admm_iterations=1", "--config.autocompress.admm_steps=2",
      "--config.autocompress.scheme=filter"]  # fmt: skip


@pytest.mark.slow
def test_autocompress_in_two_processes_equals_one_process(tmp_path):
    # AutoCompress (annealing + ADMM + purification) under the multi-controller runtime: the same
    # masks and metrics as one process on two devices; its candidates are checkpointed
    # collectively and reported once
    one = subprocess.run(_cmd(str(tmp_path / "one"), *AC), cwd=ROOT, capture_output=True,
                         text=True, timeout=TIMEOUT,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for p in _run_two(str(tmp_path / "two"), *AC):
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    a, b = _row(str(tmp_path / "one")), _row(str(tmp_path / "two"))
    assert a["method"] == b["method"] == "autocompress" and b["device_count"] == 2
    # AutoCompress exports masks, not pattern ids
    masks = [ckpt.load_pytree(str(tmp_path / n / "export" / "masks")) for n in ("one", "two")]
    assert jax.tree.structure(masks[0]) == jax.tree.structure(masks[1])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(masks[0]),
                                                    jax.tree.leaves(masks[1]), strict=True))
    for k in ("val_accuracy", "test_accuracy", "flops_reduction", "params_reduction",
              "search_val_accuracy_before_finetune"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k


@pytest.mark.slow
def test_latency_constraint_in_two_processes_uses_process_0s_table(tmp_path):
    # Process 0 alone times the latency table (timings differ per process, and every process must
    # decode with the same table); the others wait at a coordination-service barrier, which
    # outlasts the CPU collectives' 30 s first-connect timeout, then read the table it wrote.
    wd = tmp_path / "lat"
    out = _run_two(str(wd), "--config.search.constraint=latency",
                   "--config.search.target_latency=0.4", "--config.search.tolerance=0.2")
    for p in out:
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "latency table measured on cpu" in out[0].stderr
    row = _row(str(wd))
    assert row["target_measure"] == "latency" and row["device_count"] == 2
    assert abs(row["latency_predicted_reduction"] - 0.4) <= 0.2
    assert row["latency_measured_ms"] > 0 and (wd / "search" / "latency_table.json").is_file()


def test_inconsistent_environment_is_one_clear_error(tmp_path):
    cases = [
        ({"SCULPT_NUM_PROCESSES": "2", "SCULPT_PROCESS_ID": "0"}, "SCULPT_COORDINATOR"),
        ({"SCULPT_NUM_PROCESSES": "2", "SCULPT_PROCESS_ID": "2",
          "SCULPT_COORDINATOR": "localhost:1"}, "out of range"),  # fmt: skip
        ({"SCULPT_NUM_PROCESSES": "2", "SCULPT_COORDINATOR": "localhost:1"}, "SCULPT_PROCESS_ID"),
        ({"SCULPT_PROCESS_ID": "1"}, "SCULPT_NUM_PROCESSES"),
        ({"SCULPT_NUM_PROCESSES": "two"}, "must be integers"),
    ]
    for env, want in cases:
        with pytest.raises(ValueError, match=want):
            shd.distributed_env(env)
    assert shd.distributed_env({}) is None
    assert shd.distributed_env({"SCULPT_NUM_PROCESSES": "1"}) is None
    assert shd.distributed_env({"SCULPT_NUM_PROCESSES": "2", "SCULPT_PROCESS_ID": "1",
                                "JAX_COORDINATOR_ADDRESS": "h:5"})["process_id"] == 1
    # Through the CLI: exit code 2, the message, nothing written.
    wd = tmp_path / "w"
    p = subprocess.run(_cmd(str(wd)), cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=_env(SCULPT_NUM_PROCESSES="2", SCULPT_PROCESS_ID="5",
                                SCULPT_COORDINATOR="localhost:1"))  # fmt: skip
    assert p.returncode == 2 and "SCULPT_PROCESS_ID=5 is out of range" in p.stderr, p.stderr
    assert not wd.exists()


@pytest.mark.slow
def test_batch_the_processes_cannot_split_fails_before_work(tmp_path):
    wd = tmp_path / "w"
    out = _run_two(str(wd), "--config.finetune.batch_size=31")
    for p in out:
        assert p.returncode == 2, p.stderr[-2000:]
        assert "finetune.batch_size=31 is not divisible by the 2 devices" in p.stderr
        assert "1 per process x 2 processes" in p.stderr
    assert not (wd / "config.json").exists()
