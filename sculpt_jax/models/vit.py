"""Vision Transformers (Dosovitskiy et al. 2021): ViT-B/16 and small/tiny variants for 32x32 input.

Patch embedding is a conv (kernel = stride = patch, with bias), a learned cls token is prepended,
learned position embeddings are added, then `depth` pre-LN encoder blocks
(x + MHA(LN(x)); x + MLP(LN(x)), MLP = Dense -> GELU (exact) -> Dense), a final LayerNorm and a
Dense head on the cls token. LayerNorm eps 1e-6 (torchvision). ViT-B/16 at 224 and 1000 classes:
86,567,656 params (= torchvision ``vit_b_16``).

Attention is `nn.MultiHeadDotProductAttention` named ``attn``: ``attn/{query,key,value}/kernel``
(dim, heads, head_dim) and the output projection ``attn/out/kernel`` (heads, head_dim, dim), a
separate param leaf (the layer the AutoSculpt reference prunes in ViTs, REFERENCE.md Sec. 2).
Param names: ``patch_embed``, ``cls_token``, ``pos_embedding``, ``block{i}/{ln1,attn,ln2,mlp_fc1,
mlp_fc2}``, ``encoder_norm``, ``head``. Flax Linen; NHWC float32 in (H, W multiples of the patch),
logits [B, num_classes] out; `apply` is jittable. Dropout (default 0) needs a "dropout" rng when
``train=True`` and dropout_rate > 0.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

_dense_init = nn.initializers.xavier_uniform()


class EncoderBlock(nn.Module):
    """Pre-LN transformer block. x: [B, N, D] -> [B, N, D]."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-6, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=_dense_init, deterministic=True, name="attn"
        )(y, y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(epsilon=1e-6, name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=_dense_init, name="mlp_fc1")(y), False)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.Dense(d, kernel_init=_dense_init, name="mlp_fc2")(y)
        return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ViT(nn.Module):
    """Vision Transformer.

    Attributes:
      num_classes: logits size.
      patch_size: square patch side (16 for ViT-B/16).
      dim: token width. depth: number of encoder blocks. num_heads: attention heads (dim divisible).
      mlp_dim: hidden width of the MLP. dropout_rate: dropout after attention / MLP layers.

    __call__(x [B, H, W, C] float32, train) -> logits [B, num_classes]; N = (H/p)(W/p) + 1 tokens.
    """

    num_classes: int = 1000
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = self.patch_size
        b, h, w, _ = x.shape
        if h % p or w % p:
            raise ValueError(
                f"ViT input {h}x{w} is not divisible by patch size {p}; resize/crop the input "
                f"or choose a patch_size dividing both"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape((b, -1, self.dim))
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.dim)
        )
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block{i}")(
                x, train=train
            )
        x = nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x[:, 0])


vit_b16 = partial(ViT, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072)
vit_small = partial(ViT, patch_size=4, dim=192, depth=6, num_heads=3, mlp_dim=768)
vit_tiny = partial(ViT, patch_size=8, dim=16, depth=2, num_heads=2, mlp_dim=32)
