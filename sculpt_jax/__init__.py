"""sculpt-jax: automatic pattern-based pruning of CNNs and ViTs in JAX/Flax.

AutoSculpt (arXiv 2412.18091) and AutoCompress (arXiv 1907.03141) re-implemented on jax, flax,
optax, jraph, rlax, tensorflow-datasets and orbax-checkpoint.
"""

__version__ = "0.1.0"
