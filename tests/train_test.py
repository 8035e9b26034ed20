"""End-to-end training tests: resume after a crash, preemption, NaN, multi-process, errors.

Runs the real loop on the quickstart config shrunk to a tiny ViT and a small dominoes set.
Crashes and preemptions happen in a subprocess (tests/workers/train_worker.py) at a fixed
checkpoint, so the interruption point is deterministic.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vitreg_jax import config_lib
from vitreg_jax.training import pretrained
from vitreg_jax.training import train
from vitreg_jax.training import train_log

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "workers", "train_worker.py")
sys.path.insert(0, os.path.join(HERE, "workers"))
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {
    "model.width": 32, "model.depth": 2, "model.mlp_dim": 64, "model.num_heads": 2,
    "data.num_train": 256, "data.num_val": 64, "data.num_test": 64,
    "batch_size": 32, "eval_batch_size": 64, "total_steps": 12,
    "checkpoint_every_steps": 4, "log_every_steps": 4, "eval_every_steps": 1000,
    "keep_checkpoints": 3,  # Steps 4, 8, 12: room to fall back past two damaged ones.
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 2},
    # Training and resume only: per-head evaluation (single-process only) is tested in
    # tests/heads_test.py.
    "head_eval": "",
}


def _run(workdir, overrides=None, *args, env=None):
  res = subprocess.run(
      [sys.executable, WORKER, str(workdir), json.dumps({**TINY, **(overrides or {})}),
       *args], capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  return res


def _final_params(workdir, step=None):
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  step = steps[-1] if step is None else step
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  # Restore as NumPy: no shardings needed, whatever topology wrote the checkpoint.
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  tree = checkpointer.restore(path, restore_args=as_numpy)
  return step, {k: np.asarray(v) for k, v in _flatten(tree["params"]).items()}


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run (in-process)."""
  workdir = tmp_path_factory.mktemp("reference")
  results = train.train_and_evaluate(train_worker.load_config(TINY), str(workdir))
  return workdir, results


def _assert_same_params(a, b, atol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def test_reference_run_writes_events_metrics_and_checkpoints(reference):
  workdir, results = reference
  assert set(results) == {"val_id", "val_ood"}
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {l["split"] for l in lines} == {"train", "val_id", "val_ood"}
  assert _final_params(workdir)[0] == 12


# The kill and the SIGTERM happen in a real process; the resume that follows is the library
# reading what that process left on disk, so it runs in-process (no second ~15 s of imports).
def test_kill_and_resume_matches_uninterrupted_run(reference, tmp_path, caplog):
  killed = _run(tmp_path, None, "kill:8")
  assert killed.returncode == -9, killed.stderr[-2000:]  # Really died by SIGKILL.
  assert _final_params(tmp_path)[0] == 8
  caplog.set_level("INFO", logger="absl")  # absl's own level may be left at WARNING
  train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  assert "Resumed from step 8" in caplog.text
  _assert_same_params(_final_params(reference[0])[1], _final_params(tmp_path)[1])


def test_sigterm_saves_and_exits_then_resumes(reference, tmp_path):
  # SIGTERM arrives right after the step-4 save; the loop saves the current step and stops.
  term = _run(tmp_path, {"checkpoint_every_steps": 4}, "term:4")
  assert term.returncode == 0, term.stderr[-2000:]
  assert "Preempted" in term.stderr
  step, _ = _final_params(tmp_path)
  assert 4 <= step < 12
  train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  _assert_same_params(_final_params(reference[0])[1], _final_params(tmp_path)[1])


def test_nan_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  make = data.Dataset.train_iterator

  def poisoned(self, *, start_step=0, **kwargs):
    for step, batch in enumerate(make(self, start_step=start_step, **kwargs), start_step):
      if step == 6:  # The 7th step sees a NaN image (float: uint8 cannot hold a NaN).
        batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
      yield batch
  monkeypatch.setattr(data.Dataset, "train_iterator", poisoned)
  with pytest.raises(train_log.NonFiniteLossError, match=r"step 7.*last good checkpoint \(step 4\)"):
    train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  step, params = _final_params(tmp_path)
  assert step == 4
  assert all(np.isfinite(v).all() for v in params.values())


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two(workdir, actions=(None, None), *args, timeout=240):
  """Runs the worker as two JAX processes on localhost; returns [(returncode, stdout, stderr)]."""
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(workdir), json.dumps(TINY),
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}",
       *([actions[i]] if actions[i] else []), *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate() for p in procs]
    pytest.fail(f"the two processes hung:\n{outs[0][1][-2000:]}\n---\n{outs[1][1][-2000:]}")
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_processes_agree_on_preemption_step_and_match_one_process(reference, tmp_path):
  # Only process 1 gets SIGTERM (right after its step-4 save); JAX's preemption sync point
  # makes both save the same later step and exit cleanly, without a hang. Steps are paced
  # (0.5 s) as a real model's would be: the sync protocol runs beside them.
  runs = _run_two(tmp_path, (None, "term:4"), "--step_seconds=0.5")
  saved = []
  for rc, _, err in runs:
    assert rc == 0, err[-3000:]
    saved.append(int(re.search(r"Preempted: saved step (\d+)", err).group(1)))
  assert saved[0] == saved[1] and 4 < saved[0] < 12, saved
  assert _final_params(tmp_path)[0] == saved[0]
  resumed = _run_two(tmp_path)
  for rc, _, err in resumed:
    assert rc == 0, err[-3000:]
    assert f"Resumed from step {saved[0]}" in err
  # Each process fed half of every global batch; the result equals one process feeding all.
  _assert_same_params(_final_params(reference[0])[1], _final_params(tmp_path)[1], atol=1e-5)
  results = json.loads(resumed[0][1].split("RESULTS ", 1)[1])
  np.testing.assert_allclose(results["val_id"]["accuracy"],
                             reference[1]["val_id"]["accuracy"], atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": 1.0}, r"Unknown config field\(s\) \['learning_rate'\].*Valid"),
    ({"model_name": "vitt"}, r"Unknown model 'vitt'; valid names: \[.*'vit'"),
    ({"model.patch_size": 5}, r"not divisible by patch_size=5"),
    ({"data.name": "mnist_cifr"}, r"Unknown dataset 'mnist_cifr'; valid names: \[.*"),
    ({"model.widht": 8}, r"Unknown field\(s\) \['widht'\].*valid fields"),
])
def test_bad_config_fails_fast_naming_valid_choices(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(train_worker.load_config({**TINY, **overrides}), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # No compute was spent.


def test_checkpoint_of_another_model_is_rejected(reference, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
  from vitreg_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import rundir  # pylint: disable=g-import-not-at-top
  config = train_worker.load_config({**TINY, "model.width": 48})
  # The saved config.json names the change first; accepting it, the checkpoint itself is
  # still refused because its shapes do not fit the new model.
  with pytest.raises(rundir.ConfigChangedError, match="model.width: 32 -> 48"):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
    train.train_and_evaluate(config, str(tmp_path), accept_config_change=True)


def test_init_from_checkpoint_reuses_backbone_and_resets_new_head(reference, tmp_path):
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("vit", 5, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
  fresh = model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 16, 3), np.float32))["params"]
  merged = pretrained.init_params_from({"path": str(reference[0])}, jax.device_get(fresh),
                                  model=model, image_hw=(32, 16))
  _, source = _final_params(reference[0])
  merged, fresh = _flatten(merged), _flatten(jax.device_get(fresh))
  for key, value in merged.items():
    if key.startswith("head/"):  # 2 -> 5 classes: a fresh head.
      np.testing.assert_array_equal(value, fresh[key])
    else:
      np.testing.assert_array_equal(value, source[key], err_msg=key)
  wide = models.create("vit", 5, width=48, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
  wide_params = wide.init(jax.random.PRNGKey(1), np.zeros((1, 32, 16, 3), np.float32))["params"]
  with pytest.raises(ValueError, match=r"(?s)does not fit the model.*encoder_norm/bias: source \(32,\) vs model \(48,\)"):
    pretrained.init_params_from({"path": str(reference[0])}, jax.device_get(wide_params),
                           model=wide, image_hw=(32, 16))
  # End to end: a fine-tuning run starts from the source's parameters.
  results = train.train_and_evaluate(train_worker.load_config(
      {**TINY, "total_steps": 1, "schedule": {"name": "constant"}, "init_from": {"path": str(reference[0])}}), str(tmp_path))
  assert results["val_id"]["accuracy"] > 0.6  # The source's accuracy, not chance.


def test_resume_with_changed_config_is_refused_naming_fields(reference, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import rundir  # pylint: disable=g-import-not-at-top
  shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
  saved = open(os.path.join(tmp_path, "config.json")).read()
  changed = {**TINY, "seed": 1, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
             "total_steps": 16}
  with pytest.raises(rundir.ConfigChangedError,
                     match=r"(?s)optimizer\.lr: 0\.05 -> 0\.1.*seed: 0 -> 1.*"
                           r"--accept_config_change") as err:
    train.train_and_evaluate(train_worker.load_config(changed), str(tmp_path))
  assert "total_steps" not in str(err.value)  # Harmless: not among the refused changes.
  assert open(os.path.join(tmp_path, "config.json")).read() == saved  # Not overwritten.
  # More steps and other logging / eval frequencies are accepted (and logged).
  harmless = rundir.check_resume_config(
      config_lib.with_defaults(train_worker.load_config(
          {**TINY, "total_steps": 16, "log_every_steps": 2, "eval_every_steps": 8})),
      str(tmp_path))
  assert set(harmless) == {"total_steps", "log_every_steps", "eval_every_steps"}
  accepted = rundir.check_resume_config(
      config_lib.with_defaults(train_worker.load_config(changed)), str(tmp_path), accept=True)
  assert {"seed", "optimizer.lr", "total_steps"} <= set(accepted)


def test_unreadable_newest_checkpoints_are_skipped_and_set_aside(reference, tmp_path, caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
  # Step 12: the biggest file truncated, as a full disk would leave it. Step 8: the state's
  # metadata missing.
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "12")
           for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  os.remove(tmp_path / "checkpoints" / "8" / "state" / "_METADATA")
  caplog.set_level("INFO", logger="absl")  # absl's own level may be left at WARNING
  train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  for step in (12, 8):
    assert re.search(rf"Skipping the checkpoint of step {step} .*cannot be read \(\w+",
                     caplog.text), step
    assert os.path.isdir(tmp_path / "checkpoints.skipped" / str(step))
  assert "Resumed from step 4" in caplog.text
  # The same parameters as the uninterrupted run.
  _assert_same_params(_final_params(reference[0])[1], _final_params(tmp_path)[1])


def test_kill_during_async_save_resumes_from_previous_step(reference, tmp_path, caplog):
  killed = _run(tmp_path, None, "killsave:8")
  assert killed.returncode == -9, killed.stderr[-2000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert "8" not in names and any(n.startswith("8.orbax-checkpoint-tmp") for n in names), names
  caplog.set_level("INFO", logger="absl")  # absl's own level may be left at WARNING
  train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  assert re.search(r"Removing the unfinished checkpoint save \S*/8\.orbax-checkpoint-tmp",
                   caplog.text)
  assert "Resumed from step 4" in caplog.text
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  _assert_same_params(_final_params(reference[0])[1], _final_params(tmp_path)[1])
