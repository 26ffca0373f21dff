"""Pruning-pattern libraries and kernel-layout helpers (layer 1).

A `PatternLibrary` is a constant array of 0/1 masks. Three libraries are registered:

* ``"reference6"`` (kind ``"filter"``): the 6 per-filter 3x3 masks of the AutoSculpt reference code
  (REFERENCE.md section 2), ids exactly as listed there: 0 removes the whole filter,
  1 = 001/001/001, 2 = 000/000/111, 3 = 011/011/011, 4 = 000/111/111, 5 keeps all. One pattern per
  OUTPUT filter, broadcast over all of that filter's input channels.
* ``"figure8"`` (kind ``"kernel"``): the 8 per-kernel patterns drawn in the paper's framework figure
  (ids 0..7 in the order of REFERENCE.md section 2, each zeroing 4 or 5 of the 9 cells) plus
  keep-all (id 8). There is no remove pattern. One pattern per 2-D kernel (filter x input channel),
  or one per filter broadcast over its input channels.
* ``"vit6"`` (kind ``"region"``): region patterns for ViT attention output projections (REFERENCE.md
  section 2), ONE id per layer: 0 zero all; 1 zero the first 2/3 of the input columns; 2 zero the
  first 2/3 of the output rows; 3 zero the first 1/3 of the columns; 4 the first 1/3 of the rows; 5
  keep all. Its ``masks`` are 3x3 grids over (output thirds, input thirds); `region_mask` expands a
  grid to an ``[out, in]`` matrix for a given kernel shape.

Spatial patterns apply only to 3x3 kernels; every other prunable op (1x1, 5x5, dense) can only keep
or remove a filter (`valid_patterns`). Region libraries apply to dense layers only.

Kernel layout: every prunable kernel is viewed in a *canonical* layout ``[K, I, F]`` (K spatial
cells in row-major order of `Layer.kernel_spatial_axes`, I = in_features / groups input features per
filter in row-major order of `Layer.kernel_in_axes`, F = out_features filters in row-major order of
`Layer.kernel_out_axes`). `kernel_to_canonical` / `canonical_to_kernel` convert (jittable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from sculpt_jax.types import Layer, Path

KINDS = ("filter", "kernel", "region")


@dataclasses.dataclass(frozen=True, eq=False)
class PatternLibrary:
    """A library of pruning patterns (host-side constant; hashable: usable as a static jit arg).

    Attributes:
      name: registry name.
      masks: float32 ``[P, kh, kw]``, 1 = keep, 0 = prune. For kind "region" a ``[P, 3, 3]`` grid
        over (output-row thirds, input-column thirds), see `region_mask`.
      kind: "filter" (one pattern per output filter, broadcast over its input channels), "kernel"
        (one per 2-D kernel; a per-filter id is also accepted and broadcast) or "region" (one per
        layer).
      keep_id: id of the keep-all pattern.
      remove_id: id of the remove-all pattern, or -1 when the library has none.
      kept_cells: int32 ``[P]``, number of kept cells of each mask.
      pruned_fraction: float32 ``[P]``, ``1 - kept_cells / (kh * kw)``.
    """

    name: str
    masks: np.ndarray
    kind: str
    keep_id: int
    remove_id: int
    kept_cells: np.ndarray = dataclasses.field(init=False)
    pruned_fraction: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        masks = np.asarray(self.masks, dtype=np.float32)
        if masks.ndim != 3:
            raise ValueError(
                f"PatternLibrary {self.name!r}: masks must be [P, kh, kw], got shape "
                f"{masks.shape}; stack the 2-D masks along a new leading axis."
            )
        if not np.all((masks == 0) | (masks == 1)):
            raise ValueError(f"PatternLibrary {self.name!r}: masks must contain only 0 and 1.")
        if self.kind not in KINDS:
            raise ValueError(f"PatternLibrary {self.name!r}: kind {self.kind!r} not in {KINDS}.")
        n = masks.shape[0]
        if not 0 <= self.keep_id < n or not np.all(masks[self.keep_id] == 1):
            raise ValueError(f"PatternLibrary {self.name!r}: keep_id must index an all-ones mask.")
        if self.remove_id != -1 and (
            not 0 <= self.remove_id < n or not np.all(masks[self.remove_id] == 0)
        ):
            raise ValueError(
                f"PatternLibrary {self.name!r}: remove_id must index an all-zeros mask or be -1."
            )
        masks.setflags(write=False)
        kept = masks.reshape(n, -1).sum(axis=1).astype(np.int32)
        kept.setflags(write=False)
        frac = (1.0 - kept / masks[0].size).astype(np.float32)
        frac.setflags(write=False)
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "kept_cells", kept)
        object.__setattr__(self, "pruned_fraction", frac)

    @property
    def n_patterns(self) -> int:
        return int(self.masks.shape[0])

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return (int(self.masks.shape[1]), int(self.masks.shape[2]))

    @property
    def has_remove(self) -> bool:
        return self.remove_id != -1

    def _key(self):
        return (
            self.name,
            self.kind,
            self.keep_id,
            self.remove_id,
            self.masks.shape,
            self.masks.tobytes(),
        )

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other) -> bool:
        return isinstance(other, PatternLibrary) and self._key() == other._key()


def _grid(rows: str) -> np.ndarray:
    """'011/011/011' -> float32 [3, 3]."""
    return np.array([[float(c) for c in r] for r in rows.split("/")], dtype=np.float32)


def _from_zero_cells(cells, shape=(3, 3)) -> np.ndarray:
    m = np.ones(shape, dtype=np.float32)
    for r, c in cells:
        m[r, c] = 0.0
    return m


REFERENCE6_ROWS = (
    "000/000/000",
    "001/001/001",
    "000/000/111",
    "011/011/011",
    "000/111/111",
    "111/111/111",
)

FIGURE8_ZERO_CELLS = (
    ((1, 1), (1, 2), (2, 1), (2, 2)),
    ((0, 1), (1, 0), (1, 1), (2, 1)),
    ((0, 1), (1, 0), (1, 1), (1, 2), (2, 1)),
    ((0, 1), (1, 1), (2, 0), (2, 1), (2, 2)),
    ((0, 0), (1, 0), (2, 0), (2, 1), (2, 2)),
    ((0, 1), (0, 2), (1, 2), (2, 2)),
    ((0, 0), (1, 0), (1, 1), (1, 2), (2, 0)),
    ((0, 0), (0, 1), (1, 0), (1, 1)),
)

_REGISTRY: dict[str, Callable[[], PatternLibrary]] = {}
_CACHE: dict[str, PatternLibrary] = {}


def register_library(name: str, factory: Callable[[], PatternLibrary]) -> None:
    """Registers a zero-argument factory building a `PatternLibrary` under `name` (host-only)."""
    if name in _REGISTRY:
        raise ValueError(f"pattern library {name!r} is already registered; pick another name.")
    _REGISTRY[name] = factory


def library_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_library(name: str | PatternLibrary) -> PatternLibrary:
    """The registered library `name` (a `PatternLibrary` is returned unchanged). Host-only."""
    if isinstance(name, PatternLibrary):
        return name
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown pattern library {name!r}; known: {library_names()} "
            "(add one with patterns.register_library)."
        )
    if name not in _CACHE:
        _CACHE[name] = _REGISTRY[name]()
    return _CACHE[name]


register_library(
    "reference6",
    lambda: PatternLibrary(
        "reference6", np.stack([_grid(r) for r in REFERENCE6_ROWS]), "filter", 5, 0
    ),
)
register_library(
    "figure8",
    lambda: PatternLibrary(
        "figure8",
        np.stack([_from_zero_cells(z) for z in FIGURE8_ZERO_CELLS] + [np.ones((3, 3), np.float32)]),
        "kernel",
        8,
        -1,
    ),
)
# vit6 grids over (output-row thirds, input-column thirds): 0 all; 1 first 2/3 columns; 2 first 2/3
# rows; 3 first 1/3 columns; 4 first 1/3 rows; 5 none -- the same grids as reference6.
register_library(
    "vit6",
    lambda: PatternLibrary("vit6", np.stack([_grid(r) for r in REFERENCE6_ROWS]), "region", 5, 0),
)


def region_mask(grid, out_features: int, in_features: int):
    """Expands a 3x3 region grid to an ``[out_features, in_features]`` 0/1 mask (jittable).

    Row ``r`` lies in output third ``(3 * r) // out_features`` and column ``c`` in input third
    ``(3 * c) // in_features``; e.g. "zero the first 2/3 of the rows" zeroes rows
    ``r < 2 * out / 3`` (512 of 768).

    Args: grid float ``[3, 3]`` (numpy or traced). Returns float32 ``[out, in]``.
    """
    rows = (3 * np.arange(out_features)) // out_features
    cols = (3 * np.arange(in_features)) // in_features
    grid = jnp.asarray(grid, jnp.float32)
    return grid[rows[:, None], cols[None, :]]


def is_spatial_3x3(layer: Layer) -> bool:
    return layer.kind == "conv" and tuple(layer.kernel_size) == (3, 3)


def valid_patterns(layer: Layer, library: str | PatternLibrary) -> np.ndarray:
    """Which pattern ids may be used on `layer`: bool ``[P]`` (host-only, static).

    Spatial libraries ("filter"/"kernel") on a 3x3 conv: all. Region libraries on a dense layer:
    all. Everywhere else only keep-all and (when the library has one) remove-all.
    """
    lib = get_library(library)
    full = is_spatial_3x3(layer) if lib.kind in ("filter", "kernel") else layer.kind == "dense"
    if full:
        return np.ones(lib.n_patterns, dtype=bool)
    valid = np.zeros(lib.n_patterns, dtype=bool)
    valid[lib.keep_id] = True
    if lib.has_remove:
        valid[lib.remove_id] = True
    return valid


# ----------------------------------------------------------------------------------------------
# Kernel layout helpers (shared by masking and flops).


def _check_axes(layer: Layer, shape: tuple[int, ...]) -> None:
    axes = tuple(layer.kernel_spatial_axes) + tuple(layer.kernel_in_axes)
    axes += tuple(layer.kernel_out_axes)
    if sorted(axes) != list(range(len(shape))):
        raise ValueError(
            f"layer {layer.name!r}: kernel axes spatial={layer.kernel_spatial_axes} "
            f"in={layer.kernel_in_axes} out={layer.kernel_out_axes} do not partition a kernel of "
            f"shape {shape}; fix the LayerGraph (trace.py)."
        )


def canonical_shape(layer: Layer) -> tuple[int, int, int]:
    """``(K, I, F)`` of `layer`'s canonical kernel layout (host-only)."""
    shape = tuple(layer.kernel_shape)
    _check_axes(layer, shape)
    k = int(np.prod([shape[a] for a in layer.kernel_spatial_axes], dtype=np.int64))
    i = int(np.prod([shape[a] for a in layer.kernel_in_axes], dtype=np.int64))
    f = int(np.prod([shape[a] for a in layer.kernel_out_axes], dtype=np.int64))
    return k, i, f


def kernel_to_canonical(kernel, layer: Layer):
    """A kernel (or kernel-shaped mask) in stored layout -> ``[K, I, F]`` (jittable)."""
    shape = tuple(kernel.shape)
    if shape != tuple(layer.kernel_shape):
        raise ValueError(
            f"layer {layer.name!r}: array of shape {shape} does not match kernel_shape "
            f"{tuple(layer.kernel_shape)}; pass the leaf at {'/'.join(layer.kernel_path)}."
        )
    perm = tuple(layer.kernel_spatial_axes) + tuple(layer.kernel_in_axes)
    perm += tuple(layer.kernel_out_axes)
    return jnp.transpose(kernel, perm).reshape(canonical_shape(layer))


def canonical_to_kernel(arr, layer: Layer):
    """Inverse of `kernel_to_canonical`: ``[K, I, F]`` -> the stored kernel layout (jittable)."""
    shape = tuple(layer.kernel_shape)
    perm = tuple(layer.kernel_spatial_axes) + tuple(layer.kernel_in_axes)
    perm += tuple(layer.kernel_out_axes)
    arr = jnp.reshape(arr, tuple(shape[a] for a in perm))
    return jnp.transpose(arr, tuple(np.argsort(perm)))


def resolve_path(tree: Mapping, path: Path) -> Path:
    """`path` (collection first, as in `LayerGraph`) relative to `tree` (host-only, static).

    `tree` may be a full variables dict ``{"params": ..., "batch_stats": ...}`` or just the params
    tree (then the leading "params" is dropped). Raises KeyError naming the path if it is absent.
    """
    candidates = [path]
    if path and path[0] == "params":
        candidates.append(path[1:])
    for cand in candidates:
        node: Any = tree
        ok = True
        for k in cand:
            if isinstance(node, Mapping) and k in node:
                node = node[k]
            else:
                ok = False
                break
        if ok:
            return cand
    raise KeyError(
        f"path {'/'.join(path)} not found in the given tree (top-level keys: "
        f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}); pass the params "
        "(or variables) of the model the LayerGraph was traced from."
    )
