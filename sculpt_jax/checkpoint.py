"""Checkpoints and small files: a thin Orbax wrapper plus JSON helpers (layer 1).

One of the few modules that touch the filesystem (DESIGN.md section 2); everything is host-only.

* `Checkpointer`: numbered steps in one directory, each step an Orbax composite of a pytree
  ("state", `StandardSave`) and a JSON dict ("meta", `JsonSave`). Orbax writes a step into a
  temporary folder and renames it when complete, so a killed save never leaves a half-written step
  that looks valid.
  Restores use an abstract target (`jax.ShapeDtypeStruct` per leaf) so that optax states come back
  as their NamedTuple types and arrays with the target's sharding; round trips are bit-identical.
  A step may also hold an input-pipeline iterator's position ("data"), written by grain's orbax
  handler (`grain.checkpoint.CheckpointHandler`: one JSON file per JAX process), for mid-epoch
  resume (`save(..., data_iterator=it)`, `restore_data(step, it)`).
* `save_pytree` / `load_pytree`: one pytree at one path (exports of final params and masks).
* `save_json` / `load_json` / `append_jsonl` / `read_jsonl` / `write_jsonl`: summaries and metrics,
  `log_scalars`: the same metrics as TensorBoard scalars (tensorboardX, optional),
  written atomically (temporary file + rename) where a whole file is written; a workdir may be
  a URL (`sculpt_jax.paths`: one whole upload per file there, appends rewrite the file).

Many processes (`sharding.initialize_distributed`): every process calls the same functions in the
same order. Orbax saves and restores collectively (all processes call; the workdir must be storage
every host sees: a shared file system or a bucket); the JSON, JSONL and TensorBoard writers write
on process 0 only and do nothing elsewhere.

Errors: restoring into a target of another tree or shape raises `CheckpointMismatchError` (a
ValueError) naming the first differing path; a step that cannot be read raises
`CorruptCheckpointError` naming its folder (delete it to fall back to the previous step, or use
`Checkpointer.restore_latest_valid`, which falls back by itself and never deletes anything).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sculpt_jax import paths
from sculpt_jax.sharding import is_primary as _primary  # process 0 writes JSON, metrics
from sculpt_jax.sharding import sync as _sync
from sculpt_jax.tree_util import path_of

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "CorruptCheckpointError",
    "append_jsonl",
    "log_scalars",
    "load_json",
    "load_pytree",
    "read_jsonl",
    "save_json",
    "save_pytree",
    "to_jsonable",
    "write_jsonl",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree/shapes differ from the restore target (another model or config)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step exists but cannot be read (partial copy, deleted or truncated files)."""


# ----------------------------------------------------------------------------------------------
# JSON helpers.


def to_jsonable(obj: Any) -> Any:
    """Converts numpy/jax scalars and arrays, tuples and nested mappings to plain JSON values.

    Non-finite floats become the strings "nan", "inf", "-inf" (strict JSON has no such numbers).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _savable(tree: Any) -> Any:
    """In a multi-process job, process-local jax.Arrays (a PRNG key's data, host-side results)
    become numpy (Orbax writes those from process 0); global arrays are saved collectively."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree
    )


def _atomic_write_text(path: str, text: str) -> None:
    if not _primary():
        return
    paths.write_text(path, text)  # local: tmp file + rename; a URL: one whole upload


def save_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Writes `obj` (made JSON-able with `to_jsonable`) to `path` atomically (tmp file + rename)."""
    _atomic_write_text(os.fspath(path), json.dumps(to_jsonable(obj), indent=indent) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; FileNotFoundError / ValueError naming the path when absent / invalid."""
    path = paths.resolve(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"JSON file {path!r} not found; check the path or the --workdir.")
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}); delete or regenerate it.") from e


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one JSON line (a metrics record) to `path`, creating folders as needed."""
    if not _primary():
        return
    paths.append_text(path, json.dumps(to_jsonable(record)) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[Mapping[str, Any]]) -> None:
    """Replaces `path` by the given JSON lines, atomically (an empty list truncates the file)."""
    _atomic_write_text(os.fspath(path), "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))


_TB_WRITERS: dict[str, Any] = {}  # logdir -> open tensorboardX SummaryWriter
_TB_STATE = {"warned": False}


def _close_writers() -> None:
    for w in _TB_WRITERS.values():
        if w is not None:
            w.close()
    _TB_WRITERS.clear()


def _tb_url_ok(logdir: str) -> str:
    """`logdir`, or ImportError when tensorboardX cannot write that URL (it writes gs:// with
    google-cloud-storage, s3:// with boto3, and other URLs not at all)."""
    if paths.is_url(logdir):
        import importlib.util

        need = {"gs": "google.cloud.storage", "s3": "boto3"}.get(logdir.split(":", 1)[0])
        try:
            ok = need is not None and importlib.util.find_spec(need) is not None
        except ImportError:  # a parent package (google.cloud) is missing
            ok = False
        if not ok:
            raise ImportError(f"tensorboardX needs {need or 'a local folder'} for this URL")
    return logdir


def log_scalars(logdir: str | os.PathLike, record: Mapping[str, Any], step: int) -> bool:
    """Writes the finite numeric fields of a metrics record as TensorBoard scalars at `step`
    (tensorboardX event files under `logdir`; ``tensorboard --logdir <workdir>`` shows every
    stage). tensorboardX is optional: without it nothing is written (one INFO line says so).
    Returns whether it wrote (never on a process other than 0)."""
    if not _primary():
        return False
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if not _TB_STATE["warned"]:
            log.info("tensorboardX is not installed: metrics go to metrics.jsonl only "
                     "(pip install tensorboardX for TensorBoard event files)")  # fmt: skip
            _TB_STATE["warned"] = True
        return False
    key = paths.resolve(logdir)
    if key not in _TB_WRITERS:
        if not _TB_WRITERS:
            atexit.register(_close_writers)
        try:
            _TB_WRITERS[key] = SummaryWriter(_tb_url_ok(key))
        except Exception as e:  # noqa: BLE001 - metrics.jsonl still has every record
            if not paths.is_url(key):
                raise
            log.warning("no TensorBoard events at %s (%s: %s); metrics.jsonl has them", key,
                        type(e).__name__, e)  # fmt: skip
            _TB_WRITERS[key] = None
    w = _TB_WRITERS[key]
    if w is None:
        return False
    for k, v in record.items():
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            if np.isfinite(float(v)):
                w.add_scalar(k, float(v), int(step))
    w.flush()
    return True


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file ([] if it does not exist); a torn last line is skipped."""
    path = paths.resolve(path)
    if not paths.isfile(path):
        return []
    out = []
    lines = paths.read_text(path).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a write cut short by a kill
                log.warning("%s: skipping a torn last line", path)
                break
            raise ValueError(f"{path!r} line {i + 1} is not valid JSON ({e})") from e
    return out


# ----------------------------------------------------------------------------------------------
# Tree comparison for clear mismatch errors.


def _abstract(x: Any) -> Any:
    """A leaf -> `jax.ShapeDtypeStruct` (keeps its sharding); Python scalars pass through."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return ocp.utils.to_shape_dtype_struct(x)
    return x


def _shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for kp, leaf in leaves:
        shape = tuple(getattr(leaf, "shape", ()) or ())
        dtype = getattr(leaf, "dtype", None)
        out["/".join(path_of(kp))] = (shape, str(np.dtype(dtype)) if dtype is not None else "")
    return out


def tree_mismatch(stored: Any, target: Any) -> str | None:
    """The first difference between a stored tree (Orbax metadata or arrays) and a target.

    Paths are compared as "/"-joined strings (NamedTuple fields by name, sequences by index), so an
    optax state compares equal to its on-disk dict/list form. Returns None when structure, shapes
    and dtypes agree, else one sentence naming the first differing path.
    """
    s, t = _shapes_by_path(stored), _shapes_by_path(target)
    for path, (shape, dtype) in t.items():
        if path not in s:
            return f"path {path!r} of the target is not in the checkpoint"
        s_shape, s_dtype = s[path]
        if s_shape != shape:
            return f"path {path!r} has shape {s_shape} in the checkpoint but {shape} in the target"
        if dtype and s_dtype and s_dtype != dtype:
            return f"path {path!r} has dtype {s_dtype} in the checkpoint but {dtype} in the target"
    for path in s:
        if path not in t:
            return f"path {path!r} of the checkpoint is not in the target"
    return None


_MISMATCH_HINTS = ("tree structures do not match", "not compatible with the stored shape")


# ----------------------------------------------------------------------------------------------
# The step checkpointer.


class Checkpointer:
    """Numbered checkpoints (pytree + JSON meta) in one directory, around `ocp.CheckpointManager`.

    Args:
      directory: folder of the step subfolders (made absolute, or a gs:// URL; created if missing).
      max_to_keep: newest steps kept; older ones are removed by Orbax after each save.
      overwrite: remove every existing step (and unfinished or quarantined ones) in `directory`
        first; other files there are left alone.
      async_save: let Orbax write in a background thread (call `wait()` before reading). Off by
        default: train steps donate their state buffers, so a blocking save is the safe choice.

    Host-only. Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        *,
        overwrite: bool = False,
        async_save: bool = False,
    ):
        self.directory = paths.resolve(directory)  # a local folder or a URL, never abspath-ed
        if paths.exists(self.directory) and not paths.isdir(self.directory):
            raise NotADirectoryError(
                f"checkpoint directory {self.directory!r} is a file; pass a folder (--workdir)."
            )
        if overwrite and paths.isdir(self.directory) and _primary():
            for name in paths.listdir(self.directory):  # only what checkpointing wrote
                if name.isdigit() or ".orbax-checkpoint-tmp" in name or name.startswith("corrupt-"):
                    paths.as_path(os.path.join(self.directory, name)).rmtree()
        if overwrite:
            _sync(f"sculpt_jax:overwrite:{self.directory}")  # others wait for the removal
        paths.makedirs(self.directory)
        self._bad_steps: set[int] = set()
        self._mgr = self._make_manager(max_to_keep, async_save)
        self._max_to_keep, self._async = max_to_keep, async_save

    def _make_manager(self, max_to_keep, async_save) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        grain_ckpt = _grain_checkpoint()
        if grain_ckpt is not None:
            handlers["data"] = grain_ckpt.CheckpointHandler()
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- queries ----------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (temporary folders of unfinished saves are not steps)."""
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        """The folder holding `step`."""
        return os.path.join(self.directory, str(int(step)))

    # -- save -------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        *,
        data_iterator: Any = None,
    ) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON-able dict) as `step`, atomically.

        ``data_iterator``: a grain iterator whose ``get_state()`` is saved beside them ("data", one
        JSON file per process, grain's orbax handler); `restore_data` puts it back.

        A step found unreadable by this object earlier (see `restore_latest_valid`) is moved aside
        to ``corrupt-<step>-<time>`` (not deleted) before being written again.

        Raises:
          ValueError: `step` already exists (a finished run or another job's folder: use a fresh
            --workdir or --overwrite).
        """
        step = int(step)
        if step in self.all_steps():
            if step not in self._bad_steps:
                raise ValueError(
                    f"checkpoint step {step} already exists in {self.directory!r}; use a fresh "
                    "--workdir (or --overwrite to discard the old run)."
                )
            self._quarantine(step)
        items = {
            "state": ocp.args.StandardSave(_savable(state)),
            "meta": ocp.args.JsonSave(to_jsonable(dict(meta or {}))),
        }
        if data_iterator is not None:
            grain_ckpt = _grain_checkpoint()
            if grain_ckpt is None:
                raise ValueError("saving a data iterator needs grain (pip install grain).")
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        self._mgr.save(step, args=ocp.args.Composite(**items))
        if not self._async:
            self._mgr.wait_until_finished()

    def _quarantine(self, step: int) -> None:
        src = self.step_dir(step)
        dst = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        if _primary():
            paths.as_path(src).rename(dst)  # a copy + delete on object stores
        _sync(f"sculpt_jax:quarantine:{src}")
        log.warning("moved unreadable checkpoint %s aside to %s", src, dst)
        self._bad_steps.discard(step)
        self._mgr.reload()

    # -- restore ----------------------------------------------------------------------------
    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory!r}; train first or point --workdir at a run."
            )
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"checkpoint step {step} not found in {self.directory!r}; available steps: {steps}."
            )
        return int(step)

    def _corrupt(self, step: int, err: BaseException) -> CorruptCheckpointError:
        text = str(err).strip()
        first = text.splitlines()[0].split(" [tensorstore_spec")[0][:300] if text else ""
        return CorruptCheckpointError(
            f"checkpoint {self.step_dir(step)!r} is unreadable ({type(err).__name__}: {first}). "
            "Delete that folder to fall back to the previous step (restore_latest_valid does so "
            "without deleting), or start over with a fresh --workdir."
        )

    def _mismatch(self, step: int, what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"checkpoint {self.step_dir(step)!r} does not match the restore target: {what}. It was "
            "written by another model or configuration; use a fresh --workdir (or --overwrite)."
        )

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta of `step` (default: latest) without reading the arrays."""
        step = self._check_step(step)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out.meta)
        except Exception as e:
            raise self._corrupt(step, e) from e

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """Restores `(state, meta)` of `step` (default: the latest).

        Args:
          step: the step; None for the latest.
          target: a pytree like the saved state (arrays or `jax.ShapeDtypeStruct`s): the restored
            state gets its tree types (optax NamedTuples, flax dataclasses), dtypes and shardings.
            None restores raw nested dicts/lists.
        Raises:
          FileNotFoundError: no checkpoint, or no such step.
          CheckpointMismatchError (ValueError): `target` differs in tree structure, shapes or dtypes
            (the message names the first differing path).
          CorruptCheckpointError: the step folder cannot be read.
        """
        step = self._check_step(step)
        abstract = None
        if target is not None:
            abstract = jax.tree.map(_abstract, target)
            try:
                md = self._mgr.item_metadata(step)["state"]
            except Exception as e:
                raise self._corrupt(step, e) from e
            if md is not None:
                what = tree_mismatch(getattr(md, "tree", md), abstract)
                if what:
                    raise self._mismatch(step, what)
        try:
            out = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            msg = str(e)
            if abstract is not None and any(h in msg for h in _MISMATCH_HINTS):
                raise self._mismatch(step, msg.strip().splitlines()[0]) from e
            raise self._corrupt(step, e) from e
        return out.state, dict(out.meta)

    def has_data(self, step: int) -> bool:
        """Whether `step` holds a data-iterator state."""
        return paths.isdir(os.path.join(self.step_dir(step), "data"))

    def restore_data(self, step: int, iterator: Any) -> Any:
        """Sets `iterator` (a fresh grain iterator of the same pipeline) to the position saved in
        `step` and returns it.

        Raises:
          FileNotFoundError: the step holds no data state (saved without ``data_iterator``).
          CorruptCheckpointError: the state cannot be read or does not fit the iterator.
        """
        step = self._check_step(step)
        grain_ckpt = _grain_checkpoint()
        if grain_ckpt is None or not self.has_data(step):
            raise FileNotFoundError(f"checkpoint {self.step_dir(step)!r} holds no data state.")
        try:
            out = self._mgr.restore(
                step, args=ocp.args.Composite(data=grain_ckpt.CheckpointRestore(iterator))
            )
        except Exception as e:
            raise self._corrupt(step, e) from e
        return out.data

    def restore_latest_valid(self, target: Any = None) -> tuple[int, Any, dict] | None:
        """`(step, state, meta)` of the newest READABLE step, or None when there is no step.

        Unreadable steps are skipped with a warning (never deleted; the next `save` of such a step
        moves it aside). A target mismatch is not corruption and is raised at once.

        Raises:
          CorruptCheckpointError: every step is unreadable.
          CheckpointMismatchError: the newest readable step does not match `target`.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, target)
            except CorruptCheckpointError as e:
                self._bad_steps.add(step)
                errors.append(str(e))
                log.warning("%s; falling back to the previous step.", e)
                continue
            return step, state, meta
        if errors:
            raise CorruptCheckpointError(
                f"all {len(steps)} checkpoint steps in {self.directory!r} are unreadable; start "
                f"over with a fresh --workdir (or --overwrite). First error: {errors[0]}"
            )
        return None

    # -- lifecycle --------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until pending (async) saves are written."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _grain_checkpoint():
    """grain's orbax handler module, or None when grain is not installed (it is optional here)."""
    try:
        import grain.checkpoint as grain_ckpt
    except ImportError:
        return None
    return grain_ckpt if hasattr(grain_ckpt, "CheckpointSave") else None


# ----------------------------------------------------------------------------------------------
# One pytree at one path.


def save_pytree(path: str | os.PathLike, tree: Any) -> None:
    """Saves one pytree of arrays at folder `path` (absolute-ised; replaced if it exists)."""
    path = paths.resolve(path)
    paths.makedirs(os.path.dirname(path))
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, _savable(tree), force=True)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def _stored_on_this_host(ckptr, path: str) -> Any:
    """The stored tree's shapes and dtypes, each placed on this process's first device: a tree
    saved on another topology (an export from an 8-GPU host read on a laptop) loads as it is."""
    try:
        md = ckptr.metadata(path)
    except Exception as e:
        raise CorruptCheckpointError(f"{path!r} is unreadable ({e}); re-export it.") from e
    md = getattr(md, "item_metadata", md)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here)
                        if hasattr(m, "shape") and hasattr(m, "dtype") else m,
                        getattr(md, "tree", md))  # fmt: skip


def load_pytree(path: str | os.PathLike, like: Any = None) -> Any:
    """Loads a pytree saved by `save_pytree`.

    Args:
      path: the folder given to `save_pytree`.
      like: a pytree of the expected structure (arrays or ShapeDtypeStructs); None gives raw dicts
        of arrays on this process's first device, whatever devices the tree was saved from.
    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointMismatchError: `like` differs from the stored tree (first differing path named).
      CorruptCheckpointError: the folder cannot be read.
    """
    path = paths.resolve(path)
    if not paths.isdir(path):
        raise FileNotFoundError(f"no saved pytree at {path!r}; check the path (or export first).")
    ckptr = ocp.StandardCheckpointer()
    try:
        abstract = _stored_on_this_host(ckptr, path) if like is None else jax.tree.map(_abstract, like)
        if like is not None:
            try:
                md = ckptr.metadata(path)
            except Exception as e:
                raise CorruptCheckpointError(f"{path!r} is unreadable ({e}); re-export it.") from e
            md = getattr(md, "item_metadata", md)
            what = tree_mismatch(getattr(md, "tree", md), abstract) if md is not None else None
            if what:
                raise CheckpointMismatchError(
                    f"{path!r} does not match the expected tree: {what}; was it exported from "
                    "another model?"
                )
        try:
            return ckptr.restore(path, abstract)
        except Exception as e:
            msg = str(e)
            if like is not None and any(h in msg for h in _MISMATCH_HINTS):
                raise CheckpointMismatchError(f"{path!r}: {msg.splitlines()[0]}") from e
            raise CorruptCheckpointError(f"{path!r} is unreadable ({e}); re-export it.") from e
    finally:
        ckptr.close()
