"""Cost of the Hessian and loss-landscape analyses; prints one JSON object.

    python bench/analysis.py [--batch 32] [--num_batches 10] [--top_k 5] [--max_iter 100]
        [--repeats 5] [--image 224] [--skip_spectrum] [--landscape_points 8]
    python bench/analysis.py --smoke      # seconds: a tiny ViT, checks it runs

Model: ViT-Ti/16 (5.7 M parameters) at `--image` px, 1000 classes, random weights, a
random batch of `--batch` images (the figures do not depend on the data). `--smoke` runs
every part on a tiny ViT (`SMOKE_MODEL`, 16 px, batch 2, one round, a 1-eigenvalue spectrum of
2 iterations on one batch, 2 landscape points): it checks that the script runs, and its
figures mean nothing.

* `hvp_over_grad`: median time of one Hessian-vector product (forward-over-reverse, as
  `vitreg_jax.analysis.operators.hvp`) / one gradient of the same objective, same batch and
  model, both jitted and timed after compilation, round-robin over `--repeats` rounds so load
  drifts hit both alike. Target <= 2.5.
* `block_hvp_over_grad`: the same ratio for one block's own Hessian (`--params=REGEX`: the
  vector restricted to the block, `objective.Objective.restrict`) for the MSA and MLP of the
  first and last blocks, and `per_block_hvp_over_grad` for the masked product `P H P` that
  `--per_block` uses (one compilation for every block), both over the whole model's gradient.
* `spectrum_seconds`: wall time of the top-`--top_k` power-iteration spectrum over
  `--num_batches` batches (`hessian.make_batch_analysis`'s jitted per-batch function;
  compile excluded, reported apart as `spectrum_compile_seconds`), with `products` the HVPs
  it used.
* `landscape_points_per_s`: loss-landscape points (training loss and accuracy of
  `theta0 + a d1 + b d2` on the batch) per second, `analysis.landscape`'s compiled scan over
  `--landscape_points` points, median over `--repeats` calls after compilation
  (`landscape_compile_seconds`); 0 points skips it.
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from vitreg_jax import models
from vitreg_jax.analysis import hessian
from vitreg_jax.analysis import landscape
from vitreg_jax.analysis import objective
from vitreg_jax.analysis import operators


def timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def landscape_figures(obj, batch, a) -> dict:
  directions = jax.random.normal(jax.random.PRNGKey(2), (2, obj.theta.size))
  evaluate = landscape.make_evaluator(obj, obj.theta, directions)
  coords = jax.random.uniform(jax.random.PRNGKey(3), (a.landscape_points, 2), minval=-1)
  compile_seconds = timed(evaluate, coords, batch)
  seconds = statistics.median(timed(evaluate, coords, batch) for _ in range(a.repeats))
  return dict(landscape_compile_seconds=compile_seconds, landscape_points=a.landscape_points,
              landscape_points_per_s=a.landscape_points / seconds)


def median_times(fns: dict, repeats: int) -> dict:
  """Median seconds of each jitted `fn(*args)` after compiling, round-robin over `repeats`
  rounds so that load drifts hit every function alike."""
  for fn, args in fns.values():
    timed(fn, *args)  # compile
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, (fn, args) in fns.items():
      times[k].append(timed(fn, *args))
  return {k: statistics.median(t) for k, t in times.items()}


MODEL = ("ViT-Ti/16", dict(variant="Ti/16"), 1000)  # (name, ViT kwargs, classes)
SMOKE_MODEL = ("tiny ViT", dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8), 10)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--num_batches", type=int, default=10)
  p.add_argument("--top_k", type=int, default=5)
  p.add_argument("--max_iter", type=int, default=100)
  p.add_argument("--skip_spectrum", action="store_true")
  p.add_argument("--landscape_points", type=int, default=8)
  p.add_argument("--smoke", action="store_true",
                 help="seconds: a tiny ViT at 16 px, batch 2, 1 round, top-1 spectrum of 2 "
                      "iterations on 1 batch, 2 landscape points (figures meaningless)")
  a = p.parse_args(argv)
  if a.smoke:
    a.batch, a.image, a.repeats, a.num_batches, a.top_k, a.max_iter = 2, 16, 1, 1, 1, 2
    a.landscape_points = 2
  return a


def main(argv=None):
  a = parse_args(argv)
  name, kwargs, num_classes = SMOKE_MODEL if a.smoke else MODEL
  model = models.create("vit", num_classes, head_zeroinit=False, **kwargs)
  key = jax.random.PRNGKey(0)
  shape = (a.batch, a.image, a.image, 3)
  variables = jax.jit(model.init)(key, jnp.zeros(shape))
  obj = objective.Objective(model, variables, num_classes=num_classes, weight_decay=1e-4)
  loss, theta = obj.loss, obj.theta
  batch = {"image": jax.random.normal(key, shape),
           "label": jax.random.randint(key, (a.batch,), 0, num_classes)}
  v = jax.random.normal(jax.random.PRNGKey(1), theta.shape)
  fns = {"grad": (jax.jit(jax.grad(loss)), (theta, batch)),
         "hvp": (jax.jit(functools.partial(operators.hvp, loss)), (theta, batch, v))}
  blocks = objective.param_blocks(obj.names)
  mask = obj.mask(blocks[0][2])
  fns["masked"] = (jax.jit(lambda t, b, v, m: operators.masked(
      functools.partial(operators.hvp, loss, t, b), m)(v)), (theta, batch, v, mask))
  for label, _, regex in blocks[:2] + blocks[-2:]:
    sub = obj.restrict(regex)
    fns[label] = (jax.jit(functools.partial(operators.hvp, sub.loss)),
                  (sub.theta, batch, jax.random.normal(key, sub.theta.shape)))
  med = median_times(fns, a.repeats)
  res = dict(model=name, smoke=a.smoke, image=a.image, batch=a.batch, num_params=int(theta.size),
             backend=jax.default_backend(), devices=jax.device_count(),
             grad_seconds=med["grad"], hvp_seconds=med["hvp"],
             hvp_over_grad=med["hvp"] / med["grad"],
             per_block_hvp_over_grad=med["masked"] / med["grad"],
             block_hvp_over_grad={b[0]: med[b[0]] / med["grad"]
                                  for b in blocks[:2] + blocks[-2:]})
  if a.landscape_points:
    res.update(landscape_figures(obj, batch, a))
  if not a.skip_spectrum:
    analyse = hessian.make_batch_analysis(functools.partial(operators.hvp, loss), theta.size,
                                          top_k=a.top_k, max_iter=a.max_iter)
    res["spectrum_compile_seconds"] = timed(analyse, theta, batch, key)
    start, products = time.perf_counter(), 0
    for i in range(a.num_batches):
      b = {"image": jax.random.normal(jax.random.fold_in(key, i), shape), "label": batch["label"]}
      products += int(jax.device_get(analyse(theta, b, jax.random.fold_in(key, i)))[
          "products"].sum())
    res.update(spectrum_seconds=time.perf_counter() - start, num_batches=a.num_batches,
               top_k=a.top_k, max_iter=a.max_iter, products=products)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
