"""sculpt-jax: automatic pattern-based pruning of CNNs and ViTs in JAX/Flax.

AutoSculpt (arXiv 2412.18091) and AutoCompress (arXiv 1907.03141) re-implemented on jax, flax,
optax, jraph, rlax, tensorflow-datasets and orbax-checkpoint.

The public API (`sculpt_jax.api`, imported on first use so that ``import sculpt_jax`` stays cheap):

    result = sculpt_jax.prune(model, variables, train_data, val_data, target_flops=0.5)
    tuned = sculpt_jax.finetune(result, train_data, val_data)
    compact_apply, compact_vars, info = sculpt_jax.compact(tuned)
"""

__version__ = "0.1.0"

_API = ("FinetuneResult", "PruneResult", "as_apply_fn", "compact", "finetune", "prune")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from sculpt_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'sculpt_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
