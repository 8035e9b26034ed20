"""A regularizer defined outside vitreg_jax: the entropy of a block's attention rows.

docs/design.md, "How to add a regularizer", shows this file; tests/extension_test.py trains it.
"""
import jax.numpy as jnp

from vitreg_jax import regularizers


def attention_entropy(ctx, *, eps, over):
  """Mean entropy of the attention rows of block `ctx.layer` (low = sharp attention)."""
  a = ctx.attn.astype(jnp.float32)                   # [B, H, T, T]
  if over == 'patches':                              # leave the prefix (CLS) tokens out
    p = ctx.num_prefix_tokens
    a = a[..., p:, p:] / jnp.sum(a[..., p:, p:], axis=-1, keepdims=True)
  return -jnp.mean(jnp.sum(a * jnp.log(a + eps), axis=-1))


SPEC = regularizers.register(regularizers.RegularizerSpec(
    name='attention_entropy', fn=attention_entropy,
    options=dict(eps=1e-9, over='tokens'),           # every option, with its default
    choices=dict(over=('tokens', 'patches')),        # checked when the config is read
    needs={regularizers.ATTENTION}))                 # the attention maps of its blocks
