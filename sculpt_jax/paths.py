"""Workdir paths: local folders, mounted drives and object-store URLs, through `etils.epath` (layer 0).

One of the few modules that touch the filesystem (DESIGN.md section 2); everything is host-only.
Every file we write under a workdir (config.json, results, JSON lines, reports, plots, exports) is
named by a string from `resolve` and read or written with the helpers below; Orbax receives the
same string (it wraps it in an `epath.Path` itself).

* A local path (``runs/x``, ``/content/drive/MyDrive/my run``: a mounted Google Drive is a local
  path) is made absolute, as ``os.path.abspath`` does; spaces and other characters are kept.
* ``file:///abs/path`` is that local path.
* A URL of a scheme epath serves (``gs://``, ``s3://``, ``az://``, ``hf://``) is kept as it is (never
  ``abspath``-ed, which would turn ``gs://b/run`` into ``<cwd>/gs:/b/run``). epath reaches it through
  TensorFlow's ``tf.io.gfile`` when TensorFlow is installed, else through fsspec (``pip install
  gcsfs`` for gs://, ``s3fs`` for s3://), with that library's credentials.
* Any other ``scheme://`` raises `WorkdirError` (it would otherwise become a local folder named
  ``scheme:``).

Object stores have no rename and no append: on a URL, `write_text` uploads the object in one piece
(GCS and S3 show either the old or the new object, never a part), and `append_text` rewrites the
whole (small) file. Local files are written to a temporary file and renamed (atomic) and appended
in place.

`check_workdir` is called before any long work: it creates the workdir and writes and removes a
probe file, so a URL that cannot be opened fails at once with one error naming the URL and the fix.
It never deletes anything it did not write.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

from etils import epath

__all__ = [
    "WorkdirError",
    "append_text",
    "as_path",
    "check_workdir",
    "exists",
    "is_url",
    "isdir",
    "isfile",
    "listdir",
    "makedirs",
    "open_write",
    "read_text",
    "resolve",
    "write_text",
]

# Schemes `epath.Path` serves (etils.epath.gpath); the fix to print when each cannot be reached.
URL_SCHEMES = {
    "gs": "pip install gcsfs (or tensorflow) and give Google Cloud credentials "
          "(gcloud auth application-default login)",
    "s3": "pip install s3fs (or tensorflow) and give AWS credentials",
    "az": "pip install adlfs and give Azure credentials",
    "hf": "pip install huggingface_hub and log in (huggingface-cli login)",
}  # fmt: skip
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


class WorkdirError(OSError):
    """A workdir (or a path under it) that cannot be opened or written; the message says why."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a ``scheme://...`` URL (``file://`` included)."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """The string form we store and pass on: an absolute local path, or the URL unchanged.

    Raises:
      WorkdirError: a ``scheme://`` epath cannot serve (the message lists those it can).
    """
    path = os.fspath(path)
    m = _URL.match(path)
    if not m:
        return os.path.abspath(path)  # as before: no ~ expansion (the shell does that)
    scheme = m.group(1).lower()
    if scheme == "file":
        return os.path.abspath(path[len("file://") :])
    if scheme not in URL_SCHEMES:
        raise WorkdirError(
            f"{path!r}: the URL scheme {scheme}:// is not supported for workdirs and checkpoints; "
            f"use {', '.join(s + '://' for s in URL_SCHEMES)} or a local (or mounted, e.g. "
            "/content/drive/MyDrive/...) folder"
        )
    return path.rstrip("/")


def as_path(path: str | os.PathLike) -> epath.Path:
    """`resolve`d `path` as an `etils.epath.Path`."""
    return epath.Path(resolve(path))


def _fix(path: str) -> str:
    m = _URL.match(path)
    if m:
        return URL_SCHEMES[m.group(1).lower()] + ", or use a local or mounted folder"
    return "check that the folder exists and is writable, or pass another --workdir"


@contextlib.contextmanager
def _served(path: str) -> Iterator[None]:
    """A URL whose library is missing (epath raises ImportError) -> one WorkdirError with the fix."""
    try:
        yield
    except ImportError as e:
        raise WorkdirError(f"{path!r} cannot be opened ({e}); {_fix(path)}") from e


def exists(path: str | os.PathLike) -> bool:
    with _served(os.fspath(path)):
        return as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    with _served(os.fspath(path)):
        return as_path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    """Whether a file (not a folder) is at `path`."""
    p = as_path(path)
    with _served(str(p)):
        return p.exists() and not p.is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in folder `path`, sorted ([] when it does not exist)."""
    p = as_path(path)
    with _served(str(p)):
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path: str | os.PathLike) -> None:
    with _served(os.fspath(path)):
        as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
    with _served(os.fspath(path)):
        return as_path(path).read_text(encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` whole: local files via a temporary file, fsync and rename (atomic);
    URLs as one upload (object stores publish an object only when it is complete)."""
    path = resolve(path)
    if is_url(path):
        p = epath.Path(path)
        with _served(path):
            p.parent.mkdir(parents=True, exist_ok=True)
            with p.open("w") as f:
                f.write(text)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to `path` (created with its folders if missing). Object stores cannot append:
    on a URL the file is read and uploaded again whole (fine for metrics logs of a few MB)."""
    path = resolve(path)
    if is_url(path):
        p = epath.Path(path)
        with _served(path):
            old = p.read_text(encoding="utf-8") if p.exists() else ""
        write_text(path, old + text)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def open_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object writing `path` whole (folders created), e.g. for ``fig.savefig(f)``; local
    files are written to a temporary name and renamed when the block ends without error."""
    path = resolve(path)
    if is_url(path):
        p = epath.Path(path)
        with _served(path):
            p.parent.mkdir(parents=True, exist_ok=True)
            f = p.open(mode)
        with f:
            yield f
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Seconds the gs:// array-storage probe may take (a reachable bucket answers in well under one).
ARRAY_PROBE_TIMEOUT_S = 30.0


def _kvstore_spec(path: str) -> dict:
    """The tensorstore key-value store Orbax writes a gs:// path's arrays to (its gcs driver)."""
    bucket, _, key = path[len("gs://") :].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key + "/" if key else ""}


def _probe_arrays(path: str, name: str) -> None:
    """Writes and deletes one key through tensorstore, which Orbax uses for checkpoint ARRAYS and
    which does not go through epath/fsspec (its own gcs driver and credentials)."""
    if not path.startswith("gs://"):
        return
    import tensorstore as ts

    t = ARRAY_PROBE_TIMEOUT_S
    try:
        kv = ts.KvStore.open(_kvstore_spec(path)).result(timeout=t)
        kv.write(name, b"ok").result(timeout=t)
        kv.delete_range(ts.KvStore.KeyRange(name, name + "\0")).result(timeout=t)
    except Exception as e:  # noqa: BLE001 - re-raised with what was being written
        why = str(e).strip() or f"no answer within {t:g} s (no credentials or no network?)"
        raise OSError(f"checkpoint arrays (tensorstore's gcs driver): {why}") from e


def check_workdir(workdir: str | os.PathLike) -> str:
    """Creates `workdir` if needed and writes and removes a small probe file there; returns the
    `resolve`d string. Call it before any long work. Nothing already in the workdir is touched.

    On gs:// it also writes and deletes a probe through tensorstore (Orbax's array storage, its own
    gcs driver and credentials: Application Default Credentials), waiting at most
    `ARRAY_PROBE_TIMEOUT_S` (without credentials or network tensorstore retries, it does not fail).

    Raises:
      WorkdirError: the scheme is not served, its library is missing, or the folder or bucket
        cannot be created or written (one message naming the path, the cause and the fix).
    """
    path = resolve(workdir)
    probe = epath.Path(path) / f".sculpt_jax-probe-{uuid.uuid4().hex[:12]}"
    try:
        epath.Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        if probe.read_text() != "ok\n":
            raise OSError("the probe file read back differently")
        probe.unlink()
        _probe_arrays(path, probe.name + ".arrays")
    except Exception as e:  # noqa: BLE001 - re-raised as one clear error
        if isinstance(e, WorkdirError):
            raise
        fix = _fix(path)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise WorkdirError(
            f"workdir {path!r} cannot be opened for writing ({type(e).__name__}: {first}); {fix}"
        ) from e
    return path
