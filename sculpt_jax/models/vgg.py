"""VGG-16/19 with BatchNorm (Simonyan & Zisserman 2015; BN variant as torchvision ``vgg*_bn``).

Two heads:
  * CIFAR (as in common CIFAR VGG repos, e.g. kuangliu/pytorch-cifar): features -> global average
    pool (1x1x512 at 32x32 input) -> Dense(num_classes). Max pools use "SAME" (ceil) padding so any
    H, W >= 1 works (8x8 digits: 8 -> 4 -> 2 -> 1 -> 1 -> 1).
  * ImageNet (torchvision): features (7x7x512 at 224 input) -> flatten -> Dense 4096 -> ReLU ->
    Dropout(0.5) -> Dense 4096 -> ReLU -> Dropout(0.5) -> Dense(num_classes). Dropout is off when
    ``train=False`` and needs a "dropout" rng when ``train=True``.

Convs are 3x3, padding 1, bias-free (followed by BN) unless ``conv_bias=True`` (torchvision's
vgg16_bn keeps the conv bias: 138,365,992 params with it, 138,361,768 without).
Param names: ``conv{stage}_{i}`` / ``bn{stage}_{i}`` (stage 1..5, i from 1), ``fc1``, ``fc2``,
``head``. Flax Linen; NHWC float32 in, logits [B, num_classes] out; `apply` is jittable.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from sculpt_jax.models.resnet_cifar import batch_norm, conv_init

# "M" = 2x2 max pool, stride 2.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CFG = (
    *(64, 64, "M", 128, 128, "M"),
    *(256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
)
VGG_TINY_CFG = (8, 8, "M", 16, 16, "M")


class VGG(nn.Module):
    """VGG-BN feature extractor plus a CIFAR or ImageNet head.

    Attributes:
      cfg: conv widths with "M" for max pools.
      num_classes: logits size.
      head_type: "cifar" (global average pool -> Dense) or "imagenet" (flatten -> 4096 -> 4096 ->
        Dense).
      hidden: width of the ImageNet head's hidden layers.
      dropout_rate: ImageNet head dropout.
      conv_bias: give the convs a bias (torchvision layout) although BN follows.

    __call__(x [B, H, W, C] float32, train) -> logits [B, num_classes].
    """

    cfg: Sequence[int | str] = VGG16_CFG
    num_classes: int = 10
    head_type: str = "cifar"
    hidden: int = 4096
    dropout_rate: float = 0.5
    conv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.head_type not in ("cifar", "imagenet"):
            raise ValueError(f"VGG head_type must be 'cifar' or 'imagenet', got {self.head_type!r}")
        pool_pad = "SAME" if self.head_type == "cifar" else "VALID"
        stage, i = 1, 1
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding=pool_pad)
                stage, i = stage + 1, 1
                continue
            x = nn.Conv(
                int(v),
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=self.conv_bias,
                kernel_init=conv_init,
                name=f"conv{stage}_{i}",
            )(x)
            x = nn.relu(batch_norm(train, f"bn{stage}_{i}")(x))
            i += 1
        if self.head_type == "cifar":
            x = jnp.mean(x, axis=(1, 2))
        else:
            x = x.reshape((x.shape[0], -1))
            for j in (1, 2):
                x = nn.relu(nn.Dense(self.hidden, name=f"fc{j}")(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


vgg16_cifar = partial(VGG, cfg=VGG16_CFG, head_type="cifar")
vgg19_cifar = partial(VGG, cfg=VGG19_CFG, head_type="cifar")
vgg16_imagenet = partial(VGG, cfg=VGG16_CFG, head_type="imagenet")
vgg19_imagenet = partial(VGG, cfg=VGG19_CFG, head_type="imagenet")
vgg_tiny = partial(VGG, cfg=VGG_TINY_CFG, head_type="cifar")
