"""Each weighted regularizer term against the data loss (cross-entropy; GroupDRO's loss for
GroupDRO): logged figures, and the refusal of a negligible term (the poster's raw-gradient DIV
at the authors' lambda on a small ViT)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.baselines import group_dro
from vitreg_jax.training import loss_balance
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import steps
from vitreg_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, head_zeroinit=False,
            head_init="pytorch", last_attn_residual=False)


@functools.lru_cache(maxsize=None)
def _init():
  """The tiny ViT's images and initial variables, built once for the module (the model does
  not depend on the regularizers); jitted, as op-by-op init takes many times longer."""
  model = models.create("vit", 2, **TINY)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 16, 3))
  return images, jax.jit(model.init)(jax.random.PRNGKey(1), images)


def _setup(regs):
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      model_name="vit", model=TINY, regularizers=regs, batch_size=4, total_steps=1,
      data=dict(name="dominoes"))))
  model = steps.create_model(config, 2)
  images, variables = _init()
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           opt_state=(), model_state={}, rng=jax.random.PRNGKey(2))
  batch = {"image": images, "label": jnp.array([0, 1, 1, 0])}
  return config, model, state, batch


def _objective(config, model, loss=None):
  return objective_lib.Objective(model, num_classes=2, loss=loss,
                                 regularizers=config.regularizers)


def test_figures_equal_separate_gradients():
  regs = [dict(name="div", weight=3.0, layers=(-1,), normalize=True, reduction="mean")]
  config, model, state, batch = _setup(regs)
  objective = _objective(config, model)
  balance = loss_balance.make_balance_fn(objective)
  got = jax.device_get(balance(state, batch))
  rng = jax.random.fold_in(state.rng, state.step)

  def piece(params, which):
    logits, _, _, terms, _ = objective.forward(
        {"params": params}, batch["image"], labels=batch["label"], train=True,
        rngs={"dropout": rng}, head_mask=None, mutable=False)
    ce = steps.soft_cross_entropy(logits, jax.nn.one_hot(batch["label"], 2))
    return ce if which == "ce" else 3.0 * terms["div"]

  @jax.jit  # One compilation: op by op, DIV's double backward pass takes minutes.
  def separately(params):
    return (optax.global_norm(jax.grad(piece)(params, "ce")),
            optax.global_norm(jax.grad(piece)(params, "div")), piece(params, "div"))
  g_ce, g_div, div = separately(state.params)
  np.testing.assert_allclose(got["ce_grad_norm"], g_ce, rtol=1e-4)
  np.testing.assert_allclose(got["div_grad_norm"], g_div, rtol=1e-4)
  np.testing.assert_allclose(got["div"], div, rtol=1e-5)
  np.testing.assert_allclose(got["div_grad_ratio"], g_div / g_ce, rtol=1e-4)
  assert got["div_grad_ratio"] > loss_balance.NEGLIGIBLE


def test_group_dro_balance_is_measured_against_the_group_dro_loss():
  # GroupDRO's objective: the balance's data loss is the q-weighted group loss the train step
  # minimizes, with q updated on this batch from the state's q, not the plain cross-entropy.
  regs = [dict(name="div", weight=3.0, layers=(-1,), normalize=True, reduction="mean")]
  config, model, state, batch = _setup(regs)
  loss = group_dro.make_loss(4, step_size=2.0, adjust=np.zeros(4))
  objective = _objective(config, model, loss)
  q = jnp.asarray([0.7, 0.1, 0.1, 0.1])
  state = state.replace(loss_state={"group_weights": q})
  batch = {**batch, "group": jnp.array([0, 1, 2, 0])}
  got = jax.device_get(loss_balance.make_balance_fn(objective)(state, batch))
  ce_only = jax.device_get(loss_balance.make_balance_fn(_objective(config, model))(state, batch))
  rng = jax.random.fold_in(state.rng, state.step)

  @jax.jit
  def separately(params):
    def dro(p):  # the published update written out: L_g, q <- q exp(eta L_g), sum_g q_g L_g
      logits = objective.forward({"params": p}, batch["image"], labels=batch["label"],
                                 train=True, rngs={"dropout": rng}, head_mask=None,
                                 mutable=False)[0]
      per_example = steps.soft_cross_entropy(logits, jax.nn.one_hot(batch["label"], 2),
                                             reduce=False)
      group_loss = jnp.stack([jnp.sum(jnp.where(batch["group"] == g, per_example, 0.0))
                              / max(int(np.sum(np.asarray(batch["group"]) == g)), 1)
                              for g in range(4)])
      new_q = q * jnp.exp(2.0 * jax.lax.stop_gradient(group_loss))
      return group_loss @ (new_q / new_q.sum())
    return optax.global_norm(jax.grad(dro)(params))
  np.testing.assert_allclose(got["ce_grad_norm"], separately(state.params), rtol=1e-4)
  assert abs(got["ce_grad_norm"] / ce_only["ce_grad_norm"] - 1) > 0.05  # not the plain CE
  np.testing.assert_allclose(got["div_grad_norm"], ce_only["div_grad_norm"], rtol=1e-5)


def test_a_negligible_term_is_refused_naming_the_fix():
  # On this tiny random model the raw-gradient term is large; at weight 1e-6 it is not.
  config, model, state, batch = _setup([dict(name="div", weight=1e-6, layers=(-1,))])
  balance = loss_balance.make_balance_fn(_objective(config, model))
  check = loss_balance.BalanceCheck(balance.checked)
  measured = jax.device_get(balance(state, batch))
  assert 0 < measured["div_grad_ratio"] < loss_balance.NEGLIGIBLE
  with pytest.raises(loss_balance.NegligibleTermError, match="normalize=True"):
    check(0, measured)


def test_an_exactly_zero_term_is_judged_later():
  check = loss_balance.BalanceCheck({"div": 100.0})
  check(0, {"div_grad_ratio": 0.0})   # e.g. a zero-initialized head: no verdict yet
  assert check.pending == {"div"}
  check(50, {"div_grad_ratio": 0.3})
  assert not check.pending
  check(100, {"div_grad_ratio": 1e-12})  # judged once: no second verdict


def test_a_term_that_stays_exactly_zero_is_refused_after_three_measurements():
  # One unmasked head in the regularized block: DIV's pairwise sum is exactly 0, measured.
  regs = [dict(name="div", weight=100.0, layers=(-1,), normalize=True, reduction="mean")]
  config, model, state, batch = _setup(regs)
  one_head = jnp.array([[1.0, 1.0], [1.0, 0.0]])
  balance = loss_balance.make_balance_fn(_objective(config, model), head_mask=one_head)
  measured = jax.device_get(balance(state, batch))
  assert measured["div"] == 0.0 and measured["div_grad_ratio"] == 0.0
  check = loss_balance.BalanceCheck(balance.checked)
  check(0, measured)
  check(5, measured)   # the pre-update measurement and one log step: no verdict yet
  with pytest.raises(loss_balance.ZeroTermError, match=r"exactly 0 at steps 0, 5, 10"):
    check(10, measured)
  assert issubclass(loss_balance.ZeroTermError, errors.UserError)


def test_a_zero_initialized_head_turns_the_term_non_zero_after_one_update():
  # The legitimate zero: under a zero-initialized classifier head the top logit does not
  # depend on the input, so DIV is exactly 0 before the first update and not after it.
  regs = [dict(name="div", weight=100.0, layers=(-1,), normalize=True, reduction="mean")]
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      model_name="vit", model=dict(TINY, head_zeroinit=True), regularizers=regs,
      batch_size=4, total_steps=1, data=dict(name="dominoes"))))
  model = steps.create_model(config, 2)
  images, _ = _init()
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images)["params"]
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                           model_state={}, rng=jax.random.PRNGKey(2))
  batch = {"image": images, "label": jnp.array([0, 1, 1, 0])}
  balance = loss_balance.make_balance_fn(_objective(config, model))
  check = loss_balance.BalanceCheck(balance.checked)
  before = jax.device_get(balance(state, batch))
  assert before["div_grad_ratio"] == 0.0
  check(0, before)

  @jax.jit
  def sgd_step(p):  # one plain cross-entropy update moves the head off zero
    ce = lambda q: steps.soft_cross_entropy(model.apply({"params": q}, images)[0],
                                            jax.nn.one_hot(batch["label"], 2))
    return jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, jax.grad(ce)(p))
  after = jax.device_get(balance(state.replace(params=sgd_step(params)), batch))
  assert after["div_grad_ratio"] > 0.0
  check(1, after)
  assert not check.pending  # judged (and kept): no refusal


def test_a_div_block_with_one_unmasked_head_is_refused_before_any_step():
  regs = [dict(name="div", weight=100.0, layers=(-1,), normalize=True, reduction="mean")]
  config, model, _, _ = _setup(regs)
  reg = _objective(config, model).regularizer
  loss_balance.check_heads(reg, model, None)                        # 2 heads: fine
  loss_balance.check_heads(reg, model, np.array([[1, 0], [1, 1]]))  # block 0 is not DIV's
  with pytest.raises(errors.UserError, match=r"block 1 .* 1 unmasked head\(s\) of 2"):
    loss_balance.check_heads(reg, model, np.array([[1, 1], [0, 1]]))
  off = [dict(regs[0], weight=0.0)]  # a switched-off term is plain ERM, not a mistake
  config_off, _, _, _ = _setup(off)
  loss_balance.check_heads(_objective(config_off, model).regularizer, model,
                           np.array([[1, 1], [0, 1]]))
  # A one-head model: refused with no mask at all.
  one = models.create("vit", 2, **dict(TINY, num_heads=1))
  with pytest.raises(errors.UserError, match=r"1 unmasked head\(s\) of 1"):
    loss_balance.check_heads(_objective(config, one).regularizer, one, None)


def test_training_with_one_unmasked_head_under_div_fails_before_the_first_step(tmp_path):
  config = config_lib.load_config_file(os.path.join(ROOT, "configs/quickstart.py:runlocal,reg=div"))
  config.head_eval = ""
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=64, num_val=64, num_test=64)
  config.head_mask = [[1, 1], [1, 0]]  # DIV's block (the last) keeps one head
  with pytest.raises(errors.UserError, match="block 1 would be exactly 0 at every step"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()  # refused before the data or the workdir


def test_other_regularizers_are_logged_not_refused():
  regs = [dict(name="distance", weight=1e-9, layers=(0,))]
  config, model, state, batch = _setup(regs)
  balance = loss_balance.make_balance_fn(_objective(config, model))
  assert balance.checked == {} and set(balance.weights) == {"distance"}
  assert jax.device_get(balance(state, batch))["distance_grad_ratio"] < loss_balance.NEGLIGIBLE


def test_no_regularizer_no_balance():
  config, model, _, _ = _setup([])
  assert loss_balance.make_balance_fn(_objective(config, model)) is None


def test_cli_refuses_a_negligible_div_in_one_line(tmp_path):
  # The poster's raw-gradient DIV (the regularizer's defaults) at the authors' lambda 100 on
  # the quickstart ViT. Its zero-initialized head makes the term exactly 0 on the first batch,
  # so the verdict comes at the first log step.
  config = tmp_path / "bare_div.py"
  config.write_text(
      "from vitreg_jax import config_lib\n"
      "def get_config(arg=None):\n"
      f"  config = config_lib.import_config({ROOT + '/configs/quickstart.py'!r})"
      ".get_config('runlocal')\n"
      "  config.regularizers = [dict(name='div', weight=100.0, layers=(-1,))]\n"
      "  config.log_every_steps = 5\n"
      # The refusal comes at step 5, before any evaluation: 5 batches of data, small eval
      # splits and no per-head evaluation (the model is the quickstart's).
      "  config.data.update(num_train=320, num_val=64, num_test=64)\n"
      "  config.head_eval = ''\n"
      "  return config\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "vitreg_jax.main", f"--config={config}",
         f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  fatal = [l for l in proc.stderr.splitlines() if l.startswith("FATAL")]
  assert len(fatal) == 1 and "negligible" in fatal[0] and "normalize=True" in fatal[0]
  assert "at step 5" in fatal[0]


def test_logged_beside_cross_entropy(tmp_path):
  # The quickstart's DIV at a tiny size: 20 steps logged every 10, small splits, one eval.
  # In-process (the subject is what the loop logs, not the command line, which the refusal
  # test above runs): no second TensorFlow import.
  config = config_lib.load_config_file(os.path.join(ROOT, "configs/quickstart.py:runlocal,reg=div"))
  config.log_every_steps, config.total_steps, config.head_eval = 10, 20, ""
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=640, num_val=64, num_test=64)
  train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  logged = [l for l in lines if "balance/div_grad_ratio" in l]
  assert logged and all(l["split"] == "train" for l in logged)
  assert {"balance/ce_grad_norm", "balance/div", "balance/div_grad_norm"} <= set(logged[-1])
