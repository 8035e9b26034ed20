"""Runs the README's quickstart and prints one JSON object with its outcome.

  python bench/quickstart.py [--seeds 0,1,2] [--workdir_root /tmp/qs_bench]
  python bench/quickstart.py --smoke --workdir_root runs   # seconds: checks it runs

For each seed: wall time of `python -m vitreg_jax.main --config=configs/quickstart.py`
(import, data build, compilation, 600 steps and evaluation), final in-distribution and OOD
accuracy and their gap in points. The acceptance criterion of the foundation issue is
`gap_points >= 10` with `wall_s < 300` on a 2-core CPU.

`--smoke` trains 2 steps and evaluates 64 images per split (`configs/quickstart.py:steps=2,
eval_examples=64`): the same command end to end, whose figures mean nothing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(seed: int, workdir: str, config_arg: str = "") -> dict:
  """One quickstart run in a fresh `workdir` (emptied first) and its final figures."""
  shutil.rmtree(workdir, ignore_errors=True)
  config = "configs/quickstart.py" + (f":{config_arg}" if config_arg else "")
  cmd = [sys.executable, "-m", "vitreg_jax.main", f"--config={config}",
         f"--workdir={workdir}", f"--config.seed={seed}"]
  start = time.time()
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.time() - start
  if res.returncode:  # On a lent machine the JSON must say why, not only that, it stopped.
    tail = "\n".join(res.stderr.strip().splitlines()[-20:])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{tail}")
  final = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] != "train":
        final[record["split"]] = record
  id_acc, ood_acc = final["val_id"]["accuracy"], final["val_ood"]["accuracy"]
  return {"seed": seed, "wall_s": round(wall, 1), "id_accuracy": id_acc,
          "ood_accuracy": ood_acc, "gap_points": round(100 * (id_acc - ood_acc), 2),
          "ood_spurious_accuracy": final["val_ood"].get("spurious_accuracy")}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--workdir_root", default="/tmp/vitreg_quickstart_bench")
  parser.add_argument("--smoke", action="store_true",
                      help="seconds: 2 steps, 64 eval images per split (figures meaningless)")
  args = parser.parse_args(argv)
  # The runs start from the repository root: a relative folder means the caller's.
  args.workdir_root = os.path.abspath(args.workdir_root)
  return args


def main(argv=None):
  args = parse_args(argv)
  config_arg = "steps=2,eval_examples=64" if args.smoke else ""
  runs = [run(int(s), os.path.join(args.workdir_root, f"seed{s}"), config_arg)
          for s in args.seeds.split(",")]
  print(json.dumps({"runs": runs, "min_gap_points": min(r["gap_points"] for r in runs),
                    "max_wall_s": max(r["wall_s"] for r in runs), "smoke": args.smoke}))


if __name__ == "__main__":
  main()
