"""Tests of the launchers.

SLURM, with stand-in `srun` and `scontrol` first on the PATH: the time-limit signal (USR1 to
the batch script, `--signal=B:USR1@120`) makes the trainer save and stop, and the script
requeue the job; the requeued run resumes from that checkpoint. TPU VMs: launch/tpu_vm.sh's
assembled remote command keeps every override one argument (DRY_RUN=1).
"""

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.mlp_dim=16", "--config.data.num_train=64", "--config.data.num_val=32",
        "--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
        "--config.head_eval="]  # Per-head evaluation: tests/heads_test.py.


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


TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
OVERRIDES = ["--config.init_from.path=/runs/a b", "--config.seed=1; touch PWNED",
             "--config.data.name=it's", "--config.x=$HOME `id` \"q\""]
CONFIG = "configs/quickstart.py:runlocal,reg=div"


def _dry_run():
  res = subprocess.run(["bash", TPU_VM, "my-tpu", "us-central2-b", CONFIG, "gs://b/run 1",
                        *OVERRIDES], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DRY_RUN="1"))
  assert res.returncode == 0, res.stderr
  return [shlex.split(line) for line in res.stdout.splitlines()]


def test_tpu_vm_dry_run_prints_the_commands_with_each_override_one_argument():
  scp, ssh = _dry_run()
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  remote = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
  words = shlex.split(remote)  # What the workers' shell will run.
  train = words[len(words) - 1 - words[::-1].index("&&") + 1:]
  assert train == ["python", "-m", "vitreg_jax.main", f"--config={CONFIG}",
                   "--workdir=gs://b/run 1", *OVERRIDES]


def test_tpu_vm_remote_shell_runs_exactly_those_arguments(tmp_path):
  # The remote command, run by a real POSIX shell with a stand-in `python` and `pip`.
  _, ssh = _dry_run()
  remote = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python").write_text(
      f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
  (bin_dir / "pip").write_text("#!/bin/sh\nexit 0\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  (tmp_path / "vitreg_jax").mkdir()
  res = subprocess.run(["sh", "-c", remote], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path),
                                              PATH=f"{bin_dir}:{os.environ['PATH']}"))
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout) == ["-m", "vitreg_jax.main", f"--config={CONFIG}",
                                    "--workdir=gs://b/run 1", *OVERRIDES]
  assert not (tmp_path / "vitreg_jax" / "PWNED").exists()
