"""FGSM and PGD (vitreg_jax/analysis/adversarial.py) against slow references, their bounds, and
the command end to end on tiny runs.

References: a linear softmax classifier, whose input gradient is `W (softmax(z) - onehot(y))`
in closed form (NumPy, float64, one example at a time, the pixel-space variant done in [0, 1]
pixels and mapped back), and a tiny ViT whose gradient is taken one example at a time."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import testutil
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.analysis import adversarial
from vitreg_jax.data import device_normalization

NORM = device_normalization.Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
MEAN, STD = np.asarray(NORM.mean), np.asarray(NORM.std)
SPACES = {name: adversarial.make_space(name, NORM) for name in adversarial.SPACES}


class Linear(nn.Module):
  """Logits `x W + b` of the flattened image; returns `(logits, out)` as the package's models."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)), {}


def _images(n=6, shape=(4, 4, 3), seed=0):
  """Normalized images of random uint8 pixels, a quarter of them at 0 or 255 (clipping bites)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (n, *shape))
  pixels = np.where(rng.random(pixels.shape) < 0.25, 255 * rng.integers(0, 2, pixels.shape),
                    pixels)
  return NORM.host(pixels.astype(np.uint8)), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def linear():
  images, labels = _images()
  model = Linear()
  return model, testutil.np_init(model, images, seed=1), images, labels


def _linear_gradient(variables, x, y):
  """d CE / d x of one example, in closed form (float64)."""
  w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
  z = x.reshape(-1).astype(np.float64) @ w + b
  p = np.exp(z - z.max())
  p /= p.sum()
  p[y] -= 1.0
  return (w @ p).reshape(x.shape)


def _reference_fgsm(gradient, images, labels, eps, space):
  """One example at a time: `authors` steps the normalized input by eps sign(g); `pixel` maps
  the example to [0, 1] pixels, steps by eps sign of the pixel gradient (g / std), clips to
  [0, 1] and maps back."""
  out = []
  for x, y in zip(np.asarray(images, np.float64), labels):
    g = gradient(x, y)
    if space == "authors":
      out.append(x + eps * np.sign(g))
    else:
      pixels = x * STD + MEAN
      pixels = np.clip(pixels + eps * np.sign(g / STD), 0.0, 1.0)
      out.append((pixels - MEAN) / STD)
  return np.stack(out), np.stack([gradient(x, y) for x, y in zip(images, labels)])


def _assert_same_step(got, want, grads, atol=2e-5):
  """`got == want` wherever the gradient's sign is not in doubt (|g| above float32 noise)."""
  sure = np.abs(grads) > 1e-4 * np.abs(grads).max()
  assert sure.mean() > 0.95
  np.testing.assert_allclose(np.asarray(got)[sure], want[sure], atol=atol)


@pytest.mark.parametrize("space", adversarial.SPACES)
def test_fgsm_equals_the_closed_form_reference(linear, space):
  model, variables, images, labels = linear
  grad_fn = adversarial.input_gradient(model, variables)
  got = adversarial.fgsm(grad_fn, images, labels, 0.05, SPACES[space])
  want, grads = _reference_fgsm(lambda x, y: _linear_gradient(variables, x, y), images, labels,
                                0.05, space)
  _assert_same_step(got, want, grads)
  moved = np.abs(np.asarray(got) - images)
  if space == "pixel":  # saturated pixels pushed outward stay put; others move eps / std
    assert (moved < 1e-6).any() and np.allclose(moved.max(axis=(0, 1, 2)), 0.05 / STD, rtol=1e-4)
  else:  # the authors' FGSM moves every input by eps and clips nothing
    np.testing.assert_allclose(moved, 0.05, rtol=1e-4)


def test_fgsm_on_a_tiny_vit_equals_a_per_example_reference():
  images, labels = _images(n=4, shape=(16, 16, 3), seed=3)
  model = models.create("vit", 3, width=16, depth=1, num_heads=2, mlp_dim=16, patch_size=8)
  variables = testutil.np_init(model, images)  # random weights: the head is not zero

  @jax.jit
  def one_gradient(x, y):  # one example alone: no batch in the loss
    loss = lambda x: -jax.nn.log_softmax(model.apply(variables, x[None], train=False)[0][0])[y]
    return jax.grad(loss)(x)

  gradient = lambda x, y: np.asarray(one_gradient(jnp.asarray(x, jnp.float32), y), np.float64)
  grad_fn = adversarial.input_gradient(model, variables)
  for space in adversarial.SPACES:
    got = adversarial.fgsm(grad_fn, images, labels, 0.1, SPACES[space])
    want, grads = _reference_fgsm(gradient, images, labels, 0.1, space)
    _assert_same_step(got, want, grads)


@pytest.mark.parametrize("space", adversarial.SPACES)
def test_pgd_with_one_step_and_no_random_start_is_fgsm(linear, space):
  model, variables, images, labels = linear
  grad_fn = adversarial.input_gradient(model, variables)
  fgsm = adversarial.fgsm(grad_fn, images, labels, 0.03, SPACES[space])
  pgd = adversarial.pgd(grad_fn, images, labels, 0.03, SPACES[space], alpha=0.03, steps=1)
  np.testing.assert_allclose(pgd, fgsm, atol=1e-6)
  assert np.abs(np.asarray(fgsm) - images).max() > 0.02


@pytest.mark.parametrize("space", adversarial.SPACES)
def test_pgd_stays_in_the_eps_ball_and_the_pixel_range(linear, space):
  model, variables, images, labels = linear
  grad_fn = adversarial.input_gradient(model, variables)
  eps, s = 0.04, SPACES[space]
  adv = np.asarray(adversarial.pgd(grad_fn, images, labels, eps, s, alpha=0.03, steps=5,
                                   key=jax.random.key(0)))
  radius = eps * np.asarray(s.scale)  # per channel, in the model's input units
  assert (np.abs(adv - images) <= radius + 1e-6).all()  # float32 rounding of x + delta
  assert np.abs(adv - images).max() > 0.9 * radius.min()  # it did move to the boundary
  lo, hi = adversarial.make_space("pixel", NORM).bounds
  inside = (adv >= np.asarray(lo)) & (adv <= np.asarray(hi))
  if space == "pixel":
    assert inside.all()
  else:  # the authors' PGD projects onto the ball only: saturated pixels leave the range
    assert not inside.all()


def test_pixel_space_bounds_are_the_normalized_pixels_0_and_255():
  lo, hi = SPACES["pixel"].bounds
  np.testing.assert_allclose(lo, -MEAN / STD, rtol=1e-6)
  np.testing.assert_allclose(hi, (1 - MEAN) / STD, rtol=1e-6)
  assert SPACES["authors"].bounds is None and SPACES["authors"].start_bounds == (0.0, 1.0)


@pytest.mark.parametrize("space", adversarial.SPACES)
def test_accuracy_at_eps_0_is_the_clean_accuracy(linear, space):
  model, variables, images, labels = linear
  logits, _ = model.apply(variables, images)
  labels = np.where(np.arange(6) < 4, np.argmax(np.asarray(logits), -1), labels)  # 4 right
  clean = int(np.sum(np.argmax(np.asarray(logits), -1) == labels)) / len(labels)
  settings = adversarial.Settings(adversarial.ATTACKS, (0.0, 1.0), SPACES[space], alpha=0.2,
                                  steps=5, random_start=True)
  batches = [dict(image=images[:4], label=labels[:4]), dict(image=images[4:], label=labels[4:])]
  res = adversarial.robustness(model, variables, batches, settings, key=jax.random.key(0))
  assert res["num_examples"] == 6 and res["clean_accuracy"] == clean >= 4 / 6
  for attack in adversarial.ATTACKS:
    assert res["attacks"][attack]["eps"] == [0.0, 1.0]
    assert res["attacks"][attack]["accuracy"][0] == clean
    assert res["attacks"][attack]["accuracy"][1] < clean  # a large eps does hurt


def test_the_command_overlays_two_runs(tmp_path):
  workdirs = [testutil.make_analysis_run(tmp_path / name, name) for name in ("vit_a", "vit_b")]
  testutil.run_analysis_main("adversarial", *[f"--workdir={w}" for w in workdirs],
                             f"--out={tmp_path}", "--num_examples=16", "--batch_size=8",
                             "--attack_eps=0,0.05,0.3", "--pgd_steps=2")
  result = json.load(open(tmp_path / "adversarial.json"))
  assert [r["label"] for r in result["runs"]] == ["vit_a", "vit_b"]
  for r in result["runs"]:
    assert r["attack_space"] == "authors" and r["pgd_steps"] == 2 and r["num_examples"] == 16
    for attack in ("fgsm", "pgd"):
      assert r["attacks"][attack]["eps"] == [0.0, 0.05, 0.3]
      assert r["attacks"][attack]["accuracy"][0] == r["clean_accuracy"]
  png = (tmp_path / "adversarial.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_command_on_one_run_in_pixel_space(tmp_path):
  workdir = testutil.make_analysis_run(tmp_path / "vit_a", "vit_a")
  testutil.run_analysis_main("adversarial", f"--workdir={workdir}", "--num_examples=8",
                             "--batch_size=8", "--attacks=pgd", "--attack_eps=0.01",
                             "--attack_space=pixel", "--pgd_steps=1", "--pgd_random_start=false")
  result = json.load(open(tmp_path / "vit_a" / "adversarial.json"))
  assert result["attack_space"] == "pixel" and list(result["attacks"]) == ["pgd"]
  assert not result["pgd_random_start"] and result["label"] == "vit_a @1"


@pytest.mark.parametrize("args, message", [
    (["--attacks=fgsm,cw"], "--attacks must name some of"),
    (["--attack_eps=0,-1"], "--attack_eps must be finite numbers >= 0"),
    (["--attack_eps=small"], "--attack_eps must be numbers"),
    (["--pgd_steps=0"], "--pgd_steps >= 1"),
])
def test_bad_flags_are_user_errors_before_any_run_is_read(tmp_path, args, message):
  with pytest.raises(errors.UserError, match=message):
    testutil.run_analysis_main("adversarial", f"--workdir={tmp_path / 'missing'}", *args)


def test_pgd_random_start_is_clamped_as_the_authors_do(linear):
  """Their start is `clamp(x + U(-eps, eps), 0, 1)` of the normalized tensor (`authors`); the
  pixel space starts inside the ball and the pixel range."""
  model, variables, images, labels = linear
  grad_fn = adversarial.input_gradient(model, variables)
  start = {name: np.asarray(adversarial.pgd(grad_fn, images, labels, 0.5, s, alpha=0.1, steps=0,
                                            key=jax.random.key(3)))
           for name, s in SPACES.items()}
  assert start["authors"].min() >= 0 and start["authors"].max() <= 1
  assert np.ptp(start["authors"]) > 0.5  # not all clamped to one value
  lo, hi = SPACES["pixel"].bounds
  radius = 0.5 * np.asarray(SPACES["pixel"].scale)
  assert (np.abs(start["pixel"] - images) <= radius + 1e-6).all()
  assert (start["pixel"] >= np.asarray(lo)).all() and (start["pixel"] <= np.asarray(hi)).all()
  assert not np.allclose(start["pixel"], images)
