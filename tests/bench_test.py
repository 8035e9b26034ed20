"""Every bench/ script runs in its smallest mode (`--smoke`) from a fresh folder.

A lent GPU machine starts bare, and its time is short: a bench that cannot start there (a
folder it expected from an earlier run, a path read relative to the wrong folder, a flag that
`bench/gpu_run.sh` passes but the script no longer takes) wastes the lease. So each script runs
here as a user would from an empty temporary folder (the working directory, and where every
output goes), with nothing left from an earlier run, and prints the JSON keys its docstring
promises. The scripts run in this process (`main(argv)`) where that saves an interpreter and a
JAX start each; those whose code path is a subprocess (the quickstart's and the `heads`
command's runs, the compile-flag probes) start it as they always do. Their figures are not
checked: `--smoke` sizes mean nothing, only that the code runs end to end.

`bench/timm_step.py` needs torch and timm, never dependencies of this package: where no
Python has them (`bench/make_torch_venv.sh` makes one), its torch part is skipped with that
reason, and what runs is its one-line message and the flags `bench/train_step.py` passes it.
`bench/make_torch_venv.sh` downloads PyTorch, so here it is only parsed (`bash -n`).
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# Every file in bench/ and the test that runs it: a new script must join this table.
COVERED = {"analysis.py", "arvit_overhead.py", "data.py", "div_scale.py", "heads.py",
           "input_ratio.py", "quickstart.py", "regularizers.py", "test_compile_flags.py", "timm_step.py",
           "train_step.py", "xla_cpu_flags.py", "gpu_run.sh", "make_torch_venv.sh"}


@pytest.fixture(name="bench")
def _bench(tmp_path, monkeypatch):
  """`load(name)`: bench/<name>.py as a fresh module, the working directory an empty folder.

  The scripts that import a sibling (`import train_step`) put bench/ on `sys.path`; that and
  the sibling modules are undone afterwards, so no later test imports a script by accident.
  """
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", list(sys.path))
  before = set(sys.modules)

  def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  yield load
  for name in set(sys.modules) - before:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if os.path.dirname(os.path.abspath(path)) == BENCH:
      del sys.modules[name]


def smoke(bench, capsys, name, *argv):
  """Runs `bench/<name>.py --smoke ARGV` in this process; its stdout as one JSON object."""
  bench(name).main(["--smoke", *argv])
  return json.loads(capsys.readouterr().out)


def test_every_bench_file_has_a_test():
  assert set(os.listdir(BENCH)) - {"__pycache__"} == COVERED


def test_heads_from_a_fresh_folder(bench, capsys, tmp_path):
  # A relative --run_dir that does not exist yet: the FileNotFoundError.
  out = smoke(bench, capsys, "heads", "--run_dir=runs")
  assert out["smoke"] and out["mask_eval_over_eval"] > 0
  evaluator = out["evaluator"]
  assert evaluator["mask_eval_over_eval_last_layer"] > 0
  assert evaluator["compilations"] == evaluator["compilations_last_layer"] == 1
  assert out["run"].startswith(str(tmp_path / "runs"))
  assert set(out["command"]) == {"oracle"}
  assert out["command"]["oracle"]["wall_s"] > 0
  assert out["command"]["oracle"]["compilations"] >= 1


def test_quickstart_from_a_fresh_folder(bench, capsys, tmp_path):
  out = smoke(bench, capsys, "quickstart", "--workdir_root=runs")
  (run,) = out["runs"]
  assert {"seed", "wall_s", "id_accuracy", "ood_accuracy", "gap_points"} <= set(run)
  assert {"min_gap_points", "max_wall_s"} <= set(out)
  assert (tmp_path / "runs" / "seed0" / "metrics.jsonl").exists()


def test_train_step(bench, capsys):
  out = smoke(bench, capsys, "train_step")
  figures = out["models"]["tiny"]
  for key in ("images_per_s", "model_flops_per_image", "xla_flops_per_image", "step_seconds"):
    assert figures[key] > 0, key
  assert figures["finite"]
  assert out["timm"] == {"skipped": "--no_timm"}  # Said, not pretended.
  assert out["setting"].startswith("smoke")


def test_xla_cpu_flags(bench, capsys):
  out = smoke(bench, capsys, "xla_cpu_flags")
  variants = out["models"]["tiny"]
  assert variants["default"]["over_default"] == 1.0 and variants["default"]["finite"]
  for name, figures in variants.items():  # A variant XLA rejects reports its error.
    assert "error" in figures or figures["step_seconds"] > 0, name


def test_input_ratio(bench, capsys):
  out = smoke(bench, capsys, "input_ratio")
  for key in ("real_over_synthetic", "real_step_seconds", "synthetic_step_seconds",
              "pipeline_only_images_per_s"):
    assert out[key] > 0, key
  assert out["setting"].startswith("smoke")


def test_regularizers(bench, capsys):
  out = smoke(bench, capsys, "regularizers")
  for key in ("div_step_ratio", "div_step_ratio_mnist_cifar_paper_batch",
              "div_step_ratio_quickstart", "distance_step_ratio", "similarity_step_ratio",
              "div_loop_over_vectorized", "div_loop_over_vectorized_12_heads"):
    assert out[key] > 0, key
  assert out["smoke"]


def test_arvit_overhead(bench, capsys):
  out = smoke(bench, capsys, "arvit_overhead")
  for setting in ("embedded", "paper"):
    assert out[setting]["distance_over_base"] > 0 and out[setting]["similarity_over_base"] > 0
    assert out[setting]["rows"] == {"base": "base", "distance": "L1", "similarity": "R1-1"}
  assert out["paper"]["patch_size"] == 16 and out["embedded"]["patch_size"] == 4
  # The thesis' own epoch ratios, printed beside ours: 18m20s and 18m44s over 16m44s.
  assert abs(out["thesis_epoch_ratio"]["distance"] - 1100 / 1004) < 1e-9
  assert out["smoke"]


def test_analysis(bench, capsys):
  out = smoke(bench, capsys, "analysis")
  for key in ("hvp_over_grad", "per_block_hvp_over_grad", "spectrum_seconds",
              "landscape_points_per_s"):
    assert out[key] > 0, key
  assert len(out["block_hvp_over_grad"]) == 4 and out["products"] >= 1


def test_data(bench, capsys):
  out = smoke(bench, capsys, "data")
  for key in ("preprocess_images_per_s_per_core", "cifar32_preprocess_images_per_s_per_core",
              "grain_images_per_s", "train_step_images_per_s", "cores_to_feed_train_step"):
    assert out[key] > 0, key
  assert "tfdata_images_per_s" in out  # None where TensorFlow is missing.


def test_div_scale(bench, capsys):
  out = smoke(bench, capsys, "div_scale")
  for key in ("L_code", "L_paper", "grad_code", "grad_paper", "weight_paper_by_value",
              "weight_paper_by_grad"):
    assert out[key] > 0, key
  assert out["data"] == "dominoes" and len(out["per_seed"]["code"]) == 1


def test_compile_flags(bench, capsys):
  out = smoke(bench, capsys, "test_compile_flags")
  probe = out["O0_no_fusion_emitters"]
  assert probe["compile_s"] > 0 and probe["init_s"] > 0
  assert probe["loss"] == probe["loss"]  # Finite enough to compare: not NaN.
  assert "compile_O0_over_O0_no_fusion_emitters" not in out  # One set: no ratio pretended.


def test_timm_step_without_torch_says_so_in_one_line(bench, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
  monkeypatch.setitem(sys.modules, "timm", None)
  with pytest.raises(SystemExit) as exit_info:
    bench("timm_step").main(["--smoke"])
  message = exit_info.value.code
  assert isinstance(message, str) and "\n" not in message  # Exit status 1, one line.
  assert "torch" in message and "bench/make_torch_venv.sh" in message


def test_train_step_passes_timm_step_flags_it_accepts(bench):
  train_step, timm_step = bench("train_step"), bench("timm_step")
  for argv in ([], ["--cpu_realistic"], ["--cpu_small"]):
    args = train_step.parse_args(argv + ["--models", "ti,s"])
    for serve in (False, True):
      cmd = train_step._timm_command(  # pylint: disable=protected-access
          args, sys.executable, ["ti", "s"], serve=serve)
      assert cmd[1] == os.path.join(BENCH, "timm_step.py")
      parsed = timm_step.parse_args(cmd[2:])
      assert (parsed.models, parsed.batch, parsed.serve) == ("ti,s", args.batch, serve)


def test_timm_step_with_torch(bench, tmp_path):
  python = bench("train_step").find_torch_python(None)
  if python is None:
    pytest.skip("no Python with torch + timm here (bench/make_torch_venv.sh makes one): the "
                "torch part of bench/timm_step.py is not run")
  res = subprocess.run([python, os.path.join(BENCH, "timm_step.py"), "--smoke"],
                       cwd=tmp_path, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["models"]["ti"]["images_per_s"] > 0 and out["smoke"]


def _gpu_run(*argv, cwd):
  return subprocess.run(["bash", os.path.join(BENCH, "gpu_run.sh"), *argv], cwd=cwd,
                        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("script", ["gpu_run.sh", "make_torch_venv.sh"])
def test_shell_scripts_parse(script):
  res = subprocess.run(["bash", "-n", os.path.join(BENCH, script)], capture_output=True,
                       text=True, check=False)
  assert res.returncode == 0, res.stderr


def test_gpu_run_calls_scripts_with_flags_they_take(bench, tmp_path):
  """`gpu_run.sh --dry_run PART` lists its commands; each script exists and parses them."""
  listed = {}
  for part in ("all", "smoke"):
    res = _gpu_run("--dry_run", part, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
      name, command = re.fullmatch(r"== (\w+): (.*)", line).groups()
      listed[name] = shlex.split(command)
  assert {"train_step", "regularizers", "input_ratio", "analysis", "heads",
          "smoke_heads"} <= set(listed)
  for name, (python, script, *argv) in listed.items():
    assert python == "python3" and os.path.exists(os.path.join(ROOT, script)), name
    bench(os.path.basename(script)[:-3]).parse_args(argv)  # argparse exits on a bad flag.
  assert not os.listdir(tmp_path)  # A dry run writes nothing.
  res = _gpu_run("--dry_run", "no_such_part", cwd=tmp_path)
  assert res.returncode == 2 and "valid:" in res.stderr


def test_gpu_run_writes_each_json_and_log_to_a_relative_out(tmp_path):
  """The real (not dry) path, with stand-ins for python3 and nvidia-smi on PATH: OUT relative
  to the caller's folder is created, one JSON and one log per step, and a failed step is
  reported while the others still run."""
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "nvidia-smi").write_text("#!/bin/sh\necho name\n")
  (fake / "python3").write_text(
      '#!/bin/sh\ncase "$1" in *regularizers*) echo boom >&2; exit 1;; esac\n'
      'echo "{\\"script\\": \\"$1\\"}"\n')
  for f in fake.iterdir():
    f.chmod(0o755)
  caller = tmp_path / "caller"
  caller.mkdir()
  res = subprocess.run(["bash", os.path.join(BENCH, "gpu_run.sh"), "smoke"], cwd=caller,
                       capture_output=True, text=True, check=False,
                       env=dict(os.environ, OUT="out", PATH=f"{fake}:{os.environ['PATH']}"))
  assert res.returncode == 0, res.stderr
  out = caller / "out"
  assert json.loads((out / "smoke_heads.json").read_text()) == {"script": "bench/heads.py"}
  assert (out / "gpu.txt").read_text() == "name\n"
  assert "smoke_regularizers failed:" in res.stdout and "boom" in res.stdout
  assert (out / "smoke_analysis.log").exists()
