"""Every command answers a user's mistake with one line, a non-zero exit status and no traceback.

Each case runs a command exactly as `python -m MODULE ARGS...` would (its `__main__`, fresh
flags, its own process and exit status), in a process forked from one driver that imported
the package's heavy dependencies once: a Python start with jax costs seconds on the 2-core
machine, a fork milliseconds. The driver itself is a subprocess with PYTHONPATH set to this
checkout. A mistake must fail before compute, so every case is quick; the table covers the
mistakes of issue 25 (an unknown dataset, sampler, optimizer or schedule, a bad head count or
batch size, `config.head_eval` outside the model, the README's ARViT command without CIFAR-10)
and more. The last test checks the other half of the contract: a bug keeps its traceback.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "--config=configs/quickstart.py"
LOG_LINE = re.compile(r"[IW]\d{4} ")  # absl's INFO / WARNING lines (TFDS warns of folders)

# Runs each case of the JSON list on stdin in a forked child as `python -m module args` (after
# the case's setup code): its stdout and stderr into one file, its exit status and an uncaught
# exception's traceback as the interpreter would give them.
DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback
PARALLEL = 4  # children at a time
for m in ("jax", "flax.linen", "optax", "vitreg_jax.training.train", "vitreg_jax.heads.select",
          "vitreg_jax.reports.tables", "vitreg_jax.baselines.dfr", "vitreg_jax.analysis.runs",
          "vitreg_jax.analysis.objective", "vitreg_jax.data"):
  __import__(m)
# The quickstart's dominoes, built once here (the children inherit them): most main cases
# read the dataset's info before their mistake is found.
from vitreg_jax import config_lib, data
data.open(config_lib.with_defaults(
    config_lib.load_config_file("configs/quickstart.py")).data)


def start(module, args, setup):
  out = tempfile.TemporaryFile("w+")
  pid = os.fork()
  if pid:
    return pid, out
  os.dup2(out.fileno(), 1)
  os.dup2(out.fileno(), 2)
  sys.argv = [module, *args]
  try:
    exec(setup, {})
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


cases = json.load(sys.stdin)
results, running, todo = [None] * len(cases), {}, list(enumerate(cases))
while todo or running:
  while todo and len(running) < PARALLEL:
    i, (module, args, setup) = todo.pop(0)
    pid, out = start(module, args, setup)
    running[pid] = (i, out)
  pid, status = os.wait()
  i, out = running.pop(pid)
  out.seek(0)
  results[i] = {"status": os.waitstatus_to_exitcode(status), "output": out.read()}
print("RESULTS " + json.dumps(results))
"""


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def run_cases(cases):
  """[(module, args, setup code)] -> [{"status", "output"}], one driver for all of them."""
  proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600, check=False)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert proc.returncode == 0 and line, proc.stderr[-3000:]
  return json.loads(line[0][len("RESULTS "):])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """A config file with an unknown regularizer, one without get_sweep, an empty data_dir."""
  tmp = tmp_path_factory.mktemp("bad_input")
  reg = tmp / "unknown_regularizer.py"
  reg.write_text(
      "from vitreg_jax import config_lib\n"
      "def get_config(arg=None):\n"
      f"  config = config_lib.import_config({ROOT + '/configs/quickstart.py'!r}).get_config()\n"
      "  config.regularizers = [dict(name='no_such_reg', weight=1.0, layers=(-1,))]\n"
      "  return config\n")
  (tmp / "empty_data").mkdir()
  return {"tmp": str(tmp), "reg": str(reg), "data": str(tmp / "empty_data")}


def _cases(p):
  """(module, args, fragment of the expected message) for every entry point."""
  wd = f"--workdir={p['tmp']}/w"
  missing = "--workdir=/nonexistent/run"
  main = "vitreg_jax.main"
  table = [
      (main, [QS, wd, "--config.data.name=cifar11"], "Unknown dataset 'cifar11'"),
      (main, [QS, wd, "--config.head_eval=7"], "config.head_eval: block index 7"),
      (main, [QS, wd, "--config.data.sampler=balanced"], "Unknown data.sampler 'balanced'"),
      (main, [QS, wd, "--config.optimizer.name=nope"], "Unknown optimizer 'nope'"),
      (main, [QS, wd, "--config.schedule.name=no_such_schedule"],
       "Unknown schedule 'no_such_schedule'"),
      (main, [QS, wd, "--config.model.num_heads=5"], "not divisible by num_heads 5"),
      (main, [QS, wd, "--config.batch_size=-3"], "config.batch_size must be a positive"),
      (main, [QS, wd, "--config.eval_every_steps=0"], "config.eval_every_steps must be"),
      (main, [QS, wd, "--config.batch_size=abc"], "--config.batch_size=abc"),
      (main, [QS, wd, "--config.loss.name=dro"], "Unknown config.loss.name 'dro'"),
      (main, [QS, wd, "--config.model_name=vitt"], "Unknown model 'vitt'"),
      (main, [QS, wd, "--config.no_such_field=1"], "Unknown config field config.no_such_field"),
      (main, [QS, wd, "--config.total_epochs=2"], "Set exactly one of config.total_steps"),
      (main, [QS + ":bogus=1", wd], "Unknown config argument 'bogus'"),
      (main, [QS, wd, "--config.data.num_train=abc"], "num_train"),
      (main, [QS, wd, "--config.init_from.path=/nonexistent/ckpt.npz"], "/nonexistent/ckpt.npz"),
      (main, ["--config=configs/no_such_config.py", wd], "no_such_config.py"),
      (main, [f"--config={p['reg']}", wd], "no_such_reg"),
      (main, [QS], "--workdir"),
      # The README's ARViT command on a machine without CIFAR-10: how to prepare it, in one line.
      (main, ["--config=configs/arvit_r1.py", wd, f"--config.data.data_dir={p['data']}"],
       ("FATAL: Dataset 'cifar10'", "python -m vitreg_jax.data.prepare cifar10",
        "--prepare_data")),
      ("vitreg_jax.heads", [missing], "is not a vitreg_jax run directory"),
      ("vitreg_jax.heads", ["--table", "/nonexistent/run"], "is not a vitreg_jax run directory"),
      ("vitreg_jax.heads", [], "pass exactly one of --workdir"),
      ("vitreg_jax.heads", [missing, "--k=two"], "--k: invalid int value"),
      ("vitreg_jax.reports", ["/nonexistent/runs"], "'/nonexistent/runs' is not a directory"),
      ("vitreg_jax.reports", [p["data"]], "No run under"),
      ("vitreg_jax.reports", [p["tmp"], "--target=2"], "--target is an accuracy"),
      ("vitreg_jax.sweep", ["/nonexistent/sweep.py", wd], "Sweep file '/nonexistent/sweep.py'"),
      ("vitreg_jax.sweep", ["configs/arvit_r1.py", wd, "--dry-run"], "defines no get_sweep"),
      ("vitreg_jax.sweep", [QS[len("--config="):], wd, "--dry-run", "--index=99"],
       "--index [99] out of range"),
      ("vitreg_jax.dfr", [missing], "is not a vitreg_jax run directory"),
      ("vitreg_jax.dfr", [missing, "--num_retrains=many"], "--num_retrains: invalid int"),
      ("vitreg_jax.jtt", [missing], "is not a vitreg_jax run directory"),
      ("vitreg_jax.jtt", [], "--workdir"),
      ("vitreg_jax.import_weights", [wd], "Pass either --config=FILE"),
      ("vitreg_jax.import_weights", [wd, "--timm=vit_ti", "--weights=/nonexistent.npz",
                                     "--data=/nonexistent"], "/nonexistent"),
      ("vitreg_jax.heads", [missing, "--select=no_such_rule"], "no_such_rule"),
      ("vitreg_jax.data.prepare", [], "Usage: python -m vitreg_jax.data.prepare NAME"),
      ("vitreg_jax.data.prepare", ["cifar11"], "Unknown dataset 'cifar11'"),
      ("vitreg_jax.data.prepare", ["dominoes", "--option=oops"], "--option must be key=value"),
      ("vitreg_jax.data.prepare", ["dominoes", "--option", "num_train=abc"], "num_train"),
      ("vitreg_jax.data.prepare", ["dominoes", "--no_such_flag"], "no_such_flag"),
  ]
  return table + _analysis_cases(missing)


def _analysis_cases(missing):
  """Every analysis without a run or with a bad flag value (checked before the run is read)."""
  # Every analysis command: each module of vitreg_jax/analysis with a `main`.
  analyses = sorted(p.stem for p in pathlib.Path(ROOT, "vitreg_jax", "analysis").glob("*.py")
                    if "\ndef main(" in p.read_text())
  assert {"calibration", "hessian", "attention_distance"} <= set(analyses)
  table = [(f"vitreg_jax.analysis.{a}", [missing], "is not a vitreg_jax run directory")
           for a in analyses]
  table += [(f"vitreg_jax.analysis.{a}", [], "Pass at least one --workdir") for a in analyses]
  return table + [
      ("vitreg_jax.analysis.hessian", [missing, "--top_k=abc"], "--top_k=abc"),
      ("vitreg_jax.analysis.hessian", [missing, "--method=nope"], "--method"),
      ("vitreg_jax.analysis.hessian", [missing, "--num_batches=0"], "--num_batches must be"),
      ("vitreg_jax.analysis.landscape", [missing, "--grid_points=1"], "must be 0 (skip) or >= 2"),
      ("vitreg_jax.analysis.fourier", [missing, "--num_examples=0"], "--num_examples must be"),
      ("vitreg_jax.analysis.variance", [missing, "--num_examples=0"], "--num_examples must be"),
      ("vitreg_jax.analysis.attention_distance", [missing, "--num_examples=0"],
       "Need --num_examples >= 1 and --batch_size >= 1."),
      ("vitreg_jax.analysis.noise", [missing, "--num_freqs=1"], "--num_freqs >= 2"),
      ("vitreg_jax.analysis.calibration", [missing, "--bins=0"], "--bins >= 1"),
  ]


# A bug planted in the training command: a plain ValueError (not a UserError) from the config
# check. Run in the child before the command, as an import-time patch would be.
PLANTED_BUG = ("from vitreg_jax import config_lib\n"
               "def broken(config):\n"
               "  raise ValueError('planted internal error')\n"
               "config_lib.with_defaults = broken\n")


# The quickstart's dataset made "not prepared" until its `prepare` runs (which says so), and
# downloadable, to follow `main --prepare_data` without a network.
UNPREPARED = (
    "from vitreg_jax.data import base, registry\n"
    "cls = type(registry.DATASETS['dominoes'])\n"
    "real_info, done = cls.info, []\n"
    "def info(self, config):\n"
    "  if not done:\n"
    "    raise base.DatasetNotPreparedError('Dataset dominoes is not prepared (planted).')\n"
    "  return real_info(self, config)\n"
    "def prepare(self, config):\n"
    "  print('PLANTED PREPARE', flush=True)\n"
    "  done.append(1)\n"
    "cls.info, cls.prepare, cls.downloads = info, prepare, True\n")


@pytest.fixture(scope="module")
def outcomes(paths):
  """Every case of the table, then the planted bug and the unprepared dataset without and with
  --prepare_data (each stopped by a bad schedule before any compute), run by one driver."""
  table = _cases(paths)
  cases = [(module, args, "") for module, args, _ in table]
  args = [QS, f"--workdir={paths['tmp']}/extra", "--config.schedule.name=no_such_schedule"]
  cases += [("vitreg_jax.main", args[:2], PLANTED_BUG),
            ("vitreg_jax.main", args, UNPREPARED),
            ("vitreg_jax.main", args + ["--prepare_data"], UNPREPARED)]
  return table, run_cases(cases)


def test_every_entry_point_answers_each_mistake_in_one_line(paths, outcomes):
  table, results = outcomes
  for (module, args, fragments), res in zip(table, results):
    case = f"python -m {module} {' '.join(args)}\n{res['output'][-3000:]}"
    assert res["status"] != 0, case
    for fragment in [fragments] if isinstance(fragments, str) else fragments:
      assert fragment in res["output"], case
    assert "Traceback" not in res["output"], case
    # One line of message: absl's log lines and argparse's usage lines aside, a command
    # prints nothing else (no config dump, no help text).
    lines = [l for l in res["output"].splitlines() if l.strip() and not LOG_LINE.match(l)
             and not l.startswith(("usage:", " ", "Pass --helpshort"))]
    assert len(lines) == 1, case
  assert not os.path.exists(os.path.join(paths["tmp"], "w"))  # No command wrote a run.


def test_a_bug_keeps_its_traceback(outcomes):
  """An internal error is not a user's mistake: no entry point catches it, so its traceback
  shows where it came from."""
  res = outcomes[1][-3]
  assert res["status"] != 0
  assert "Traceback" in res["output"] and "planted internal error" in res["output"], res


def test_prepare_data_prepares_a_missing_dataset_before_the_run(outcomes):
  """Without --prepare_data a missing (downloadable) dataset is one line that names the flag;
  with it, `main` prepares the dataset and goes on (here to the next mistake)."""
  without, with_flag = outcomes[1][-2:]
  assert without["status"] == 1 and "PLANTED PREPARE" not in without["output"]
  assert "not prepared (planted). (or add --prepare_data" in without["output"], without
  assert with_flag["status"] == 1, with_flag
  assert "PLANTED PREPARE" in with_flag["output"], with_flag
  assert "Unknown schedule 'no_such_schedule'" in with_flag["output"], with_flag
  assert "Traceback" not in without["output"] + with_flag["output"]
