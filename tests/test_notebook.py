"""experiments/colab/quickstart.ipynb runs top to bottom, as CI runs it: nbclient executes it in an
ipykernel of this interpreter on CPU, in the checkout (the notebook's clone/install step is skipped
through SCULPT_NOTEBOOK_CI), with a tiny smoke run in a temporary workdir. Checks that the kernel
itself never imported JAX (the job is a child process, so a TPU stays free for it), that the job's
devices line, the result table and the plots were shown. The install and report cells are also run
on their own: which pins the install step picks, and the devices line read from results.json (when
it records them) or from the job's log."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab" / "quickstart.ipynb"

# The notebook's smoke config, made smaller still: the tiny ResNet, one search iteration.
ARGS = [
    "--model", "resnet8_tiny", "--method", "random",
    "--config.search.iterations=1", "--config.search.n_envs=2", "--config.search.n_steps=4",
]  # fmt: skip

try:
    import nbclient
    import nbformat
except ImportError as e:  # requirements.txt has both; CI installs it and must run this test
    if os.environ.get("CI"):
        raise
    pytest.skip(f"nbclient/ipykernel not installed ({e}): pip install -r requirements.txt",
                allow_module_level=True)  # fmt: skip


def _kernelspec(tmp: pathlib.Path) -> str:
    """A kernelspec running ipykernel under this very interpreter (the venv's python)."""
    spec = tmp / "jupyter" / "kernels" / "sculpt-jax-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": "sculpt-jax test", "language": "python"}))  # fmt: skip
    return spec.name


def _text(cell) -> str:
    """Everything a cell printed or displayed as text/markdown."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("display_data", "execute_result"):
            parts.append(out["data"].get("text/markdown", out["data"].get("text/plain", "")))
    return "".join(parts)


def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
    kernel = _kernelspec(tmp_path)
    workdir = tmp_path / "run"
    for key, value in {
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "JAX_PLATFORMS": "cpu",
        "SCULPT_NOTEBOOK_CI": "1",
        "SCULPT_NOTEBOOK_WORKDIR": str(workdir),
        "SCULPT_NOTEBOOK_ARGS": " ".join(ARGS),
    }.items():  # the kernel, and the job it starts, inherit these
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = "import json, sys; print(json.dumps([sys.prefix, 'jax' in sys.modules]))"
    nb.cells.append(nbformat.v4.new_code_cell(probe, id="test-probe"))
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=900, startup_timeout=120,
                                     resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error

    cells = {c.get("id"): c for c in nb.cells}
    prefix, kernel_imported_jax = json.loads(_text(cells["test-probe"]).strip().splitlines()[-1])
    assert prefix == sys.prefix  # the kernel ran this interpreter (the venv)
    assert not kernel_imported_jax, "the kernel imported jax: it would hold a TPU the job needs"
    assert "jax " in _text(cells["devcheck"]) and "CpuDevice" in _text(cells["devcheck"])
    assert "devices: 1 x cpu (backend cpu" in _text(cells["run"])  # the job's own log line
    report = _text(cells["report"])
    assert "devices used by the job: 1 x cpu (backend cpu)" in report
    assert "| model |" in report and "| resnet8_tiny | digits | random |" in report
    results = json.loads((workdir / "report" / "results.json").read_text())
    images = [o for o in cells["plots"]["outputs"] if "image/png" in o.get("data", {})]
    assert results["plots"] and len(images) == len(results["plots"])
    assert (workdir / "job.log").is_file()


def test_install_cell_installs_only_missing_pins_never_jax(tmp_path):
    """The Colab install step, run here: it installs only the requirements.txt lines whose package
    is missing, never jax/jaxlib/libtpu, nothing of the test-only section, and counts Colab's
    tensorflow-probability as providing tfp-nightly."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = next(c for c in nb.cells if c.get("id") == "install")
    ns = {"CI": True, "os": os}
    exec(install.source, ns)  # noqa: S102 - the notebook's own cell; CI=True: defines, installs nothing
    assert ns["missing_pins"](str(ROOT / "requirements.txt")) == []  # this venv has them all
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# a comment\njax==0.10.2\njaxlib==0.10.2\nlibtpu==0.0.1\nnumpy==2.4.6\n"
        "not-a-real-package-xyz==1.0\nnot_real_either[extra]==2.0  # note\nfake-nightly==1.0\n"
        "# ---- tests, lint, notebook CI only ----\nanother-missing-pkg==3.0\n"
    )
    ns["PROVIDED_BY"]["fake-nightly"] = "numpy"  # as tfp-nightly -> tensorflow-probability
    assert ns["missing_pins"](str(req)) == ["not-a-real-package-xyz==1.0",
                                           "not_real_either[extra]==2.0"]  # fmt: skip
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("# ----"))
    assert {"nbclient", "ipykernel", "pytest", "ruff"} <= {x.split("==")[0] for x in lines[cut:]}


@pytest.mark.parametrize(
    "row, log, expected",
    [
        ({}, "INFO sculpt_jax: devices: 8 x TPU v3 (backend tpu, jax 0.9)\n",
         "devices used by the job: 8 x TPU v3 (backend tpu)"),
        ({"device_kind": "NVIDIA H200", "device_count": 1}, "",  # results.json that records them
         "devices used by the job: 1 x NVIDIA H200\n"),
        ({}, "", "devices used by the job: not recorded"),
    ],
)  # fmt: skip
def test_report_cell_reads_devices_from_results_or_the_job_log(row, log, expected, tmp_path,
                                                               capsys):  # fmt: skip
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps({"row": row, "plots": {}}))
    (report / "report.md").write_text("# title\n\n| model |\n|---|\n| m |\n\n## more\n")
    (tmp_path / "job.log").write_text(log)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.get("id") == "report")
    ns = {"os": os, "re": __import__("re"), "WORKDIR": str(tmp_path), "IN_COLAB": False,
          "JOB_LOG": str(tmp_path / "job.log")}  # fmt: skip
    exec(cell.source, ns)  # noqa: S102 - the notebook's own cell
    assert expected in capsys.readouterr().out
