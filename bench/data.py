"""Input pipeline vs training step throughput on this machine; prints one JSON object.

  python bench/data.py [--images 64] [--batch 32] [--steps 5] [--model ti] [--no_tf]
  python bench/data.py --smoke      # seconds: 4 JPEGs, 32 px, a tiny ViT; checks it runs

Measures, on JPEGs it generates (ImageNet-like sizes, 300-500 px a side, smooth content):
- `preprocess_images_per_s_per_core`: one thread doing what the ImageNet-style train
  transform of `vitreg_jax.data` does per example: JPEG decode (PIL) + random-resized crop to
  224 + flip (uint8 out: since issue 10 the step normalizes on the device; figures in
  docs/data.md measured before that include a host-side normalize). `..._no_decode_...`: the
  same on already decoded arrays. `cifar32_...`: the CIFAR fine-tuning transform (32x32
  arrays, crop + flip).
- `grain_images_per_s`: the full grain pipeline (`vitreg_jax.data.pipeline.train_iterator`,
  one reader thread per core, batches of `--batch`), and per core.
- `tfdata_images_per_s` (unless --no_tf or TF is missing): the tf.data equivalent
  (`decode_and_crop_jpeg` + resize + flip + normalize, `num_parallel_calls` = cores), for
  comparison only; the library does not use it.
- `train_step_images_per_s`: a ViT train step (patch embedding, pre-LN blocks with
  `jax.nn.dot_product_attention`, CLS head, softmax cross-entropy, AdamW), written here with
  flax/optax, independent of `vitreg_jax.training.train`, on the default JAX device at 224 px.
- `cores_to_feed_train_step` = train images/s / per-core preprocessing images/s: how many
  cores the pipeline needs so the step never waits for data.

`--smoke` runs every part at 32 px on 4 JPEGs (0.2 s per preprocessing rate, 2 grain and
tf.data batches of 2, one step of a tiny ViT): it checks that the script runs, and its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

import numpy as np
from PIL import Image

SIZE = 224


def make_jpegs(count: int, seed: int = 0) -> list:
  """Smooth random images (upsampled low-resolution noise + fine noise), JPEG quality 90."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    h, w = (int(x) for x in rng.integers(300, 501, 2))
    low = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def num_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def bench_preprocess(jpegs: list, seconds: float = 3.0, size: int = SIZE) -> dict:
  from vitreg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  t = preprocess.ImageTransform(size=size, train=True, augment=True,
                                mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
  rng = np.random.default_rng(0)
  decoded = [preprocess.decode_image(b) for b in jpegs]

  def rate(examples):
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      t({'image': examples[n % len(examples)], 'label': 0}, rng)
      n += 1
    return n / (time.perf_counter() - start)

  small = preprocess.ImageTransform(size=32, train=True, augment=True, scale=(0.35, 1.0))
  cifar = [np.asarray(Image.fromarray(d).resize((32, 32))) for d in decoded[:8]]
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    small({'image': cifar[n % len(cifar)], 'label': 0}, rng)
    n += 1
  return {'preprocess_images_per_s_per_core': rate(jpegs),
          'preprocess_no_decode_images_per_s_per_core': rate(decoded),
          'cifar32_preprocess_images_per_s_per_core': n / (time.perf_counter() - start)}


def bench_grain(jpegs: list, batch: int, cores: int, batches: int = 12,
                size: int = SIZE) -> dict:
  from vitreg_jax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top
  source = [{'image': b, 'label': i % 1000} for i, b in enumerate(jpegs)]
  t = preprocess.ImageTransform(size=size, train=True, augment=True,
                                mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
  it = pipeline.train_iterator(source, t, global_batch_size=batch, seed=0,
                               num_threads=cores, prefetch_batches=2 * cores)
  next(it)  # start-up
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  ips = batches * batch / (time.perf_counter() - start)
  return {'grain_images_per_s': ips, 'grain_images_per_s_per_core': ips / cores}


def bench_tfdata(jpegs: list, batch: int, cores: int, batches: int = 12,
                 size: int = SIZE) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  mean = tf.constant([0.485, 0.456, 0.406]) * 255
  std = tf.constant([0.229, 0.224, 0.225]) * 255

  def fn(data):
    shape = tf.image.extract_jpeg_shape(data)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    img = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    img = tf.image.resize(img, [size, size])
    img = tf.image.random_flip_left_right(img)
    return (img - mean) / std

  ds = (tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(fn, num_parallel_calls=cores)
        .batch(batch).prefetch(2))
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = cores
  it = iter(ds.with_options(opts))
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  ips = batches * batch / (time.perf_counter() - start)
  return {'tfdata_images_per_s': ips, 'tfdata_images_per_s_per_core': ips / cores}


VIT = {'ti': (192, 12, 3), 's': (384, 12, 6), 'b': (768, 12, 12),
       'tiny': (32, 2, 2)}  # --smoke's


def bench_train_step(model: str, batch: int, steps: int, size: int = SIZE) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  width, depth, heads = VIT[model]

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      b, n, d = x.shape
      y = nn.LayerNorm()(x)
      qkv = nn.Dense(3 * d)(y).reshape(b, n, 3, heads, d // heads)
      y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
      x = x + nn.Dense(d)(y.reshape(b, n, d))
      y = nn.Dense(4 * d)(nn.LayerNorm()(x))
      return x + nn.Dense(d)(nn.gelu(y))

  class ViT(nn.Module):
    @nn.compact
    def __call__(self, img):
      x = nn.Conv(width, (16, 16), strides=(16, 16))(img)
      x = x.reshape(x.shape[0], -1, width)
      cls = self.param('cls', nn.initializers.zeros, (1, 1, width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, width)), x], axis=1)
      x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
      for _ in range(depth):
        x = Block()(x)
      return nn.Dense(1000)(nn.LayerNorm()(x[:, 0]))

  net = ViT()
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  labels = jnp.arange(batch) % 1000
  # Jitted: one compile, where an eager init compiles every op of the model on its own.
  params = jax.jit(net.init)(jax.random.key(1), images[:1])
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = net.apply(p, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss = step(params, opt_state, images, labels)  # compile
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, images, labels)
  jax.block_until_ready(loss)
  ips = steps * batch / (time.perf_counter() - start)
  return {'train_step_images_per_s': ips, 'train_model': f'ViT-{model.upper()}/16 @ {size}',
          'train_batch': batch, 'train_device': str(jax.devices()[0].device_kind),
          'train_backend': jax.default_backend()}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--train_batch', type=int, default=None)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--model', choices=sorted(VIT), default='ti')
  parser.add_argument('--no_tf', action='store_true')
  parser.add_argument('--size', type=int, default=SIZE, help='crop and model input size')
  parser.add_argument('--seconds', type=float, default=3.0, help='per preprocessing rate')
  parser.add_argument('--batches', type=int, default=12, help='grain and tf.data batches')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: 4 JPEGs, 32 px, 0.2 s per rate, 2 batches of 2, one step '
                           'of a tiny ViT (figures meaningless)')
  args = parser.parse_args(argv)
  if args.smoke:
    args.images, args.size, args.seconds, args.batches, args.batch = 4, 32, 0.2, 2, 2
    args.model, args.steps = 'tiny', 1
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  cores = num_cores()
  jpegs = make_jpegs(args.images)
  out = {'cpu_cores': cores, 'cpu': platform.processor() or platform.machine(),
         'jpeg_count': len(jpegs), 'jpeg_mean_kib': float(np.mean([len(b) for b in jpegs])) / 1024,
         'size': args.size, 'smoke': args.smoke}
  out.update(bench_preprocess(jpegs, args.seconds, args.size))
  out.update(bench_grain(jpegs, args.batch, cores, args.batches, args.size))
  if not args.no_tf:
    try:
      out.update(bench_tfdata(jpegs, args.batch, cores, args.batches, args.size))
    except ImportError:
      out['tfdata_images_per_s'] = None
  out.update(bench_train_step(args.model, args.train_batch or args.batch, args.steps, args.size))
  per_core = out['preprocess_images_per_s_per_core']
  out['cores_to_feed_train_step'] = out['train_step_images_per_s'] / per_core
  out['ratio_preprocess_per_core_to_train_step'] = per_core / out['train_step_images_per_s']
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()},
                   indent=1))


if __name__ == '__main__':
  main()
