"""Tests of sculpt_jax.checkpoint: bit-identical round trips, clear errors, corruption fallback."""

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from sculpt_jax import checkpoint as ck
from sculpt_jax import masking


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: object


def _params(seed=0, width=3):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, width)).astype(np.float32)},
        "bn": {"scale": np.ones((width,), np.float32), "bias": rng.normal(size=width).astype("f4")},
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _state(seed=0, width=3, steps=2):
    """A state with a nontrivial optax state: masked(chain(wd, sgd+momentum with a schedule))."""
    params = _params(seed, width)
    masks = jax.tree.map(lambda x: (jnp.arange(x.size).reshape(x.shape) % 3 != 0) * 1.0, params)
    sched = optax.piecewise_constant_schedule(0.1, {3: 0.1})
    tx = masking.masked(
        optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(sched, momentum=0.9)), masks
    )
    opt_state = tx.init(params)
    for _ in range(steps):  # non-zero momentum and count
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return _State(jnp.asarray(steps, jnp.int32), params, opt_state)


def _assert_bit_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb  # same tree types (optax NamedTuples, dataclass) and structure
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_identical_with_optax_types(tmp_path):
    state = _state()
    with ck.Checkpointer(tmp_path / "ckpt") as c:
        c.save(7, state, {"epoch": 7, "acc": np.float32(0.25), "hist": [1, 2], "t": (1, 2)})
        assert c.latest_step() == 7
        restored, meta = c.restore(target=jax.tree.map(jnp.zeros_like, state))
    _assert_bit_identical(state, restored)
    assert isinstance(restored.opt_state, masking.MaskedState)
    assert type(restored.opt_state.inner_state[1][0]) is optax.TraceState
    assert meta == {"epoch": 7, "acc": 0.25, "hist": [1, 2], "t": [1, 2]}


def test_restore_with_abstract_target_and_raw(tmp_path):
    state = _state()
    c = ck.Checkpointer(str(tmp_path / "ckpt"))
    c.save(1, state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, meta = c.restore(1, abstract)
    _assert_bit_identical(state, restored)
    assert meta == {}
    raw, _ = c.restore(1)  # no target: plain containers, same numbers
    np.testing.assert_array_equal(raw["params"]["conv"]["kernel"], state.params["conv"]["kernel"])
    c.close()


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ck.Checkpointer("rel/ckpt")
    assert c.directory == os.path.join(str(tmp_path), "rel", "ckpt")
    c.save(1, {"a": jnp.arange(3)})
    assert os.path.isdir(tmp_path / "rel" / "ckpt" / "1")
    c.close()


def test_max_to_keep_and_unfinished_tmp_dirs_are_not_steps(tmp_path):
    c = ck.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for s in (1, 2, 3):
        c.save(s, {"a": jnp.full((2,), s)}, {"s": s})
    assert c.all_steps() == [2, 3]
    c.close()
    # A save killed mid-write leaves only Orbax's temporary folder: never taken for a step.
    os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234" / "state")
    c = ck.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert c.latest_step() == 3
    state, meta = c.restore(target={"a": jnp.zeros((2,), jnp.int32)})
    assert meta == {"s": 3} and state["a"].tolist() == [3, 3]
    c.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax noise
def test_mismatched_target_names_path_and_fix(tmp_path):
    c = ck.Checkpointer(tmp_path / "ckpt")
    c.save(1, _state(width=3))
    with pytest.raises(
        ValueError, match=r"params/bn/bias. has shape \(3,\) in the checkpoint but \(4,\)"
    ) as e:
        c.restore(target=jax.eval_shape(lambda: _state(0, 4, 2)))  # abstract: no compile
    assert "--workdir" in str(e.value)
    assert isinstance(e.value, ck.CheckpointMismatchError)
    other = {"params": _params(), "extra": jnp.zeros(())}
    with pytest.raises(ck.CheckpointMismatchError, match="not in the checkpoint"):
        c.restore(target=other)
    c.close()


def test_missing_checkpoint_errors(tmp_path):
    c = ck.Checkpointer(tmp_path / "empty")
    assert c.latest_step() is None
    assert c.restore_latest_valid({"a": jnp.zeros(2)}) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        c.restore()
    c.save(1, {"a": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1\]"):
        c.restore(5)
    with pytest.raises(ValueError, match="already exists"):
        c.save(1, {"a": jnp.zeros(2)})
    c.close()


def _corrupt(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state", "d"))  # the array data of the step


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax noise
def test_corrupted_checkpoint_error_and_fallback(tmp_path, caplog):
    target = {"a": jnp.zeros((4,), jnp.float32)}
    c = ck.Checkpointer(tmp_path / "ckpt")
    for s in (1, 2, 3):
        c.save(s, {"a": jnp.full((4,), float(s))}, {"s": s})
    _corrupt(c.step_dir(3))
    with pytest.raises(ck.CorruptCheckpointError) as e:
        c.restore(target=target)
    assert c.step_dir(3) in str(e.value) and "Delete that folder" in str(e.value)

    step, state, meta = c.restore_latest_valid(target)
    assert (step, meta) == (2, {"s": 2}) and state["a"].tolist() == [2.0] * 4
    assert "unreadable" in caplog.text
    assert c.all_steps() == [1, 2, 3] and os.path.isdir(c.step_dir(3))  # nothing deleted

    # Saving step 3 again moves the unreadable folder aside (kept) and writes a good one.
    c.save(3, {"a": jnp.full((4,), 30.0)}, {"s": 30})
    assert [d for d in os.listdir(c.directory) if d.startswith("corrupt-3-")]
    assert c.restore(target=target)[0]["a"].tolist() == [30.0] * 4
    c.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax noise
def test_all_corrupted_raises(tmp_path):
    c = ck.Checkpointer(tmp_path / "ckpt")
    for s in (1, 2):
        c.save(s, {"a": jnp.ones(2)})
        _corrupt(c.step_dir(s))
    with pytest.raises(ck.CorruptCheckpointError, match="all 2 checkpoint steps"):
        c.restore_latest_valid({"a": jnp.ones(2)})
    c.close()


def test_overwrite_discards_old_steps(tmp_path):
    c = ck.Checkpointer(tmp_path / "ckpt")
    c.save(5, {"a": jnp.ones(2)})
    c.close()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    c = ck.Checkpointer(tmp_path / "ckpt", overwrite=True)
    assert c.all_steps() == [] and not os.path.exists(tmp_path / "ckpt" / "5")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    c.close()


def test_save_and_load_pytree(tmp_path):
    tree = {"params": _params(), "masks": masking.ones_masks(_params()), "n": jnp.int32(4)}
    ck.save_pytree(tmp_path / "export", tree)
    ck.save_pytree(tmp_path / "export", tree)  # replaces
    _assert_bit_identical(tree, ck.load_pytree(tmp_path / "export", tree))
    with pytest.raises(ValueError, match="params/bn/bias"):
        ck.load_pytree(tmp_path / "export", {**tree, "params": _params(width=5)})
    with pytest.raises(FileNotFoundError):
        ck.load_pytree(tmp_path / "nothing", tree)


def test_a_pytree_saved_on_two_devices_loads_on_one(tmp_path):
    # An export written on a multi-device host (leaves sharded over its mesh) read where there is
    # one device: before, `load_pytree(path)` failed with orbax's "topology mismatch" and told the
    # user to re-export
    code = f"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sculpt_jax import checkpoint as ck
mesh = Mesh(np.array(jax.devices()), ("data",))
w = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("data")))
b = jax.device_put(jnp.ones(3), NamedSharding(mesh, P()))
ck.save_pytree({str(tmp_path / "tree")!r}, {{"w": w, "b": b}})
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).parents[1]))  # fmt: skip
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    got = ck.load_pytree(tmp_path / "tree")
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(np.asarray(got["b"]), np.ones(3))
    assert jax.device_count() == 1 or got["w"].sharding.num_devices == 1


def test_json_helpers(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    ck.save_json(path, {"a": np.float32(0.5), "b": jnp.arange(3), "c": float("nan"), "d": (1,)})
    assert ck.load_json(path) == {"a": 0.5, "b": [0, 1, 2], "c": "nan", "d": [1]}
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]
    with pytest.raises(FileNotFoundError):
        ck.load_json(tmp_path / "missing.json")

    lines = tmp_path / "m.jsonl"
    ck.append_jsonl(lines, {"epoch": 1})
    ck.append_jsonl(lines, {"epoch": np.int64(2)})
    with open(lines, "a") as f:
        f.write('{"epoch": 3, "tor')  # a line torn by a kill
    assert ck.read_jsonl(lines) == [{"epoch": 1}, {"epoch": 2}]
    ck.write_jsonl(lines, [{"x": 1}])
    assert ck.read_jsonl(lines) == [{"x": 1}]
    assert ck.read_jsonl(tmp_path / "none.jsonl") == []


def _read_events(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TFRecord-framed event files under logdir."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_log_scalars_writes_tensorboard_events_and_is_optional(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    for step, acc in ((1, 0.5), (2, 0.75)):
        assert ck.log_scalars(tmp_path / "tb", {"val_accuracy": acc, "epoch": step, "name": "x",
                                                "nan": float("nan"), "flag": True}, step)
    ck._close_writers()  # tensorboardX writes from a thread: close it before reading the file
    events = _read_events(tmp_path / "tb")
    assert events["val_accuracy"] == [(1, 0.5), (2, 0.75)]
    assert set(events) == {"val_accuracy", "epoch"}  # strings, NaN and bools are not scalars
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed
    assert ck.log_scalars(tmp_path / "none", {"a": 1.0}, 1) is False
    assert not (tmp_path / "none").exists()
