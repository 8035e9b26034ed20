"""Tests of vitreg_jax.sweep: the grid, the commands, the dry run, SLURM submission, when a
point is done, and a tiny local run (two points of a 2-step ViT), one of them preempted by a
SIGTERM and resumed by the next invocation, which a third invocation skips."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from vitreg_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SWEEP = f'''
import importlib.util
from vitreg_jax import sweep

_spec = importlib.util.spec_from_file_location("qs", {os.path.join(ROOT, "configs", "quickstart.py")!r})
_qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_qs)
def get_config(arg=None):
  config = _qs.get_config(arg)   # quickstart, shrunk: a 1-block ViT, tiny splits
  config.model.update(width=16, depth=1, num_heads=2, mlp_dim=16)
  config.data.update(num_train=64, num_val=32)
  config.batch_size, config.eval_batch_size = 16, 32
  return config

def get_sweep(arg=None):
  # Argument axes and a config-field axis (passed as --config.optimizer.lr=0.002).
  return sweep.product(reg=("erm", "div"), steps=(2,), **{{"config.optimizer.lr": (0.002,)}})
'''


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(TINY_SWEEP)
  return str(path)


def test_product_and_names():
  grid = sweep.product(model=("vit", "resnet"), lr=(0.1, 0.03))
  assert grid == [{"model": "vit", "lr": 0.1}, {"model": "vit", "lr": 0.03},
                  {"model": "resnet", "lr": 0.1}, {"model": "resnet", "lr": 0.03}]
  point = {"model": "alternet", "config.model.msa_per_stage": (0, 1), "seed": 1}
  assert sweep.point_name(point) == "model=alternet,model.msa_per_stage=(0,1),seed=1"
  command = sweep.point_command("configs/x.py", "data=cifar100,model=vit", point, "/r/p")
  assert command[1:] == ["-m", "vitreg_jax.main", "--config=configs/x.py:data=cifar100,"
                         "model=alternet,seed=1", "--workdir=/r/p",
                         "--config.model.msa_per_stage=(0,1)"]
  with pytest.raises(ValueError, match="sequence of values"):
    sweep.product(lr=0.1)


def test_bad_sweep_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    sweep.load_sweep(str(tmp_path / "nope.py"))
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.load_sweep(os.path.join(ROOT, "configs", "arvit_r1.py"))


def test_dry_run_prints_every_command_of_the_real_sweeps(capsys, tmp_path):
  for spec, n in (("configs/optimizer_study.py", 24), ("configs/optimizer_study.py:lrs=1,seeds=2", 16), ("configs/optimizer_study.py:data=cifar100", 126),
                  ("configs/msa_buildup.py", 7), ("configs/msa_buildup.py:runlocal", 4)):
    assert sweep.main([os.path.join(ROOT, spec), f"--workdir={tmp_path}", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "vitreg_jax.main" in l]
    assert len(lines) == n, spec
    assert all(f"--workdir={tmp_path}/" in l for l in lines)
  assert "--config.model" not in "\n".join(lines)   # sweep arguments, not field flags


def test_slurm_submits_only_unfinished_points(sweep_file, tmp_path, monkeypatch, capsys):
  root = tmp_path / "root"
  fake = tmp_path / "bin" / "sbatch"
  fake.parent.mkdir()
  fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch_args\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
  rows = sweep.plan(sweep_file, str(root))
  _fake_run(rows[0][2], total=2, evals_at=(2,), checkpoints=(2,), done_marker=True)
  assert sweep.main([sweep_file, f"--workdir={root}", "--slurm",
                     "--sbatch_args=--partition=gpu --gpus=1"]) == 0
  args = (tmp_path / "sbatch_args").read_text().split()
  assert args[0] == "--array=1" and "--partition=gpu" in args and "--gpus=1" in args
  assert args[-3:] == [sweep.LAUNCHER, sweep_file, str(root)]
  assert os.access(sweep.LAUNCHER, os.X_OK)


def _fake_run(workdir, *, total, evals_at=(), checkpoints=(), done_marker=False,
              eval_splits=("val_id",)):
  """A workdir as the trainer leaves it: config.json, metrics.jsonl, checkpoint folders."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"total_steps": total, "data": {"name": "dominoes",
                                              "eval_splits": list(eval_splits)}}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in evals_at:
      f.write(json.dumps({"step": step, "split": "val_id", "accuracy": 0.5}) + "\n")
  for step in checkpoints:
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  if done_marker:
    open(os.path.join(workdir, sweep.DONE_FILE), "w").close()
  return workdir


def test_done_needs_the_final_evaluation_at_total_steps(tmp_path):
  # A preempted run: a checkpoint below the total (and a marker an older version wrote).
  preempted = _fake_run(tmp_path / "a", total=150, evals_at=(25,), checkpoints=(25,),
                        done_marker=True)
  assert sweep.progress(preempted) == (25, 150, False)
  assert sweep.status(preempted) == "partial"
  # Preempted on its last step: the checkpoint is at the total, the final evaluation missing.
  last = _fake_run(tmp_path / "b", total=150, evals_at=(100,), checkpoints=(150,),
                   done_marker=True)
  assert sweep.progress(last) == (150, 150, False) and sweep.status(last) == "partial"
  # Finished, checkpoints deleted afterwards to save disk: the final metrics suffice.
  pruned = _fake_run(tmp_path / "c", total=150, evals_at=(100, 150), done_marker=True)
  assert sweep.progress(pruned) == (0, 150, True) and sweep.status(pruned) == "done"
  # No eval splits: the newest checkpoint decides.
  no_eval = _fake_run(tmp_path / "d", total=10, checkpoints=(10,), eval_splits=(),
                      done_marker=True)
  assert sweep.status(no_eval) == "done"


# Runs vitreg_jax.main, sending the trainer a real SIGTERM after its first step (as a
# preemption would): the trainer saves that step and exits 0.
PREEMPT_AFTER_FIRST_STEP = """
import os, runpy, signal, sys
from vitreg_jax.training import train_log
train = train_log.Reporter.train
def train_then_sigterm(self, step, measured, *extra):
  train(self, step, measured, *extra)
  if step == 1:
    os.kill(os.getpid(), signal.SIGTERM)
train_log.Reporter.train = train_then_sigterm
sys.argv = ["vitreg_jax.main"] + sys.argv[1:]
runpy.run_module("vitreg_jax.main", run_name="__main__")
"""


def test_local_run_resumes_a_preempted_point_and_skips_done_ones(sweep_file, tmp_path, capsys):
  root = str(tmp_path / "root")
  rows = sweep.plan(sweep_file, root)
  assert [r[1] for r in rows] == ["reg=erm,steps=2,optimizer.lr=0.002", "reg=div,steps=2,optimizer.lr=0.002"]
  i, name, workdir, command, st, todo = rows[0]
  wrapper = tmp_path / "preempt.py"
  wrapper.write_text(PREEMPT_AFTER_FIRST_STEP)
  preempted = [command[0], str(wrapper)] + command[3:]   # replaces `-m vitreg_jax.main`
  # Exit code 0 after a SIGTERM is not "done": no marker, the point stays resumable.
  assert sweep.run_local([(i, name, workdir, preempted, st, todo)]) == ([], [name])
  assert "stopped at step 1/2" in capsys.readouterr().out
  with open(os.path.join(workdir, "sweep.log")) as f:
    assert "SIGTERM received" in f.read()
  assert not os.path.exists(os.path.join(workdir, sweep.DONE_FILE))
  assert not os.path.exists(os.path.join(workdir, sweep.FAILED_FILE))
  assert sweep.status(workdir) == "partial"

  # The next invocation resumes it from step 1 and runs the other point.
  assert sweep.main([sweep_file, f"--workdir={root}", "--local"]) == 0
  out = capsys.readouterr().out
  assert f"[0] {name}: resuming" in out and "[1] reg=div,steps=2,optimizer.lr=0.002: running" in out
  with open(os.path.join(workdir, "sweep.log")) as f:
    assert "Resumed from step 1" in f.read()
  rows = sweep.plan(sweep_file, root)
  assert [r[4] for r in rows] == ["done", "done"]
  for _, _, workdir, *_ in rows:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      splits = [json.loads(l)["split"] for l in f]
    assert "train" in splits and "val_ood" in splits
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    assert config["total_steps"] == 2 and config["model"]["width"] == 16
    assert config["data"]["num_val"] == 32 and config["optimizer"]["lr"] == 0.002
  assert json.load(open(os.path.join(rows[1][2], "config.json")))["regularizers"][0]["name"] == "div"

  # A third invocation has nothing to do.
  assert sweep.main([sweep_file, f"--workdir={root}", "--local"]) == 0
  assert capsys.readouterr().out.count(": done, skipped") == 2


def test_sigterm_is_passed_on_and_the_point_left_resumable(tmp_path):
  # A stand-in point that, like the trainer, saves on SIGTERM and exits 0.
  point = ("import pathlib, signal, sys, time\n"
           f"w = pathlib.Path({str(tmp_path)!r})\n"
           "signal.signal(signal.SIGTERM, lambda *a: ((w / 'saved').touch(), sys.exit(0)))\n"
           "(w / 'started').touch()\n"
           "time.sleep(60)\n")
  runner = subprocess.Popen(
      [sys.executable, "-c", "import sys; from vitreg_jax import sweep; "
       f"print('RC', sweep.run_point([sys.executable, '-c', {point!r}], {str(tmp_path)!r}))"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (tmp_path / "started").exists():
    assert runner.poll() is None and time.time() < deadline, runner.communicate()
    time.sleep(0.05)
  runner.send_signal(signal.SIGTERM)  # To the sweep, as srun or a local kill would.
  out, err = runner.communicate(timeout=60)
  assert runner.returncode == 0 and "RC None" in out, (runner.returncode, out, err[-2000:])
  assert (tmp_path / "saved").exists()  # The point got the signal and saved.
  assert not (tmp_path / sweep.DONE_FILE).exists() and not (tmp_path / sweep.FAILED_FILE).exists()
