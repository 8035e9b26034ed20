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
name made of its overrides (`model=vit,opt=sgd,seed=0`). A point whose run reached the
config's total steps (its final evaluation is in metrics.jsonl; see `progress`) gets a
`sweep_done.json` (command, wall time) and is skipped by later invocations; an interrupted
point, including one stopped by SIGTERM (a preemption, which saves and exits cleanly), resumes
from its newest checkpoint on the next invocation (the trainer does that by itself). SIGTERM
to the sweep itself is passed on to the running point, which saves and is left to resume; the
sweep then stops. A point whose run failed (e.g. diverged) gets `sweep_failed.json` and is
skipped unless `--retry_failed`.
`--slurm` submits one array job over the unfinished points through `launch/slurm_array.sh`,
whose tasks call this module back with `--index`. `--dry-run` prints every command and runs
nothing. Read the results with `python -m vitreg_jax.reports ROOT`.
"""

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax.reports import runs as report_runs
from vitreg_jax.training import run_files

DONE_FILE = "sweep_done.json"
FAILED_FILE = "sweep_failed.json"
LAUNCHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "launch", "slurm_array.sh")


def product(**axes) -> list[dict]:
  """The grid of every combination of `axes` (name -> sequence of values), first axis slowest."""
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
      raise errors.UserError(f"Sweep axis {name!r} must be a sequence of values, got {values!r}.")
  names = list(axes)
  return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def load_sweep(spec: str) -> tuple[str, str, list[dict]]:
  """Reads `FILE.py[:ARG]`; returns `(path, arg, points)` from the file's `get_sweep(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.PathNotFoundError(
        f"Sweep file {path!r} not found (give a config file that defines "
        "get_sweep, e.g. configs/optimizer_study.py:data=dominoes).")
  module = config_lib.import_config(path)
  if not hasattr(module, "get_sweep"):
    raise errors.UserError(f"{path} defines no get_sweep(arg): it is a config, not a sweep. Add "
                           "get_sweep returning a list of override dicts (see vitreg_jax.sweep).")
  points = list(module.get_sweep(arg or None))
  if not points or not all(isinstance(p, dict) and p for p in points):
    raise errors.UserError(f"{path}: get_sweep must return a non-empty list of non-empty dicts.")
  names = [point_name(p) for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise errors.UserError(f"{path}: get_sweep returned duplicate points {duplicates}.")
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


def progress(workdir: str) -> tuple[int, int | None, bool]:
  """`(step, total, finished)` of the run in `workdir`, read from what it saved.

  A run is finished when its final evaluation (the last thing the trainer writes, after the
  last checkpoint) is in metrics.jsonl at `total` steps, or, for a config without eval
  splits, when its newest checkpoint is at `total`. An exit code of 0 is not enough: a run
  stopped by SIGTERM (a preemption) saves a checkpoint and exits cleanly. `step` is the newest
  checkpoint's step (0 if none); `total` is None when it cannot be known here (an epoch-based
  config whose dataset is not prepared on this machine).
  """
  step = max(run_files.checkpoint_steps(workdir), default=0)
  try:
    with open(os.path.join(workdir, run_files.CONFIG_FILE)) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError):
    return step, None, False
  total = report_runs.total_steps(config)
  if total is None:
    return step, None, False
  evals, _ = report_runs.read_metrics(workdir)
  if (config.get("data") or {}).get("eval_splits") in ([], ()):
    return step, total, step >= total
  return step, total, any(s >= total for split in evals.values() for s in split)


def status(workdir: str) -> str:
  """'done', 'failed', 'partial' (started, resumable) or 'new'.

  'done' needs the marker and a finished run (`progress`): a marker left over from a run that
  had not reached its total steps (a preempted run, recorded by an older version) is ignored.
  Where the total cannot be known here (see `progress`), the marker is trusted.
  """
  if os.path.exists(os.path.join(workdir, DONE_FILE)):
    _, total, finished = progress(workdir)
    if finished or total is None:
      return "done"
  if os.path.exists(os.path.join(workdir, FAILED_FILE)):
    return "failed"
  return "partial" if os.path.exists(os.path.join(workdir, "config.json")) else "new"


def run_point(command: list[str], workdir: str) -> str | None:
  """Runs one point (output to workdir/sweep.log); returns and records its outcome.

  Returns 'done' (finished: `sweep_done.json`), 'failed' (non-zero exit: `sweep_failed.json`
  with the log's tail) or 'stopped' (exited cleanly before its total steps, e.g. preempted:
  nothing recorded, so the next invocation resumes it). SIGTERM to the sweep (a preemption,
  or the time limit in launch/slurm_array.sh) is passed on to the point, which saves and
  stops; nothing is recorded and None is returned (the caller stops the sweep).
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
  if rc == 0:
    step, total, finished = progress(workdir)
    if not finished and total is not None:
      return "stopped"
    outcome = "done"
  else:
    with open(os.path.join(workdir, "sweep.log")) as log:
      record["log_tail"] = log.read()[-2000:]
    outcome = "failed"
  with open(os.path.join(workdir, DONE_FILE if outcome == "done" else FAILED_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return outcome


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


def run_local(rows, indices=None) -> tuple[list[str], list[str]]:
  """Runs the points still to do, one after another.

  Returns:
    `(failed, stopped)`: the names of points that failed, and of points that exited before
    their total steps (preempted; the next invocation resumes them).
  """
  failed, stopped = [], []
  for i, name, workdir, command, st, todo in rows:
    if indices is not None and i not in indices:
      continue
    if not todo:
      print(f"[{i}] {name}: {st}, skipped", flush=True)
      continue
    print(f"[{i}] {name}: {'resuming' if st == 'partial' else 'running'} ...", flush=True)
    outcome = run_point(command, workdir)
    if outcome is None:
      print(f"[{i}] {name}: stopped by SIGTERM (saved; resumes on the next run)", flush=True)
      stopped.append(name)
      break
    if outcome == "stopped":
      step, total, _ = progress(workdir)
      print(f"[{i}] {name}: stopped at step {step}/{total} (preempted?); rerun to resume",
            flush=True)
      stopped.append(name)
    elif outcome == "failed":
      print(f"[{i}] {name}: FAILED, see {workdir}/sweep.log", flush=True)
      failed.append(name)
    else:
      print(f"[{i}] {name}: done", flush=True)
  return failed, stopped


def sbatch_command(spec: str, root: str, indices: list[int], sbatch_args: str = "") -> list[str]:
  """The `sbatch --array=...` command submitting `indices` through launch/slurm_array.sh."""
  return (["sbatch", f"--array={','.join(map(str, indices))}",
           f"--output={os.path.join(root, 'slurm-%A_%a.out')}"]
          + shlex.split(sbatch_args) + [LAUNCHER, spec, root])


def main(argv=None) -> int:
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
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    return _run(args)


def _run(args) -> int:
  """The sweep `main` parsed: plan, then print, submit or run the points."""
  rows = plan(args.sweep, args.workdir, args.retry_failed)
  if args.index:
    bad = [i for i in args.index if not 0 <= i < len(rows)]
    if bad:
      raise errors.UserError(f"--index {bad} out of range: the sweep has {len(rows)} points "
                             f"(0..{len(rows) - 1}).")
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
  failed, stopped = run_local(rows, set(args.index) if args.index else None)
  print(f"{len(rows)} points; failed: {failed or 'none'}; stopped before the end (rerun to "
        f"resume): {stopped or 'none'}. Report: python -m vitreg_jax.reports {args.workdir}")
  return 1 if failed or stopped else 0


if __name__ == "__main__":
  sys.exit(main())
