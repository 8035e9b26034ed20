"""Device mesh, shardings and multi-host helpers.

One code path for 1 CPU, 8 simulated devices, a GPU node or a TPU pod: a 1-D `Mesh` over
all devices with a single axis `'data'`. The batch is split along `'data'`; parameters and
optimizer state are replicated, or, with `config.sharding.fsdp`, every large array is split
along its largest dimension divisible by the number of devices (ZeRO-3 / FSDP style; XLA
inserts the all-gathers). Each process feeds its own slice of the global batch and
`jax.make_array_from_process_local_data` assembles the global array.
"""

import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vitreg_jax import errors

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Explicit arguments win; otherwise the standard environment variables
  (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) are read, and on SLURM
  (`SLURM_NTASKS` > 1) or TPU pods jax's own cluster auto-detection fills them in. A single
  process with none of these set is left alone.
  """
  addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  n = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
  pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if not (addr or n > 1 or slurm or tpu_pod):
    return
  # CPU collectives across processes need gloo. The flag only concerns the CPU backend, so
  # it is harmless on GPU/TPU; asking for the backend here would initialize it too early.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if addr:
    kwargs = dict(coordinator_address=addr, num_processes=n or None,
                  process_id=int(pid) if pid is not None else None)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, num_shards: int, min_size: int) -> P:
  """PartitionSpec splitting the largest dimension divisible by `num_shards`.

  Arrays smaller than `min_size` elements (biases, norms) stay replicated: gathering them
  would cost more latency than the memory it saves.
  """
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False,
                    min_size: int = 2**14) -> Any:
  """Shardings for a (possibly abstract) pytree of arrays: replicated, or FSDP-split."""
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_size)), abstract_state)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  n, p = mesh.devices.size, jax.process_count()
  if global_batch_size % n or global_batch_size % p:
    raise errors.UserError(
        f"batch_size={global_batch_size} must be divisible by the number of devices ({n}) "
        f"and of processes ({p}); set --config.batch_size to a multiple of {np.lcm(n, p)}.")


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's slice (its rows of the global batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
