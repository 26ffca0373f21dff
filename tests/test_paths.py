"""URL workdirs (`sculpt_jax.paths`): gs:// through a local stand-in, mounted-Drive style paths with
spaces, file:// URLs, and one clear error for a workdir that cannot be opened.

The stand-in: an fsspec filesystem registered for ``gs``/``gcs`` that keeps objects under a local
temporary folder and, like a real object store, refuses appends and renames. epath (without
TensorFlow) serves ``gs://`` through fsspec, so our JSON, JSON-lines, report and plot writes run the
same code as with gcsfs. Orbax's ARRAY data goes through tensorstore's own gcs driver, which this
stand-in cannot serve (it contacts Google), so checkpoints are tested on local paths only.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

fsspec = pytest.importorskip("fsspec")
from etils.epath import backend as epath_backend  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from sculpt_jax import checkpoint as ckpt  # noqa: E402
from sculpt_jax import cli, config, paths, pipeline, report  # noqa: E402


class _FakeGCS(LocalFileSystem):
    """gs://bucket/key -> <ROOT>/bucket/key; no append, no rename (as on GCS)."""

    protocol = ("gs", "gcs")
    root_marker = ""
    ROOT = ""
    opened: list[str] = []

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)  # an argument epath gives gcsfs
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                return os.path.join(cls.ROOT, path[len(p) :]).rstrip("/")
        return super()._strip_protocol(path)

    def open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("object stores cannot append")
        type(self).opened.append(mode)
        return super().open(path, mode, **kwargs)

    def mv(self, *args, **kwargs):
        raise NotImplementedError("object stores cannot rename")


class _NoGCSFS(LocalFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
        raise ImportError("Please install gcsfs to access Google Storage")


def _install(monkeypatch, cls):
    """Serves gs:// with `cls` for this test (fsspec's registry and epath's cache restored after)."""
    registry = sys.modules["fsspec.registry"]._registry  # `fsspec.registry` is a read-only view
    for proto in ("gs", "gcs"):
        monkeypatch.setitem(registry, proto, cls)
    cls.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", _uncached_fs)


def _uncached_fs(path):
    """epath's fsspec backend without its lru_cache, so no stand-in outlives its test."""
    name = {"gs": "gcs", "s3": "s3", "az": "az", "hf": "hf"}.get(os.fspath(path).split(":")[0])
    return fsspec.filesystem(name or "file", skip_instance_cache=True)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A local folder standing in for gs://; yields it (``gs://bkt/x`` is ``<it>/bkt/x``)."""
    if paths.epath.gpath._is_tf_installed():
        pytest.skip("TensorFlow is installed: epath would use tf.io.gfile, not the stand-in")
    root = tmp_path / "bucket-root"
    root.mkdir()
    monkeypatch.setattr(_FakeGCS, "ROOT", str(root))
    monkeypatch.setattr(_FakeGCS, "opened", [])
    _install(monkeypatch, _FakeGCS)
    # check_workdir's array-storage probe: tensorstore's file driver on the same folder
    monkeypatch.setattr(paths, "_kvstore_spec", lambda url: {
        "driver": "file", "path": os.path.join(str(root), url[len("gs://"):]) + "/"})  # fmt: skip
    return root


def test_resolve_keeps_urls_and_absolutises_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("gs://b/run/") == "gs://b/run"
    assert paths.resolve("s3://b/run") == "s3://b/run"
    assert paths.resolve("runs/my run") == str(tmp_path / "runs" / "my run")
    assert paths.resolve("file:///content/drive/My Drive/r") == "/content/drive/My Drive/r"
    assert paths.is_url("gs://b") and not paths.is_url("/content/drive/MyDrive/x")
    assert os.path.join(paths.resolve("gs://b/run"), "search") == "gs://b/run/search"
    with pytest.raises(paths.WorkdirError, match=r"scheme proto:// is not supported.*gs://"):
        paths.resolve("proto://bucket/run")


def test_json_jsonl_report_and_plots_land_in_the_bucket(bucket):
    wd = paths.check_workdir("gs://bkt/run")
    assert wd == "gs://bkt/run" and os.listdir(bucket / "bkt" / "run") == []  # probe removed
    ckpt.save_json(f"{wd}/search/best.json", {"a": np.float32(0.5)})
    assert json.loads((bucket / "bkt/run/search/best.json").read_text()) == {"a": 0.5}
    assert ckpt.load_json(f"{wd}/search/best.json") == {"a": 0.5}
    for i in range(3):  # no append on object stores: each line rewrites the object
        ckpt.append_jsonl(f"{wd}/search/metrics.jsonl", {"iteration": i, "epoch": i,
                                                          "epoch_time_s": 1.0})  # fmt: skip
    assert [r["iteration"] for r in ckpt.read_jsonl(f"{wd}/search/metrics.jsonl")] == [0, 1, 2]
    ckpt.write_jsonl(f"{wd}/search/metrics.jsonl", [{"iteration": 7}])
    assert ckpt.read_jsonl(f"{wd}/search/metrics.jsonl") == [{"iteration": 7}]
    assert ckpt.read_jsonl(f"{wd}/search/absent.jsonl") == []
    ckpt.append_jsonl(f"{wd}/pretrain/metrics.jsonl", {"epoch": 0, "epoch_time_s": 2.5})
    assert pipeline.epoch_seconds(f"{wd}/pretrain") == 2.5
    assert paths.listdir(wd) == ["pretrain", "search"]

    cands = [{"iteration": 0, "reduction": [0.5, 0.45], "accuracy": [0.8, 0.7],
              "in_band": [True, True]}]  # fmt: skip
    ckpt.write_jsonl(f"{wd}/search/candidates.jsonl", cands)
    out = report.write_run_report(f"{wd}/report", {"model": "m", "dataset": "d", "method": "ppo",
                                                   "val_accuracy": 0.7}, None, {})  # fmt: skip
    assert out["report"] == "gs://bkt/run/report/report.md"
    files = set(os.listdir(bucket / "bkt" / "run" / "report"))
    assert {"report.md", "results.json", "results.csv"} <= files
    assert "accuracy_vs_flops.png" in files, out["skipped"]
    png = (bucket / "bkt/run/report/accuracy_vs_flops.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not [f for f in files if f.endswith(".part")]

    # config.json of a URL workdir is read back by the next command
    cfg = config.get_default_config()
    cfg.workdir, cfg.seed = wd, 123
    pipeline.save_config(cfg)
    assert config.load_workdir_config(wd).seed == 123
    assert "a" not in _FakeGCS.opened  # nothing asked the object store to append


def test_unopenable_url_workdir_is_one_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    # an unknown scheme, and gs:// without gcsfs (or TensorFlow): exit 2, one line, no traceback
    if paths.epath.gpath._is_tf_installed():
        pytest.skip("TensorFlow is installed: epath serves gs:// through tf.io.gfile")
    _install(monkeypatch, _NoGCSFS)
    for url, msg in (("proto://bkt/run", "scheme proto:// is not supported"),
                     ("gs://bkt/run", "pip install gcsfs")):  # fmt: skip
        assert cli.main(["run", "--workdir", url, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and url in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_unwritable_bucket_fails_up_front_and_keeps_what_is_there(bucket):
    (bucket / "bkt" / "run").mkdir(parents=True)
    keep = bucket / "bkt" / "run" / "results.json"
    keep.write_text("{}")
    assert paths.check_workdir("gs://bkt/run") == "gs://bkt/run"
    assert sorted(os.listdir(bucket / "bkt" / "run")) == ["results.json"]
    (bucket / "ro").write_text("a file where the bucket should be")
    with pytest.raises(paths.WorkdirError, match=r"workdir 'gs://ro/run' cannot be opened.*gcsfs"):
        paths.check_workdir("gs://ro/run")
    assert keep.read_text() == "{}"


def test_array_storage_probe_failure_is_the_same_clear_error(bucket, monkeypatch):
    # the files are writable but tensorstore (Orbax's array storage on gs://) cannot write
    (bucket / "not-a-dir").write_text("x")
    monkeypatch.setattr(paths, "_kvstore_spec", lambda url: {
        "driver": "file", "path": str(bucket / "not-a-dir") + "/"})  # fmt: skip
    with pytest.raises(paths.WorkdirError, match=r"'gs://bkt/run'.*checkpoint arrays.*gcsfs"):
        paths.check_workdir("gs://bkt/run")
    assert os.listdir(bucket / "bkt" / "run") == []  # the file probe was removed


def test_local_workdir_error_and_nothing_lost(tmp_path):
    wd = tmp_path / "old run"
    wd.mkdir()
    (wd / "config.json").write_text("{}")
    assert paths.check_workdir(str(wd)) == str(wd)
    assert os.listdir(wd) == ["config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(paths.WorkdirError, match="cannot be opened for writing"):
        paths.check_workdir(str(tmp_path / "file" / "run"))


def test_checkpoints_exports_and_reports_in_a_drive_like_path_with_spaces(tmp_path):
    wd = str(tmp_path / "content" / "drive" / "My Drive" / "sculpt runs" / "run 1")
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    with ckpt.Checkpointer(os.path.join(wd, "checkpoints")) as c:
        c.save(1, tree, {"epoch": 1})
        state, meta = c.restore(target=tree)
    np.testing.assert_array_equal(state["w"], tree["w"])
    assert meta == {"epoch": 1}
    ckpt.save_pytree(f"file://{wd}/export/variables", tree)  # a file:// URL is the local path
    np.testing.assert_array_equal(ckpt.load_pytree(os.path.join(wd, "export", "variables"),
                                                   like=tree)["w"], tree["w"])  # fmt: skip
    with ckpt.Checkpointer(f"file://{wd}/checkpoints", overwrite=True) as c:
        assert c.directory == os.path.join(wd, "checkpoints") and c.all_steps() == []
    out = report.write_run_report(os.path.join(wd, "report"), {"model": "m"}, None,
                                  {"report": {"plots": False}})  # fmt: skip
    assert os.path.isfile(out["results_json"]) and " " in out["results_json"]


def test_tensorboard_on_a_url_without_its_library_is_skipped_not_fatal(bucket, caplog):
    pytest.importorskip("tensorboardX")
    try:
        import google.cloud.storage  # noqa: F401

        pytest.skip("google-cloud-storage is installed: tensorboardX would contact GCS")
    except ImportError:
        pass
    assert ckpt.log_scalars("gs://bkt/run/search/tensorboard", {"loss": 1.0}, 1) is False
    assert ckpt.log_scalars("gs://bkt/run/search/tensorboard", {"loss": 0.5}, 2) is False
    assert sum("no TensorBoard events" in r.message for r in caplog.records) == 1
