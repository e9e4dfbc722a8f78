"""A Vision Transformer for 32x32 images: ViT-Lite-7/4 of Hassani et al., "Escaping the Big
Data Paradigm with Compact Transformers" (2021, arXiv:2104.05704, Table 1 and appendix).

The ViT of Dosovitskiy et al. (2021) cut to CIFAR's scale: 4x4 patches (64 tokens) embedded to
width 256 by a strided convolution, a learned class token and learned position embeddings,
7 pre-norm encoder blocks (LayerNorm, 4-head self-attention, LayerNorm, a 512-wide GELU MLP,
each with a residual connection), a final LayerNorm and a linear head on the class token:
3,722,250 parameters for 10 classes (the paper: 3.72M; 91.4% on CIFAR-10 after 300 epochs
with its training recipe, see configs/vit.py).

Conventions as the CNNs: `dtype` is the computation dtype (parameters stay float32, logits
come back float32); dropout before the classifier, its rate passed as data by the train step;
`train` switches dropout on. No BatchNorm, so no `batch_stats`.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import dropout

# timm's and the paper's initialisation: truncated normal (std 0.02) for every weight matrix
# and the position embedding, zeros for biases and the class token.
trunc_normal = nn.initializers.truncated_normal(0.02)
LAYER_NORM_EPSILON = 1e-6  # as the original ViT; the PyTorch twin sets the same


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection ('qkv') and an
    output projection ('proj'), PyTorch's `scaled_dot_product_attention` in Flax."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, t, width = x.shape
        qkv = nn.Dense(3 * width, kernel_init=trunc_normal, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(n, t, 3, self.num_heads, width // self.num_heads), 3, 2)
        y = nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], dtype=self.dtype)
        return nn.Dense(width, kernel_init=trunc_normal, dtype=self.dtype,
                        name="proj")(y.reshape(n, t, width))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def norm(name):
            return nn.LayerNorm(LAYER_NORM_EPSILON, dtype=self.dtype, name=name)

        x = x + SelfAttention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x))
        y = nn.Dense(self.mlp_dim, kernel_init=trunc_normal, dtype=self.dtype,
                     name="fc1")(norm("norm2")(x))
        y = nn.gelu(y, approximate=False)  # PyTorch's nn.GELU() default
        return x + nn.Dense(x.shape[-1], kernel_init=trunc_normal, dtype=self.dtype, name="fc2")(y)


class ViT(nn.Module):
    classifier = "head"  # the classifier layer's name (not a field)
    num_classes: int = 10
    dropout_rate: float = 0.1  # default; the train step may pass the rate as data instead
    dtype: Any = jnp.float32
    patch_size: int = 4
    width: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_dim: int = 512

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", kernel_init=trunc_normal,
                    dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        n, h, w, _ = x.shape
        x = x.reshape(n, h * w, self.width)  # tokens in row-major order, as torch's flatten(2)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(self.dtype), x], 1)
        pos = self.param("pos_embedding", trunc_normal, (1, h * w + 1, self.width), jnp.float32)
        x = x + pos.astype(self.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"block{i}")(x)
        x = nn.LayerNorm(LAYER_NORM_EPSILON, dtype=self.dtype, name="norm")(x)[:, 0]
        x = dropout(x, rate, deterministic=not train, module=self)
        x = nn.Dense(self.num_classes, kernel_init=trunc_normal, dtype=self.dtype,
                     name=self.classifier)(x)
        return x.astype(jnp.float32)
