"""Hand-built `Layer`s for unit tests of masks and FLOPs (hand-countable, no tracing)."""

from sculpt_jax.types import InputSource, Layer


def conv_layer(
    index, name, cin, cout, k=3, hw=4, stride=1, groups=1, sources=None, affine=(), bias=False
):
    """A flax-HWIO conv `Layer` with torch-style padding k//2."""
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    aff = tuple(("params", a, leaf) for a in affine for leaf in ("scale", "bias"))
    if bias:
        aff = (("params", name, "bias"), *aff)
    return Layer(
        index=index,
        name=name,
        kind="conv",
        kernel_path=("params", name, "kernel"),
        affine_paths=aff,
        kernel_shape=(k, k, cin // groups, cout),
        kernel_spatial_axes=(0, 1),
        kernel_in_axes=(2,),
        kernel_out_axes=(3,),
        in_features=cin,
        out_features=cout,
        groups=groups,
        kernel_size=(k, k),
        strides=(stride, stride),
        dilation=(1, 1),
        padding=((pad, pad), (pad, pad)),
        in_spatial=(hw, hw),
        out_spatial=(out, out),
        n_positions=out * out,
        macs=out * out * k * k * (cin // groups) * cout,
        sources=sources or (InputSource(-1, tuple(range(cin))),),
        depth=index,
    )


def dense_layer(index, name, cin, cout, sources=None, bias=True):
    return Layer(
        index=index,
        name=name,
        kind="dense",
        kernel_path=("params", name, "kernel"),
        affine_paths=(("params", name, "bias"),) if bias else (),
        kernel_shape=(cin, cout),
        kernel_spatial_axes=(),
        kernel_in_axes=(0,),
        kernel_out_axes=(1,),
        in_features=cin,
        out_features=cout,
        groups=1,
        kernel_size=(),
        strides=(),
        dilation=(),
        padding=(),
        in_spatial=(),
        out_spatial=(),
        n_positions=1,
        macs=cin * cout,
        sources=sources or (InputSource(-1, tuple(range(cin))),),
        depth=index,
    )
