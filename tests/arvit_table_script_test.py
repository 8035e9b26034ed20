"""scripts/arvit_table.sh (ARViT Table 1 on embedded data): its plan, without training.

`DRY_RUN=1` prints the commands: every fine-tuning run must come after the pretraining run it
starts from, the steps knobs must reach the commands, and every config argument must be one
configs/arvit.py accepts (so a long sweep does not fail at its 40th run).
"""

import os
import subprocess

import testutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "arvit_table.sh")


def plan(tmp_path, **env):
  out = subprocess.run([SCRIPT, str(tmp_path / "runs")], check=True, capture_output=True,
                       text=True, env={**os.environ, "DRY_RUN": "1", **env}).stdout
  return out.strip().splitlines()


def test_every_fine_tuning_follows_its_pretraining(tmp_path):
  lines = plan(tmp_path, ROWS="base R1-1", SEEDS="0 1", PRETRAIN_STEPS="120",
               FINETUNE_STEPS="60")
  runs, tail = lines[:-2], lines[-2:]
  assert len(runs) == 2 * 2 * 3  # rows x seeds x (pretrain, fine-tune, scratch)
  root = str(tmp_path / "runs")
  for seed in (0, 1):
    for row in ("base", "R1-1"):
      rot = f"--workdir={root}/{row}_rot_s{seed}"
      (i,) = [k for k, line in enumerate(runs) if rot in line]
      assert "dataset=embedded_rotation" in runs[i] and "--config.total_steps=120" in runs[i]
      (j,) = [k for k, line in enumerate(runs) if f"{row}_ft_s{seed}" in line]
      assert j > i and f"init={root}/{row}_rot_s{seed}" in runs[j]
      (s,) = [k for k, line in enumerate(runs) if f"{row}_scratch_s{seed}" in line]
      assert "init=" not in runs[s] and "--config.total_steps=60" in runs[s]
  assert tail[0].startswith("python -m vitreg_jax.reports " + root)
  assert f"--workdir={root}/R1-1_ft_s0" in tail[1] and "attention_distance" in tail[1]


def test_default_plan_is_the_issue_subset_and_its_configs_build(tmp_path):
  runs = plan(tmp_path)[:-2]
  assert len(runs) == 6 * 3 * 3
  assert not any("total_steps" in line for line in runs)  # the config's own steps
  for line in runs:
    arg = line.split("--config=configs/arvit.py:")[1].split()[0]
    config = testutil.get_config("arvit", arg)
    assert config.data.name in ("embedded", "embedded_rotation")
    assert ("init=" in arg) == bool((config.get("init_from") or {}).get("path"))


def test_pretraining_steps_must_exceed_the_warmup(tmp_path):
  result = subprocess.run([SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "PRETRAIN_STEPS": "100"})
  assert result.returncode == 2 and "warmup" in result.stderr and not result.stdout
