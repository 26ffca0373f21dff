"""Path-keyed pytree helpers (layer 0).

Paths are tuples of strings (see `sculpt_jax.types`). These helpers work on nested dicts / FrozenDicts
as produced by Flax (Linen `variables`, NNX `nnx.State` converted with `to_pure_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from sculpt_jax.types import Path


def key_to_str(k: Any) -> str:
    """One `jax.tree_util` key entry -> its string name."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_of(keypath: tuple) -> Path:
    """A `jax.tree_util` key path -> a tuple of strings."""
    return tuple(key_to_str(k) for k in keypath)


def flatten_with_paths(tree: Any) -> dict[Path, Any]:
    """Flattens a pytree into an insertion-ordered {path: leaf} dict (host-only)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_of(kp): leaf for kp, leaf in leaves}


def map_with_path(fn, tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` whose function also receives the string path as first argument."""
    return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_of(kp), *xs), tree, *rest)


def get_at(tree: Any, path: Path) -> Any:
    """The leaf (or subtree) of a nested mapping at `path`; KeyError naming the path if absent."""
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"path {'/'.join(path)} not found (missing {'/'.join(path[: i + 1])})")
        node = node[k]
    return node


def set_at(tree: Any, path: Path, value: Any) -> Any:
    """A copy of nested mapping `tree` with the entry at `path` replaced (dicts are copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    out = dict(tree)
    out[head] = set_at(tree[head], rest, value)
    return out


def path_str(path: Path) -> str:
    return "/".join(path)


def tree_size(tree: Any) -> int:
    """Total number of array entries in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
