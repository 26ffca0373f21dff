"""Pattern libraries, validity and kernel-layout helpers (sculpt_jax.patterns)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sculpt_jax import patterns as pat
from sculpt_jax.types import InputSource, Layer


def _layer(
    kind="conv",
    k=3,
    cin=4,
    cout=5,
    groups=1,
    shape=None,
    spatial=(0, 1),
    in_axes=(2,),
    out_axes=(3,),
):
    ks = (k, k) if kind == "conv" else ()
    if shape is None:
        shape = (*ks, cin // groups, cout) if kind == "conv" else (cin, cout)
    if kind == "dense" and spatial == (0, 1):
        spatial, in_axes, out_axes = (), (0,), (1,)
    cells = int(np.prod(ks)) if ks else 1
    return Layer(
        index=0,
        name="l",
        kind=kind,
        kernel_path=("params", "l", "kernel"),
        affine_paths=(),
        kernel_shape=tuple(shape),
        kernel_spatial_axes=spatial,
        kernel_in_axes=in_axes,
        kernel_out_axes=out_axes,
        in_features=cin,
        out_features=cout,
        groups=groups,
        kernel_size=ks,
        strides=(1,) * len(ks),
        dilation=(1,) * len(ks),
        padding=((k // 2, k // 2),) * len(ks),
        in_spatial=(4,) * len(ks),
        out_spatial=(4,) * len(ks),
        n_positions=16 if ks else 1,
        macs=(16 if ks else 1) * cells * (cin // groups) * cout,
        sources=(InputSource(-1, tuple(range(cin))),),
        depth=0,
    )


def test_reference6_matches_table():
    lib = pat.get_library("reference6")
    rows = [
        "000/000/000",
        "001/001/001",
        "000/000/111",
        "011/011/011",
        "000/111/111",
        "111/111/111",
    ]
    for pid, r in enumerate(rows):
        want = np.array([[int(c) for c in row] for row in r.split("/")], np.float32)
        np.testing.assert_array_equal(lib.masks[pid], want)
    assert lib.masks.dtype == np.float32 and lib.masks.shape == (6, 3, 3)
    np.testing.assert_array_equal(lib.kept_cells, [0, 3, 3, 6, 6, 9])
    np.testing.assert_allclose(lib.pruned_fraction, [1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0], atol=1e-7)
    assert (lib.kind, lib.keep_id, lib.remove_id) == ("filter", 5, 0)


def test_figure8_zero_cells():
    lib = pat.get_library("figure8")
    assert lib.masks.shape == (9, 3, 3) and lib.kind == "kernel"
    zeros = [
        {(1, 1), (1, 2), (2, 1), (2, 2)},
        {(0, 1), (1, 0), (1, 1), (2, 1)},
        {(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)},
        {(0, 1), (1, 1), (2, 0), (2, 1), (2, 2)},
        {(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)},
        {(0, 1), (0, 2), (1, 2), (2, 2)},
        {(0, 0), (1, 0), (1, 1), (1, 2), (2, 0)},
        {(0, 0), (0, 1), (1, 0), (1, 1)},
    ]
    for pid, z in enumerate(zeros):
        got = {(int(r), int(c)) for r, c in np.argwhere(lib.masks[pid] == 0)}
        assert got == z, pid
    assert np.all(lib.masks[8] == 1) and lib.keep_id == 8 and lib.remove_id == -1
    np.testing.assert_array_equal(lib.kept_cells, [5, 5, 4, 4, 4, 5, 4, 5, 9])


@pytest.mark.parametrize("n_out,n_in", [(768, 768), (10, 7), (3, 3)])
def test_vit6_regions(n_out, n_in):
    lib = pat.get_library("vit6")
    assert lib.kind == "region"
    r2, c2 = -(-2 * n_out // 3), -(-2 * n_in // 3)  # ceil(2n/3): rows with 3r < 2n
    r1, c1 = -(-n_out // 3), -(-n_in // 3)
    want = {
        0: np.zeros((n_out, n_in)),
        5: np.ones((n_out, n_in)),
    }
    m = np.ones((n_out, n_in))
    m[:, :c2] = 0
    want[1] = m
    m = np.ones((n_out, n_in))
    m[:r2] = 0
    want[2] = m
    m = np.ones((n_out, n_in))
    m[:, :c1] = 0
    want[3] = m
    m = np.ones((n_out, n_in))
    m[:r1] = 0
    want[4] = m
    for pid, w in want.items():
        got = np.asarray(pat.region_mask(lib.masks[pid], n_out, n_in))
        np.testing.assert_array_equal(got, w, err_msg=str(pid))
    if n_out == 768:
        assert r2 == 512 and r1 == 256


def test_region_mask_jittable_with_traced_id():
    lib = pat.get_library("vit6")
    f = jax.jit(lambda i: pat.region_mask(jnp.asarray(lib.masks)[i], 6, 6))
    np.testing.assert_array_equal(f(3)[:, :2], 0)
    np.testing.assert_array_equal(f(3)[:, 2:], 1)


def test_valid_patterns():
    ref = pat.get_library("reference6")
    assert pat.valid_patterns(_layer("conv", 3), ref).all()
    for layer in (_layer("conv", 1), _layer("conv", 5), _layer("dense")):
        np.testing.assert_array_equal(pat.valid_patterns(layer, "reference6"), [1, 0, 0, 0, 0, 1])
        np.testing.assert_array_equal(
            pat.valid_patterns(layer, "figure8"), [0] * 8 + [1]
        )  # no remove pattern in figure8
    assert pat.valid_patterns(_layer("conv", 3, cin=4, cout=4, groups=4), ref).all()
    assert pat.valid_patterns(_layer("dense"), "vit6").all()
    np.testing.assert_array_equal(pat.valid_patterns(_layer("conv", 3), "vit6"), [1, 0, 0, 0, 0, 1])


def test_registry_and_hashing():
    with pytest.raises(ValueError, match="unknown pattern library 'nope'"):
        pat.get_library("nope")
    with pytest.raises(ValueError, match="already registered"):
        pat.register_library("reference6", lambda: None)
    a = pat.get_library("reference6")
    b = pat.PatternLibrary("reference6", a.masks.copy(), "filter", 5, 0)
    assert a == b and hash(a) == hash(b) and a != pat.get_library("vit6")
    with pytest.raises(ValueError, match="only 0 and 1"):
        pat.PatternLibrary("bad", np.full((2, 3, 3), 0.5), "filter", 0, -1)
    with pytest.raises(ValueError, match="keep_id"):
        pat.PatternLibrary("bad", np.zeros((2, 3, 3)), "filter", 0, -1)

    # usable as a static jit argument
    calls = []

    def f(lib, x):
        calls.append(1)
        return x * lib.kept_cells.sum()

    g = jax.jit(f, static_argnums=0)
    assert float(g(a, 1.0)) == 27.0 and float(g(b, 2.0)) == 54.0 and len(calls) == 1


@pytest.mark.parametrize(
    "shape,spatial,in_axes,out_axes,kind",
    [
        ((3, 3, 4, 5), (0, 1), (2,), (3,), "conv"),  # flax HWIO
        ((5, 4, 3, 3), (2, 3), (1,), (0,), "conv"),  # torch OIHW
        ((4, 5), (), (0,), (1,), "dense"),
        ((2, 2, 5), (), (0, 1), (2,), "dense"),  # DenseGeneral out-projection (heads, dh, D)
        ((4, 1, 5), (), (0,), (1, 2), "dense"),  # DenseGeneral (D, heads, dh)
    ],
)
def test_canonical_roundtrip(shape, spatial, in_axes, out_axes, kind):
    cin = int(np.prod([shape[a] for a in in_axes]))
    cout = int(np.prod([shape[a] for a in out_axes]))
    layer = _layer(
        kind, 3, cin, cout, shape=shape, spatial=spatial, in_axes=in_axes, out_axes=out_axes
    )
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    c = pat.kernel_to_canonical(x, layer)
    k = 9 if spatial else 1
    assert c.shape == (k, cin, cout) == pat.canonical_shape(layer)
    np.testing.assert_array_equal(pat.canonical_to_kernel(c, layer), x)
    if shape == (5, 4, 3, 3):  # OIHW: canonical[h*3+w, i, o] == x[o, i, h, w]
        assert c[1 * 3 + 2, 3, 4] == x[4, 3, 1, 2]


def test_canonical_errors():
    layer = _layer("conv", 3)
    with pytest.raises(ValueError, match="does not match kernel_shape"):
        pat.kernel_to_canonical(jnp.zeros((3, 3, 4, 6)), layer)
    bad = _layer("conv", 3, spatial=(0,))
    with pytest.raises(ValueError, match="do not partition"):
        pat.canonical_shape(bad)


def test_resolve_path():
    params = {"conv": {"kernel": 1}}
    variables = {"params": params, "batch_stats": {}}
    assert pat.resolve_path(variables, ("params", "conv", "kernel")) == ("params", "conv", "kernel")
    assert pat.resolve_path(params, ("params", "conv", "kernel")) == ("conv", "kernel")
    with pytest.raises(KeyError, match="params/conv/bias not found"):
        pat.resolve_path(params, ("params", "conv", "bias"))
