"""CIFAR ResNets (He et al. 2016, Sec. 4.2): ResNet-20/32/44/56/110 and a tiny test variant.

Layout: 3x3 stem conv (16 ch) + BN + ReLU, three stages of `n` basic blocks with 16/32/64 channels
(stride 2 at the first block of stages 2 and 3), global average pool, dense head; depth = 6n + 2.

Shortcuts at a change of shape:
  * option "A" (default, as in the AutoSculpt reference / akamaster's CIFAR ResNets):
    parameter-free; ``x[:, ::s, ::s, :]`` then zeros padded on the channel axis, split evenly
    before/after.
  * option "B": 1x1 conv (stride s, no bias) + BN.

Inputs are NHWC float32 of any H, W >= 8 and any C (1 for digits, 3 for CIFAR); the network never
assumes 32x32 (global average pooling before the head). Flax Linen modules; `apply` is jittable.
Param names: ``stem_conv``, ``stem_bn``, ``stage{1,2,3}_block{i}/{conv1,bn1,conv2,bn2}``,
``stage{s}_block0/{shortcut_conv,shortcut_bn}`` (option B only), ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

# He (kaiming) normal, fan_in, as torch.nn.init.kaiming_normal_ (used by the reference models).
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """The zoo's BatchNorm: torch defaults (momentum 0.1 == flax 0.9, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv(features: int, kernel: int, stride: int, name: str, groups: int = 1) -> nn.Conv:
    """Bias-free conv with torch-style symmetric padding k//2 (so stride 2 pads (1, 1) for 3x3)."""
    p = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        name=name,
    )


def pad_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option-A shortcut: spatial subsample by `stride`, zero-pad channels up to `features`.

    x: [B, H, W, C] -> [B, ceil(H/s), ceil(W/s), features]; the C input channels sit at
    offset (features - C) // 2, as akamaster's
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``. Jittable.
    """
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"option-A shortcut cannot shrink channels ({x.shape[-1]} -> {features}); "
            "use shortcut='B'"
        )
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU.

    x: [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features].
    """

    features: int
    stride: int = 1
    shortcut: str = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = batch_norm(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                sc = pad_shortcut(x, self.features, self.stride)
            else:
                sc = conv(self.features, 1, self.stride, "shortcut_conv")(x)
                sc = batch_norm(train, "shortcut_bn")(sc)
        else:
            sc = x
        return nn.relu(y + sc)


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet with `blocks_per_stage` basic blocks per stage (depth = 6 n + 2).

    Attributes:
      num_classes: logits size.
      blocks_per_stage: n (3 -> ResNet-20, 9 -> ResNet-56, 18 -> ResNet-110).
      widths: channels of the stem and the three stages' blocks (16, 32, 64 in the paper; the stem
        uses widths[0]).
      shortcut: "A" (parameter-free zero padding) or "B" (1x1 conv + BN projection).

    __call__(x [B, H, W, C] float32, train) -> logits [B, num_classes] float32.
    """

    num_classes: int = 10
    blocks_per_stage: int = 3
    widths: Sequence[int] = (16, 32, 64)
    shortcut: str = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
        x = conv(self.widths[0], 3, 1, "stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        for s, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(width, stride, self.shortcut, name=f"stage{s + 1}_block{b}")(
                    x, train=train
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def _depth_to_blocks(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    return (depth - 2) // 6


resnet20 = partial(ResNetCIFAR, blocks_per_stage=_depth_to_blocks(20))
resnet32 = partial(ResNetCIFAR, blocks_per_stage=_depth_to_blocks(32))
resnet44 = partial(ResNetCIFAR, blocks_per_stage=_depth_to_blocks(44))
resnet56 = partial(ResNetCIFAR, blocks_per_stage=_depth_to_blocks(56))
resnet110 = partial(ResNetCIFAR, blocks_per_stage=_depth_to_blocks(110))
resnet8_tiny = partial(ResNetCIFAR, blocks_per_stage=1, widths=(4, 8, 16))
