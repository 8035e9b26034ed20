r"""Sweeps: run every point of a grid, here one after another or as a SLURM job array.

A sweep is a config file that also defines `get_sweep(arg)`: a list of points, each a dict of
overrides of that file's `get_config`. A plain key (`model`, `lr`, `seed`) is a config
*argument* (merged into `--config=FILE:ARG`); a key starting with `config.` is a config *field*
(`--config.optimizer.lr=...`). `product(...)` builds a grid:

  def get_sweep(arg=None):
    return sweep.product(model=("vit", "resnet"), opt=("sgd", "adam"), seed=(0, 1))

  python -m vitreg_jax.sweep configs/optimizer_study.py:data=dominoes --workdir=/runs/opt \
      [--local | --slurm | --dry-run] [--sbatch_args='--partition=gpu --gpus=1']

Each point trains with `python -m vitreg_jax.main` into its own workdir `ROOT/<name>`, the
name made of its overrides (`model=vit,opt=sgd,seed=0`). A point whose run exited cleanly gets
a `sweep_done.json` (command, wall time) and is skipped by later invocations; an interrupted
point resumes from its newest checkpoint (the trainer does that by itself; SIGTERM to the
sweep is passed on to the running point, which saves and is left to resume, not marked done);
a point whose run failed (e.g. diverged) gets `sweep_failed.json` and is skipped unless `--retry_failed`.
`--slurm` submits one array job over the unfinished points through `launch/slurm_array.sh`,
whose tasks call this module back with `--index`. `--dry-run` prints every command and runs
nothing. Read the results with `python -m vitreg_jax.report ROOT`.
"""

import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

DONE_FILE = "sweep_done.json"
FAILED_FILE = "sweep_failed.json"
LAUNCHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "launch", "slurm_array.sh")


def product(**axes) -> list[dict]:
  """The grid of every combination of `axes` (name -> sequence of values), first axis slowest."""
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
      raise ValueError(f"Sweep axis {name!r} must be a sequence of values, got {values!r}.")
  names = list(axes)
  return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def load_sweep(spec: str) -> tuple[str, str, list[dict]]:
  """Reads `FILE.py[:ARG]`; returns `(path, arg, points)` from the file's `get_sweep(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Sweep file {path!r} not found (give a config file that defines "
                            "get_sweep, e.g. configs/optimizer_study.py:data=dominoes).")
  module_spec = importlib.util.spec_from_file_location("vitreg_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(arg): it is a config, not a sweep. Add "
                     "get_sweep returning a list of override dicts (see vitreg_jax.sweep).")
  points = list(module.get_sweep(arg or None))
  if not points or not all(isinstance(p, dict) and p for p in points):
    raise ValueError(f"{path}: get_sweep must return a non-empty list of non-empty dicts.")
  names = [point_name(p) for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"{path}: get_sweep returned duplicate points {duplicates}.")
  return path, arg, points


def _format(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def point_name(point: dict) -> str:
  """The workdir name of a point: its overrides as `k=v` joined by commas, path-safe."""
  parts = [f"{k[len('config.'):] if k.startswith('config.') else k}={_format(v)}"
           for k, v in point.items()]
  return re.sub(r"[^A-Za-z0-9=,.+\-_()]", "-", ",".join(parts))


def point_command(path: str, arg: str, point: dict, workdir: str) -> list[str]:
  """The `python -m vitreg_jax.main` command line that trains `point` into `workdir`."""
  args = dict(item.partition("=")[::2] for item in (arg or "").split(",") if item)
  flags = []
  for key, value in point.items():
    if key.startswith("config."):
      flags.append(f"--{key}={_format(value)}")
    else:
      args[key] = _format(value)
  config_arg = ",".join(f"{k}={v}" if v != "" else k for k, v in args.items())
  return ([sys.executable, "-m", "vitreg_jax.main",
           f"--config={path}" + (f":{config_arg}" if config_arg else ""),
           f"--workdir={workdir}"] + flags)


def status(workdir: str) -> str:
  """'done', 'failed', 'partial' (started, resumable) or 'new'."""
  if os.path.exists(os.path.join(workdir, DONE_FILE)):
    return "done"
  if os.path.exists(os.path.join(workdir, FAILED_FILE)):
    return "failed"
  return "partial" if os.path.exists(os.path.join(workdir, "config.json")) else "new"


def run_point(command: list[str], workdir: str) -> int | None:
  """Runs one point (output to workdir/sweep.log); records done / failed; returns its rc.

  SIGTERM (a preemption, or the time limit in launch/slurm_array.sh) is passed on to the
  point, which saves and stops; the point is then left resumable (neither done nor failed)
  and None is returned.
  """
  os.makedirs(workdir, exist_ok=True)
  for stale in (DONE_FILE, FAILED_FILE):
    if os.path.exists(os.path.join(workdir, stale)):
      os.remove(os.path.join(workdir, stale))
  start = time.time()
  with open(os.path.join(workdir, "sweep.log"), "a") as log:
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    terminated = []

    def forward(signum, frame):
      del frame
      terminated.append(signum)
      child.send_signal(signum)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
      rc = child.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)
  if terminated:
    return None
  record = {"command": shlex.join(command), "rc": rc, "wall_time_s": time.time() - start}
  if rc != 0:
    with open(os.path.join(workdir, "sweep.log")) as log:
      record["log_tail"] = log.read()[-2000:]
  with open(os.path.join(workdir, DONE_FILE if rc == 0 else FAILED_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return rc


def plan(spec: str, root: str, retry_failed: bool = False):
  """`[(index, name, workdir, command, status, todo)]` for every point of the sweep."""
  path, arg, points = load_sweep(spec)
  rows = []
  for i, point in enumerate(points):
    name = point_name(point)
    workdir = os.path.join(root, name)
    st = status(workdir)
    todo = st in ("new", "partial") or (st == "failed" and retry_failed)
    rows.append((i, name, workdir, point_command(path, arg, point, workdir), st, todo))
  return rows


def run_local(rows, indices=None) -> list[str]:
  """Runs the points still to do, one after another; returns the names that failed."""
  failed = []
  for i, name, workdir, command, st, todo in rows:
    if indices is not None and i not in indices:
      continue
    if not todo:
      print(f"[{i}] {name}: {st}, skipped", flush=True)
      continue
    print(f"[{i}] {name}: {'resuming' if st == 'partial' else 'running'} ...", flush=True)
    rc = run_point(command, workdir)
    if rc is None:
      print(f"[{i}] {name}: stopped by SIGTERM (saved; resumes on the next run)", flush=True)
      failed.append(name)
      break
    print(f"[{i}] {name}: {'done' if rc == 0 else f'FAILED (rc={rc}), see {workdir}/sweep.log'}",
          flush=True)
    if rc:
      failed.append(name)
  return failed


def sbatch_command(spec: str, root: str, indices: list[int], sbatch_args: str = "") -> list[str]:
  """The `sbatch --array=...` command submitting `indices` through launch/slurm_array.sh."""
  return (["sbatch", f"--array={','.join(map(str, indices))}",
           f"--output={os.path.join(root, 'slurm-%A_%a.out')}"]
          + shlex.split(sbatch_args) + [LAUNCHER, spec, root])


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m vitreg_jax.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", help="config file with get_sweep, optionally FILE.py:ARG")
  parser.add_argument("--workdir", required=True, help="root folder: one workdir per point")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--local", action="store_true", help="run here, one after another (default)")
  mode.add_argument("--slurm", action="store_true", help="submit a SLURM job array")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands, run nothing")
  parser.add_argument("--index", type=int, action="append",
                      help="run only these point indices (the SLURM array tasks use it)")
  parser.add_argument("--retry_failed", action="store_true", help="rerun failed points")
  parser.add_argument("--sbatch_args", default="", help="extra sbatch options, one string")
  args = parser.parse_args(argv)
  if "://" in args.workdir and not args.dry_run:  # Rather than a local `gs:` folder.
    parser.error(f"--workdir={args.workdir}: a sweep writes each point's log and status "
                 "files with local file calls; give a local or mounted folder (a single "
                 "training run takes gs:// workdirs, docs/workdirs.md).")

  rows = plan(args.sweep, args.workdir, args.retry_failed)
  if args.index:
    bad = [i for i in args.index if not 0 <= i < len(rows)]
    if bad:
      parser.error(f"--index {bad} out of range: the sweep has {len(rows)} points (0..{len(rows) - 1}).")
  todo = [r[0] for r in rows if r[5] and (not args.index or r[0] in args.index)]
  if args.dry_run:
    for i, name, _, command, st, will in rows:
      print(f"# [{i}] {name} ({st}{'' if will else ', skipped'})")
      print(shlex.join(command))
    if args.slurm and todo:
      print(shlex.join(sbatch_command(args.sweep, args.workdir, todo, args.sbatch_args)))
    return 0
  if args.slurm:
    if not todo:
      print("Every point is done; nothing to submit.")
      return 0
    os.makedirs(args.workdir, exist_ok=True)
    command = sbatch_command(args.sweep, args.workdir, todo, args.sbatch_args)
    print(shlex.join(command), flush=True)
    return subprocess.call(command)
  failed = run_local(rows, set(args.index) if args.index else None)
  print(f"{len(rows)} points; failed: {failed or 'none'}. Report: "
        f"python -m vitreg_jax.report {args.workdir}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
