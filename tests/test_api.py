"""The public API (`sculpt_jax.prune / finetune / compact`) on user models that are not in the zoo:
a Linen CNN (the README example, run as written), an NNX CNN with BatchNorm and dropout, and a
Linen model without a `train` flag fed by an iterator; each prunes to the target, fine-tunes with
pruned weights exactly zero and compacts to equal outputs. Bad input fails before any search."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import sculpt_jax
from sculpt_jax import api, masking
from sculpt_jax import data as data_lib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class LinenNet(nn.Module):
    """A user CNN: two conv + BatchNorm stages and a dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (32, 64):
            x = nn.Conv(width, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean((1, 2)))


class NoTrainFlag(nn.Module):
    """No BatchNorm and no `train` argument in `__call__`."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(48, (3, 3))(x))
        return nn.Dense(10)(x.mean((1, 2)))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(self.drop(x.mean((1, 2))))


@pytest.fixture(scope="module")
def digits():
    """Normalised float digits: (x_train, y_train, x_val, y_val) as a user would hold them."""
    s = data_lib.load_dataset("digits")
    norm = lambda x: np.asarray(data_lib.normalize(x, s.mean, s.std))  # noqa: E731
    return norm(s.train.images), s.train.labels, norm(s.val.images), s.val.labels


def _readme_snippet() -> str:
    section = README.read_text().split("## Your own model: the Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _assert_pruned_and_compact(result, tuned, masked_logits_fn, x):
    assert abs(result.counts["flops_reduction"] - 0.5) <= 0.005 + 1e-9
    assert result.summary["n_evals"] >= 16 and result.candidates
    assert masking.pruned_exactly_zero(tuned.variables, tuned.masks) and tuned.masks is not None
    zeros = sum(int((np.asarray(m) == 0).sum()) for m in jax.tree.leaves(tuned.masks))
    assert zeros > 0
    compact_apply, compact_vars, info = sculpt_jax.compact(tuned)
    assert info["stored_params"] < info["dense_stored_params"]
    np.testing.assert_allclose(np.asarray(compact_apply(compact_vars, x)),
                               np.asarray(masked_logits_fn(x)), atol=2e-4)  # fmt: skip
    # each conv on its measured-fastest lowering: still the masked model
    compact_apply, compact_vars, info = sculpt_jax.compact(tuned, lowering="auto", auto_batch=4)
    assert info["auto_lowering"]["batch"] == 4
    np.testing.assert_allclose(np.asarray(compact_apply(compact_vars, x)),
                               np.asarray(masked_logits_fn(x)), atol=2e-4)  # fmt: skip


def test_readme_python_api_example_on_a_user_linen_cnn(digits, tmp_path, monkeypatch):
    x_train, y_train, x_val, y_val = digits
    model = LinenNet()
    variables = model.init(jax.random.key(0), x_train[:1])
    monkeypatch.chdir(tmp_path)
    ns = {"model": model, "variables": variables, "x_train": x_train, "y_train": y_train,
          "x_val": x_val, "y_val": y_val}  # fmt: skip
    exec(_readme_snippet(), ns)  # noqa: S102 - the documented example as written
    result, tuned = ns["result"], ns["tuned"]
    # 3 layers: removing one of conv1's 32 filters moves the FLOPs by 3 pp; the decoder gives that
    # back with finer filters elsewhere, so every proposal is on budget (0.84 before)
    assert result.summary["on_budget_rate"] == 1.0 and len(result.history) == 8
    assert all(abs(c["flops_reduction"] - 0.5) <= 0.005 + 1e-9 for c in result.candidates)
    # the pruned logits printed by the example are the masked model's
    masked = lambda x: model.apply(masking.apply_masks(tuned.variables, tuned.masks), x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ns["logits"]), np.asarray(masked(x_val[:8])), atol=2e-4)
    _assert_pruned_and_compact(result, tuned, masked, x_val[:5])
    assert len(result.pattern_ids) == result.graph.n_layers
    # a second call with the same workdir resumes the finished search instead of redoing it
    again = sculpt_jax.prune(model, variables, (x_train, y_train), (x_val, y_val),
                             target_flops=0.5, method="ppo", budget=128, workdir="runs/mynet")
    for a, b in zip(jax.tree.leaves(again.masks), jax.tree.leaves(result.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # other settings in the same workdir are refused, or replace it with overwrite=True
    with pytest.raises(ValueError, match="overwrite=True"):
        sculpt_jax.prune(model, variables, (x_train, y_train), (x_val, y_val), method="random",
                         budget=16, workdir="runs/mynet")  # fmt: skip
    fresh = sculpt_jax.prune(model, variables, (x_train, y_train), (x_val, y_val),
                             method="random", budget=16, workdir="runs/mynet", overwrite=True)
    assert fresh.summary["method"] == "random"


def test_nnx_cnn_with_batchnorm_and_dropout(digits):
    x_train, y_train, x_val, y_val = digits
    net = NnxNet(nnx.Rngs(0, dropout=1))
    result = sculpt_jax.prune(net, None, (x_train, y_train), (x_val, y_val), method="random",
                              budget=16, seed=1)  # fmt: skip
    pruned = result.module()
    pruned.eval()
    assert isinstance(pruned, NnxNet)
    tuned = sculpt_jax.finetune(result, (x_train, y_train), (x_val, y_val), epochs=1)
    module = tuned.module()
    module.eval()
    assert np.asarray(module.conv1.kernel[...]).shape == (3, 3, 1, 32)
    _assert_pruned_and_compact(result, tuned, module, x_val[:5])


def test_model_without_train_flag_and_iterator_data(digits):
    x_train, y_train, x_val, y_val = digits
    model = NoTrainFlag()
    variables = model.init(jax.random.key(0), x_train[:1])

    def batches(x, y, n=100):
        return ({"image": x[i:i + n], "label": y[i:i + n]} for i in range(0, len(y), n))

    result = sculpt_jax.prune(model, variables, batches(x_train, y_train),
                              list(batches(x_val, y_val)), method="uniform", budget=16)
    tuned = sculpt_jax.finetune(result, batches(x_train, y_train), (x_val, y_val), epochs=1,
                                batch_size=32)  # fmt: skip
    masked = lambda x: model.apply(masking.apply_masks(tuned.variables, tuned.masks), x)  # noqa: E731
    _assert_pruned_and_compact(result, tuned, masked, x_val[:5])


def test_pure_apply_function(digits):
    x_train, y_train, x_val, y_val = digits
    model = LinenNet()
    variables = model.init(jax.random.key(0), x_train[:1])

    def apply_fn(v, x, train=False, **kw):  # any function with Linen's contract
        return model.apply(v, x * 1.0, train=train, **kw)

    result = sculpt_jax.prune(apply_fn, variables, (x_train, y_train), (x_val, y_val),
                              method="magnitude", budget=16, top_k=1)  # fmt: skip
    assert len(result.candidates) == 1
    tuned = sculpt_jax.finetune(result, (x_train, y_train), (x_val, y_val), epochs=1)
    masked = lambda x: apply_fn(masking.apply_masks(tuned.variables, tuned.masks), x)  # noqa: E731
    _assert_pruned_and_compact(result, tuned, masked, x_val[:5])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="bayes"), "method='bayes' is not one of"),
        (dict(budget=0), "budget must be a number of evaluations"),
        (dict(val=lambda x, y: (x, y[:-1])), "images but 399 labels"),
        (dict(val=lambda x, y: (x, y + 10)), "val_data has label 19 but the model has 10 logits"),
        (dict(val=lambda x, y: (x, y.astype(np.float32))), "labels must be class ids"),
        (dict(val=lambda x, y: 3), "val_data must be (images, labels)"),
        (dict(target_flops=0.999), "is not reachable"),
        (dict(tolerance=1e-5), "tolerance=...)"),
        (dict(overrides={"search.heldout_size": 10_000}), "do not fit in the validation split"),
        (dict(variables={"batch_stats": {}}), "with a 'params' collection"),
        (dict(val=lambda x, y: (x[:, :4], y)), "and val_data images (4, 8, 1) differ in shape"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_search(digits, change, message):
    x_train, y_train, x_val, y_val = digits
    model = LinenNet()
    variables = change.pop("variables", None) or model.init(jax.random.key(0), x_train[:1])
    val = change.pop("val", lambda x, y: (x, y))(x_val, y_val)
    with pytest.raises(ValueError, match=re.escape(message)):
        sculpt_jax.prune(model, variables, (x_train, y_train), val, **change)


def test_nnx_module_with_variables_is_refused_and_api_names_survive_submodule_imports(digits):
    import sculpt_jax.compaction  # noqa: F401 - the modules do not shadow the functions
    import sculpt_jax.training  # noqa: F401

    assert callable(sculpt_jax.finetune) and callable(sculpt_jax.compact)
    x_train, y_train, x_val, y_val = digits
    with pytest.raises(ValueError, match="pass variables=None"):
        sculpt_jax.prune(NnxNet(nnx.Rngs(0)), {"params": {}}, (x_train, y_train), (x_val, y_val))
    with pytest.raises(ValueError, match="module\\(\\) is for NNX models"):
        sculpt_jax.PruneResult(None, None, {}, [], [], {}, None, None, None, np.zeros(1)).module()


def test_data_given_as_python_lists_is_one_pair_not_a_list_of_batches():
    # (list of images, list of labels) was read as an iterable of batches and failed on one image
    x = np.random.default_rng(0).random((6, 4, 4, 1)).astype(np.float32)
    y = [0, 1, 2, 0, 1, 2]
    for data in [(list(x), y), [list(x), np.asarray(y)], (x, y), [(x[:3], y[:3]), (x[3:], y[3:])]]:
        images, labels = api._as_arrays(data, "train_data")
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        api._as_arrays((list(x), y[:5]), "train_data")
