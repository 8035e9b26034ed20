"""Multihead attention pooling (MAP): a learned probe token attends over the encoded tokens.

MAP is the pooling of big_vision's current ViT (`pool_type='map'`, `MAPHead` in
google-research/big_vision `big_vision/models/vit.py`; Zhai et al., "Scaling Vision
Transformers", 2022). With encoded tokens `x [B, N, D]` (after the encoder's final LayerNorm)
and a learned probe `p [1, 1, D]`:

    a = MHA(query=p, key=value=x)       # H heads, head size D / H, no norm on p or x
    y = a + MLP(LayerNorm(a))           # MLP: Dense(mlp_dim) -> GELU -> Dense(D)
    pooled = y[:, 0]                    # [B, D]

Parameter names and shapes are big_vision's, so its checkpoints load one to one:
`MAPHead_0/probe [1, 1, D]`, `MAPHead_0/MultiHeadDotProductAttention_0/{query,key,value}`
(kernel `[D, H, Dh]`, bias `[H, Dh]`), `.../out` (kernel `[H, Dh, D]`, bias `[D]`),
`MAPHead_0/LayerNorm_0`, `MAPHead_0/MlpBlock_0/Dense_{0,1}`.

    python -m vitreg_jax.models.map_head    # prints the parameter shapes of a small head
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.models import attention
from vitreg_jax.models import encoder


class ProbeAttention(nn.Module):
  """Cross-attention from query tokens `q_in [B, M, D]` to `kv_in [B, N, D]` (flax layout)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
    d = kv_in.shape[-1]
    if d % self.num_heads:
      raise errors.UserError(f'MAP head: width {d} is not divisible by num_heads={self.num_heads}.')
    proj = lambda name: attention.HeadDense(self.num_heads, d // self.num_heads,
                                            dtype=self.dtype, name=name)
    q, k, v = proj('query')(q_in), proj('key')(kv_in), proj('value')(kv_in)  # [B, *, H, Dh]
    # The probe attends to a handful of tokens: the explicit softmax is cheap and exact.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / np.sqrt(q.shape[-1]).astype(np.float32), axis=-1)
    z = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.xavier_uniform(), name='out')(z)


class MAPHead(nn.Module):
  """Multihead attention pooling `[B, N, D] -> [B, D]` (see the module docstring).

  Attributes:
    num_heads: heads of the pooling attention (big_vision: the encoder's).
    mlp_dim: hidden width of the MLP (big_vision: the encoder's).
    gelu_approximate: tanh GELU in the MLP (as big_vision) or the exact erf form.
    dtype: compute dtype; parameters are float32.
    layer_norm_eps: epsilon of its LayerNorm (flax's 1e-6, as big_vision).
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (b, 1, d))
    y = ProbeAttention(self.num_heads, dtype=self.dtype,
                       name='MultiHeadDotProductAttention_0')(probe, x)
    z = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name='LayerNorm_0')(y)
    y = y + encoder.MlpBlock(self.mlp_dim, dtype=self.dtype,
                               gelu_approximate=self.gelu_approximate, name='MlpBlock_0')(z)
    return y[:, 0]


def main():
  head = MAPHead(num_heads=2, mlp_dim=32)
  shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 5, 16)))
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes['params']):
    print(jax.tree_util.keystr(path), leaf.shape)


if __name__ == '__main__':
  main()
