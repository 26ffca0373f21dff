"""ImageNet ResNet-50 (He et al. 2016, torchvision layout "v1.5") and a tiny bottleneck variant.

Stem: 7x7/2 conv (64, padding 3) + BN + ReLU + 3x3/2 max pool (padding 1). Four stages of
bottleneck blocks (1x1 -> 3x3 (stride here) -> 1x1 x4 expansion), [3, 4, 6, 3] blocks with widths
64/128/256/512; the first block of each stage has a 1x1 conv (stride s) + BN projection shortcut.
Global average pool, Dense(num_classes) with bias. 25,557,032 params at 1000 classes.

Param names: ``stem_conv``, ``stem_bn``, ``stage{1..4}_block{i}/{conv1,bn1,conv2,bn2,conv3,bn3}``,
``stage{s}_block0/{shortcut_conv,shortcut_bn}``, ``head``. Flax Linen; NHWC float32 in (H, W
multiples of 32 keep every stage's map even), logits [B, num_classes] out; `apply` is jittable.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from sculpt_jax.models.resnet_cifar import batch_norm, conv


class Bottleneck(nn.Module):
    """1x1 (width) - 3x3 (width, stride) - 1x1 (4 width), BN after each, projection if needed.

    x: [B, H, W, C_in] -> [B, H/stride, W/stride, expansion * width].
    """

    width: int
    stride: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = self.width * self.expansion
        y = nn.relu(batch_norm(train, "bn1")(conv(self.width, 1, 1, "conv1")(x)))
        y = nn.relu(batch_norm(train, "bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
        y = batch_norm(train, "bn3")(conv(out, 1, 1, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = batch_norm(train, "shortcut_bn")(conv(out, 1, self.stride, "shortcut_conv")(x))
        return nn.relu(y + x)


class ResNetImageNet(nn.Module):
    """Bottleneck ResNet with the ImageNet stem.

    Attributes:
      num_classes: logits size.
      stage_sizes: blocks per stage ([3, 4, 6, 3] for ResNet-50).
      widths: bottleneck widths per stage (outputs are 4x these).
      stem_features: stem conv channels (64).

    __call__(x [B, H, W, C] float32, train) -> logits [B, num_classes].
    """

    num_classes: int = 1000
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_features: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.stem_features, 7, 2, "stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = Bottleneck(width, stride, name=f"stage{s + 1}_block{b}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


resnet50 = partial(ResNetImageNet, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512))
resnet50_tiny = partial(
    ResNetImageNet, stage_sizes=(1, 1, 1, 1), widths=(2, 4, 4, 8), stem_features=8
)
