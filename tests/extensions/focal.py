"""A loss defined outside vitreg_jax: the focal loss (Lin et al. 2017, Eq. 5), soft targets.

docs/design.md, "How to add a loss", shows this file; tests/extension_test.py trains it.
"""
import jax
import jax.numpy as jnp

from vitreg_jax.training import losses


@losses.register('focal', options={'focal_gamma': 2.0})
def focal(config, dataset):
  del dataset  # A loss that needs group counts reads them from the opened dataset.
  gamma = float(config.loss.focal_gamma)

  def fn(logits, targets, batch, state):
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.mean(jnp.sum(targets * (1 - jnp.exp(log_p)) ** gamma * log_p, -1))
    return loss, state, {'focal_gamma': jnp.float32(gamma)}   # (loss, new state, logged)
  return losses.Loss(fn)   # Loss(fn, state=..., batch_keys=('group',)) for a stateful loss
