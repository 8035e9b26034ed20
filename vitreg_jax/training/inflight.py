"""Keeping the device busy: batches prefetched to the device, steps in flight, and a device-side
record of the first non-finite step (issue 10).

The training loop dispatches a step and moves on; JAX runs it asynchronously. Reading any
step output on the host (`bool(measured['finite'])`) waits for that step, so a per-step check
leaves at most one step queued and the device idles while the host prepares the next batch.
Here the host reads nothing per step:

* `prefetch_to_device(batches, mesh, size)`: the next `size` batches are already transferred
  (sharded global arrays) while the current step runs.
* `StepMonitor`: after each step, a tiny jitted update keeps on the device the number of the
  first step whose loss or gradient was non-finite (`train_step` never applies such a step:
  it returns the previous parameters). `check()` reads it, only at logging, checkpoint and
  end-of-run time, and raises naming that step. `throttle()` bounds the queue to
  `max_in_flight` steps, so the host never runs unboundedly ahead (each queued step holds a
  batch in device memory): it waits for the step `max_in_flight` back, never the latest one.

Usage (see `train.train_and_evaluate`)::

    monitor = StepMonitor(max_in_flight=3)
    for gbatch in prefetch_to_device(host_batches, mesh, size=2):
      state, measured = jitted_train(state, gbatch)
      monitor.record(step, measured)      # no host sync
      ...
      monitor.check()                     # at logging / checkpoint time: raises if bad
"""

import collections
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp

from vitreg_jax import sharding as shd
from vitreg_jax.data import mixing

# What the train step reads: the (uint8) images, the labels and the Mixup/CutMix recipe.
TRAIN_KEYS = ("image", "label", *mixing.BATCH_KEYS)


def prefetch_to_device(batches: Iterable[dict], mesh, size: int = 2,
                       keys=TRAIN_KEYS) -> Iterator[dict]:
  """Yields global (sharded) device batches, keeping the next `size` already transferred.

  `jax.make_array_from_process_local_data` starts the host-to-device copy and returns at
  once, so converting batch k+1..k+size before step k's result is needed overlaps transfer
  and compute. Only those of `keys` the batch has cross to the device (attributes stay on the
  host); images cross as the pipeline's uint8.
  """
  if size < 1:
    raise ValueError(f"prefetch size must be >= 1, got {size}.")
  queue = collections.deque()
  for batch in batches:
    queue.append(shd.to_global({k: batch[k] for k in keys if k in batch}, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


@jax.jit
def _note_first_bad(first_bad, finite, step):
  return jnp.where((first_bad < 0) & ~finite, step, first_bad)


class StepMonitor:
  """Device-side record of the first non-finite step, and a bound on steps in flight.

  Attributes:
    max_in_flight: steps the host may dispatch ahead of the device.
    log: `(step, measurements)` of the steps since the last `take_log()` (device arrays).
  """

  def __init__(self, max_in_flight: int = 3):
    if max_in_flight < 1:
      raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}.")
    self.max_in_flight = int(max_in_flight)
    self.first_bad = jnp.asarray(-1, jnp.int32)
    self.log = []
    self._in_flight = collections.deque()

  def record(self, step: int, measured: dict) -> None:
    """Notes step `step` (1-based: the step count after it) without waiting for it."""
    self.first_bad = _note_first_bad(self.first_bad, measured["finite"],
                                     jnp.asarray(step, jnp.int32))
    self.log.append((step, measured))
    self._in_flight.append(measured["finite"])
    if len(self._in_flight) > self.max_in_flight:
      jax.block_until_ready(self._in_flight.popleft())

  def bad_step(self) -> Optional[int]:
    """The first non-finite step so far, or None (waits for the recorded steps)."""
    bad = int(self.first_bad)
    return None if bad < 0 else bad

  def check(self, on_bad: Callable[[int, Optional[dict]], None]) -> None:
    """Calls `on_bad(step, measurements or None)` if a recorded step was non-finite."""
    bad = self.bad_step()
    if bad is not None:
      measured = next((m for s, m in self.log if s == bad), None)
      on_bad(bad, None if measured is None else jax.device_get(measured))

  def take_log(self) -> list:
    """The host copies of the measurements logged since the last call (one transfer)."""
    logged, self.log = jax.device_get([m for _, m in self.log]), []
    return logged
