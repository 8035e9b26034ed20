"""GroupDRO (vitreg_jax/baselines/group_dro.py) against a NumPy transcription of the published
update (kohpangwei/group_DRO, loss.py: `LossComputer.compute_group_avg`, `compute_robust_loss`),
in isolation and carried by the train state through jitted train steps and a checkpoint; the
loss registry (`config.loss.name`), a loss registered from outside the package included."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.baselines import group_dro
from vitreg_jax.training import checkpoint as ckpt_lib
from vitreg_jax.training import losses
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import rundir
from vitreg_jax.training import steps
from vitreg_jax.training import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'workers'))
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def reference_update(adv_probs, losses_np, groups, n_groups, group_counts, adj, step_size,
                     normalize_loss=False):
  """The published minibatch update, written out with NumPy loops."""
  group_loss = np.zeros(n_groups)
  for g in range(n_groups):
    members = [l for l, gi in zip(losses_np, groups) if gi == g]
    group_loss[g] = sum(members) / max(len(members), 1)  # empty group: 0 (denominator 1)
  adjusted = group_loss.copy()
  if np.all(adj > 0):
    adjusted = adjusted + adj / np.sqrt(group_counts)
  if normalize_loss:
    adjusted = adjusted / adjusted.sum()
  new = adv_probs * np.exp(step_size * adjusted)
  new = new / new.sum()
  return new, group_loss @ new, group_loss


@pytest.mark.parametrize('c,normalize', [(0.0, False), (2.0, False), (1.0, True)])
def test_group_dro_weights_match_the_published_update(c, normalize):
  rng = np.random.default_rng(0)
  counts = np.array([3000., 200., 50., 1000.])
  adjust = group_dro.adjustment(c, counts)
  q_ref, q = np.full(4, 0.25), jnp.full((4,), 0.25)
  step = jax.jit(lambda l, g, q: group_dro.group_dro(l, g, q, step_size=0.3, adjust=adjust,
                                                     normalize_loss=normalize))
  for t in range(6):
    per_example = rng.uniform(0.0, 3.0, 16)
    groups = rng.integers(0, 4 if t % 2 else 3, 16)  # odd steps miss group 3
    q_ref, loss_ref, _ = reference_update(q_ref, per_example, groups, 4, counts,
                                          np.full(4, c), 0.3, normalize)
    loss, q, _ = step(jnp.asarray(per_example, jnp.float32), jnp.asarray(groups), q)
    np.testing.assert_allclose(q, q_ref, rtol=1e-5)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert not np.allclose(q_ref, 0.25)
  # The gradient holds q fixed: d loss / d l_i = q_{g_i} / (examples of g_i in the batch).
  grad = jax.grad(lambda l: group_dro.group_dro(l, jnp.asarray(groups), q, step_size=0.3,
                                                adjust=adjust, normalize_loss=normalize)[0])(
                                                    jnp.asarray(per_example, jnp.float32))
  new_q = np.asarray(step(jnp.asarray(per_example, jnp.float32), jnp.asarray(groups), q)[1])
  want = [new_q[g] / np.sum(groups == g) for g in groups]
  np.testing.assert_allclose(grad, want, rtol=1e-5)


def _tiny():
  model = models.create('vit', 2, width=16, depth=1, mlp_dim=16, num_heads=2, patch_size=4)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, 1, 0, 1, 1, 0], jnp.int32)
  groups = jnp.asarray([0, 3, 1, 3, 0, 2, 3, 0], jnp.int32)
  params = model.init(jax.random.key(0), images[:1])['params']
  params['head']['kernel'] = jnp.asarray(rng.normal(size=params['head']['kernel'].shape),
                                         jnp.float32)
  return model, images, labels, groups, params


def test_train_steps_carry_the_group_weights():
  model, images, labels, groups, params = _tiny()
  config = ml_collections.ConfigDict({'optimizer': {'name': 'sgd', 'lr': 0.5},
                                      'schedule': {'name': 'constant'}})
  tx, _ = optim.make_optimizer(config, 10)
  counts = np.array([40., 10., 5., 45.])
  objective = objective_lib.Objective(model, num_classes=2, loss=group_dro.make_loss(
      4, step_size=0.5, adjust=group_dro.adjustment(1.0, counts)))
  assert objective.batch_keys == ('group',)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state={}, rng=jax.random.key(1),
                           loss_state=objective.init_state)
  train = jax.jit(lambda s: steps.train_step(
      s, {'image': images, 'label': labels, 'group': groups}, objective=objective, tx=tx))
  q_ref = np.full(4, 0.25)
  for _ in range(3):
    logits = model.apply({'params': state.params}, images, train=False)[0]
    per_example = np.asarray(steps.soft_cross_entropy(
        logits, jax.nn.one_hot(labels, 2), reduce=False))
    q_ref, loss_ref, _ = reference_update(q_ref, per_example, np.asarray(groups), 4, counts,
                                          np.ones(4), 0.5)
    state, measured = train(state)
    np.testing.assert_allclose(state.loss_state['group_weights'], q_ref, rtol=1e-5)
    np.testing.assert_allclose(measured['loss'], loss_ref, rtol=1e-5)
    np.testing.assert_allclose(measured['ce'], per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(measured['group_dro/weight1'], q_ref[1], rtol=1e-5)
  assert np.abs(q_ref - 0.25).max() > 0.1  # the weights did move over the 3 steps


def test_group_weights_are_checkpointed_and_ce_states_keep_their_layout(tmp_path):
  _, _, _, _, params = _tiny()
  base = dict(step=jnp.asarray(3, jnp.int32), params=params, opt_state=(), model_state={},
              rng=jax.random.PRNGKey(0))
  ce = steps.TrainState(**base)
  assert [p[0].name for p, _ in jax.tree_util.tree_flatten_with_path(ce)[0]
          if len(p) == 1] == ['step', 'rng']  # no loss_state entry at all
  dro = steps.TrainState(**base, loss_state={'group_weights': jnp.asarray([.1, .2, .3, .4])})
  with ckpt_lib.Checkpointer(str(tmp_path / 'ck'), async_save=False) as ck:
    ck.save(3, dro, {'data_step': 3}, force=True)
    restored, _ = ck.restore(jax.tree.map(jnp.zeros_like, dro))
  np.testing.assert_allclose(restored.loss_state['group_weights'], [.1, .2, .3, .4])


def test_loss_config_errors():
  with pytest.raises(errors.UserError, match=r"valid losses: \['ce', 'group_dro'"):
    config_lib.with_defaults(ml_collections.ConfigDict(
        {'total_steps': 1, 'loss': {'name': 'dro'}}))
  with pytest.raises(errors.UserError, match='valid fields'):
    objective_lib.resolve_loss({'name': 'group_dro', 'eta': 0.1})
  with pytest.raises(errors.UserError, match='step_size'):
    objective_lib.resolve_loss({'name': 'group_dro', 'step_size': -1.0})
  config = config_lib.with_defaults(ml_collections.ConfigDict({'total_steps': 1}))
  assert config.loss.name == 'ce' and config.loss.step_size == 0.01


# A loss from outside the package: the focal loss (Lin et al. 2017, "Focal Loss for Dense
# Object Detection", Eq. 5), -sum_k t_k (1 - p_k)^gamma log p_k against the soft targets,
# with a running mean of the batch losses as its state.
def focal(config, info):
  del info
  gamma = float(config.loss.focal_gamma)

  def fn(logits, targets, batch, state):
    del batch
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.mean(jnp.sum(targets * (1 - jnp.exp(log_p)) ** gamma * log_p, -1))
    running = 0.9 * state['running'] + 0.1 * jax.lax.stop_gradient(loss)
    return loss, {'running': running}, {'focal/running': running}
  return losses.Loss(fn, state={'running': jnp.zeros((), jnp.float32)})


if 'test_focal' not in losses.names():
  losses.register('test_focal', focal, options={'focal_gamma': 2.0})


def test_a_loss_registered_outside_the_package_trains(tmp_path):
  config = train_worker.load_config({
      'model.width': 16, 'model.depth': 1, 'model.mlp_dim': 32, 'model.num_heads': 2,
      'data.num_train': 64, 'data.num_val': 16, 'data.num_test': 16, 'batch_size': 8,
      'eval_batch_size': 16, 'total_steps': 2, 'log_every_steps': 1, 'head_eval': '',
      'schedule': {'name': 'constant'}, 'loss': {'name': 'test_focal', 'focal_gamma': 3.0}})
  train.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['loss'] == {'name': 'test_focal', 'focal_gamma': 3.0, **group_dro.OPTIONS}
  logged = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train_lines = [l for l in logged if l['split'] == 'train']
  assert [l['step'] for l in train_lines] == [1, 2]
  for line in train_lines:  # the focal loss is below the cross-entropy it down-weights
    assert 0 < line['loss'] < line['ce'] and line['focal/running'] > 0
  tree, _ = rundir.load_state_tree(str(tmp_path))
  np.testing.assert_allclose(tree['loss_state']['running'], train_lines[-1]['focal/running'],
                             rtol=1e-6)
  with pytest.raises(errors.UserError, match="valid losses: .*'test_focal'"):
    objective_lib.resolve_loss({'name': 'focal'})
