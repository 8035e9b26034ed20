"""Tests of the SLURM launchers with stand-in `srun` and `scontrol` first on the PATH.

The time-limit signal (USR1 to the batch script, `--signal=B:USR1@120`) makes the trainer save
and stop, and the script requeue the job; the requeued run resumes from that checkpoint.
"""

import os
import re
import signal
import stat
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.mlp_dim=16", "--config.data.num_train=64", "--config.data.num_val=32",
        "--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000"]


def _stand_ins(tmp_path):
  """`srun` runs its command here; `scontrol` records its arguments in scontrol.log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in {"srun": 'exec "$@"',
                     "scontrol": f'echo "$@" >> {tmp_path / "scontrol.log"}'}.items():
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _launch(tmp_path, env):
  workdir = tmp_path / "run"
  return subprocess.Popen(
      ["bash", os.path.join(ROOT, "launch", "slurm.sh"), "configs/quickstart.py:steps=400",
       str(workdir), *TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True), workdir


def _wait_for_training(workdir, job, timeout=300):
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while not (metrics.exists() and '"train"' in metrics.read_text()):
    assert job.poll() is None, job.communicate()[1][-3000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.2)


def test_slurm_time_limit_signal_saves_requeues_and_resumes(tmp_path):
  env = _stand_ins(tmp_path)
  job, workdir = _launch(tmp_path, env)
  _wait_for_training(workdir, job)
  job.send_signal(signal.SIGUSR1)  # What SLURM sends 120 s before the time limit.
  _, err = job.communicate(timeout=300)
  assert job.returncode == 0, err[-3000:]
  saved = int(re.search(r"Preempted: saved step (\d+)", err).group(1))
  assert saved < 400
  assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
  # The requeued job: the same command, no signal this time; it resumes and finishes.
  job, _ = _launch(tmp_path, env)
  _, err = job.communicate(timeout=300)
  assert job.returncode == 0, err[-3000:]
  assert f"Resumed from step {saved}" in err
  assert os.path.isdir(workdir / "checkpoints" / "400")
  assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # Not requeued again.
