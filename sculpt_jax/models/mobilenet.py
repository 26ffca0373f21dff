"""MobileNet-V1 (Howard et al. 2017) and MobileNet-V2 (Sandler et al. 2018), ImageNet and CIFAR.

Depthwise convs are `nn.Conv` with ``feature_group_count = C``. All convs are bias-free, each
followed by BN (momentum 0.9, eps 1e-5); V1 uses ReLU, V2 ReLU6 and linear bottlenecks.

  * MobileNet-V1, ImageNet: 3x3/2 stem (32) + 13 depthwise-separable blocks, global average pool,
    Dense(1024 -> classes): 4,231,976 params at 1000 classes.
  * MobileNet-V1, CIFAR (kuangliu/pytorch-cifar): stride-1 stem, same blocks (32x32 -> 2x2).
  * MobileNet-V2, ImageNet (torchvision layout): 3x3/2 stem (32), inverted residuals
    (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1),
    1x1 conv to 1280, global average pool, Dropout(0.2), Dense: 3,504,872 params at 1000 classes.
  * MobileNet-V2, CIFAR (kuangliu/pytorch-cifar): stride-1 stem and stride 1 in the second stage
    (32x32 -> 4x4), no dropout. Residuals are the paper's (stride 1 and C_in == C_out only).

Param names: ``stem_conv``/``stem_bn``; V1 ``block{i}/{dw_conv,dw_bn,pw_conv,pw_bn}``; V2
``block{i}/{expand_conv,expand_bn,dw_conv,dw_bn,project_conv,project_bn}`` (no expand when t=1),
``last_conv``/``last_bn``; ``head``. Flax Linen; NHWC float32 in, logits out; jittable `apply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from sculpt_jax.models.resnet_cifar import batch_norm, conv

# (out_channels, stride) per depthwise-separable block.
V1_BLOCKS = (
    *((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)),
    *((512, 1),) * 5,
    *((1024, 2), (1024, 1)),
)
V1_TINY_BLOCKS = ((16, 1), (32, 2), (32, 1))

# (expansion t, out_channels c, repeats n, first stride s).
V2_IMAGENET_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
V2_CIFAR_CFG = tuple(
    (t, c, n, 1 if i == 1 else s) for i, (t, c, n, s) in enumerate(V2_IMAGENET_CFG)
)
V2_TINY_CFG = ((1, 8, 1, 1), (4, 16, 2, 2))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round channels to a multiple of `divisor`, at most -10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise (stride) + BN + ReLU, 1x1 pointwise + BN + ReLU.

    x: [B, H, W, C] -> [B, H/s, W/s, features].
    """

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = nn.relu(batch_norm(train, "dw_bn")(conv(c, 3, self.stride, "dw_conv", groups=c)(x)))
        return nn.relu(batch_norm(train, "pw_bn")(conv(self.features, 1, 1, "pw_conv")(x)))


class MobileNetV1(nn.Module):
    """MobileNet-V1. Attributes: num_classes, blocks ((out, stride), ...), stem_features,
    stem_stride (2 ImageNet, 1 CIFAR). __call__(x [B,H,W,C], train) -> logits [B, num_classes]."""

    num_classes: int = 1000
    blocks: Sequence[tuple[int, int]] = V1_BLOCKS
    stem_features: int = 32
    stem_stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.stem_features, 3, self.stem_stride, "stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        for i, (c, s) in enumerate(self.blocks):
            x = DepthwiseSeparable(c, s, name=f"block{i}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: [1x1 expand + BN + ReLU6], 3x3 depthwise (stride) + BN + ReLU6,
    1x1 project + BN (linear); identity residual iff stride 1 and C_in == features.

    x: [B, H, W, C] -> [B, H/s, W/s, features].
    """

    features: int
    stride: int = 1
    expansion: int = 6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c_in = x.shape[-1]
        hidden = int(round(c_in * self.expansion))
        y = x
        if self.expansion != 1:
            y = nn.relu6(batch_norm(train, "expand_bn")(conv(hidden, 1, 1, "expand_conv")(y)))
        y = conv(hidden, 3, self.stride, "dw_conv", groups=hidden)(y)
        y = nn.relu6(batch_norm(train, "dw_bn")(y))
        y = batch_norm(train, "project_bn")(conv(self.features, 1, 1, "project_conv")(y))
        if self.stride == 1 and c_in == self.features:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNet-V2.

    Attributes:
      num_classes: logits size.
      cfg: ((t, c, n, s), ...) inverted-residual settings.
      width_mult: channel multiplier (torchvision rounding to multiples of 8).
      stem_stride: 2 (ImageNet) or 1 (CIFAR).
      last_features: width of the final 1x1 conv (1280, scaled only when width_mult > 1).
      dropout_rate: dropout before the head (0.2 in torchvision; needs a "dropout" rng in training).

    __call__(x [B, H, W, C] float32, train) -> logits [B, num_classes].
    """

    num_classes: int = 1000
    cfg: Sequence[tuple[int, int, int, int]] = V2_IMAGENET_CFG
    width_mult: float = 1.0
    stem_stride: int = 2
    stem_features: int = 32
    last_features: int = 1280
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        stem = make_divisible(self.stem_features * self.width_mult)
        x = nn.relu6(batch_norm(train, "stem_bn")(conv(stem, 3, self.stem_stride, "stem_conv")(x)))
        i = 0
        for t, c, n, s in self.cfg:
            out = make_divisible(c * self.width_mult)
            for j in range(n):
                x = InvertedResidual(out, s if j == 0 else 1, t, name=f"block{i}")(x, train=train)
                i += 1
        last = make_divisible(self.last_features * max(1.0, self.width_mult))
        x = nn.relu6(batch_norm(train, "last_bn")(conv(last, 1, 1, "last_conv")(x)))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


mobilenet_v1_imagenet = partial(MobileNetV1, blocks=V1_BLOCKS, stem_stride=2)
mobilenet_v1_cifar = partial(MobileNetV1, blocks=V1_BLOCKS, stem_stride=1)
mobilenet_v1_tiny = partial(MobileNetV1, blocks=V1_TINY_BLOCKS, stem_features=8, stem_stride=1)
mobilenet_v2_imagenet = partial(MobileNetV2, cfg=V2_IMAGENET_CFG, stem_stride=2, dropout_rate=0.2)
mobilenet_v2_cifar = partial(MobileNetV2, cfg=V2_CIFAR_CFG, stem_stride=1, dropout_rate=0.0)
mobilenet_v2_tiny = partial(
    MobileNetV2,
    cfg=V2_TINY_CFG,
    stem_stride=1,
    stem_features=8,
    last_features=32,
    dropout_rate=0.0,
)
