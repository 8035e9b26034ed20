r"""The report's command line: tables in the papers' layouts and learning curves, read back
from run workdirs.

  python -m vitreg_jax.reports WORKDIR_OR_PARENT... [--out DIR] [--target 0.8]
  python -m vitreg_jax.reports ...     (the same)

Every run directory (one holding `config.json`, found recursively under the paths given) is
read back (`reports/runs.py`). Runs whose configs differ only by `seed` form one group,
reported as mean +- std over seeds (sample std, n-1; "n" says how many seeds). Tables, as
Markdown (`report.md`, also printed) and CSV (`<table>.csv`), from `reports/tables.py`:

- `runs`: every group, labelled by the config fields that differ between groups: its status,
  the final value of each eval split's accuracy, the final train loss and, with `--target`,
  the steps and wall time until the target accuracy was first reached (the optimizer study
  and the MSA build-up sweeps read this table).
- `poster`: the head-diversity poster's Tables 1-2 (MNIST-CIFAR, Waterbirds; dominoes in the
  same layout), the same table as `python -m vitreg_jax.heads --table`: ID and OOD accuracy
  per method (ViT+ERM, ViT+DIV) and per selection rule (+SEL: oracle, id_conflict, id_val),
  in the authors' statistics from each run's heads_eval.jsonl (`--statistic=final`: the final
  checkpoint); Waterbirds' ID column is the train-weighted mean accuracy and its OOD column the
  mean group accuracy (roles.py), the worst group in its own column; the poster's figure
  beside ours with the difference; its spread the sample std (`--std=authors`: ddof 0, the
  authors' `np.std`).
- `baselines`: head selection beside the spurious-correlation baselines on one dataset: ERM,
  DIV, +SEL, DFR, DFR+SEL, GroupDRO and JTT, each at the level of information it uses, with
  ID, train-weighted mean and worst-group accuracy and the published Waterbirds figures
  (`reports/baselines.py`; shown when GroupDRO / JTT runs or a dfr.json are among the runs).
- `arvit`: ARViT Table 1, model x downstream task top-1, the paper's figure and difference.
- `arvit_embedded`: the same rows on the embedded chain (`reports/arvit.py`), each fine-tuned
  from rotation pretraining and from scratch, the thesis' CIFAR-10 figure beside.
- `how_vits_work`: the CIFAR comparisons (ViT / ResNet / AlterNet, CLS vs GAP, local MSA
  windows, accuracy under corruptions); the slides give one figure (GAP +2.7 points over CLS),
  shown as the difference between our GAP and CLS rows.

Curves (`curves_<table>.png`, `reports/curves.py`): train loss, each regularizer term
`reg/<name>` and each eval split's accuracy against the step, every run of the table overlaid.

Nothing is dropped silently: a run that is unfinished (last step below the configured total),
diverged (non-finite loss, or a failed sweep point), missing an eval split or without
metrics keeps its row, marked in the `status` column; its figures are still shown.
"""

import argparse
import os
import sys

from etils import epath

from vitreg_jax import errors
from vitreg_jax.heads import summary
from vitreg_jax.reports import baselines
from vitreg_jax.reports import arvit
from vitreg_jax.reports import curves
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports import tables as tables_lib


def write_report(paths, out: str, target=None, target_split=None, statistic="authors",
                 std="sample") -> tuple[str, list]:
  """Reads every run under `paths`, writes report.md, <table>.csv and curves_<table>.png."""
  runs = [runs_lib.load(w) for w in runs_lib.find_runs(paths)]
  groups = runs_lib.group_runs(runs)
  tables = [t for t in [baselines.baselines_table(groups), arvit.arvit_embedded_table(groups)]
            if t is not None]
  tables += tables_lib.build_tables(groups, target, target_split, statistic, std)
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  labels = {r.workdir: g.label + (f" s{r.seed}" if len(g.runs) > 1 else "")
            for g in groups for r in g.runs}
  parts = [f"# Report: {len(runs)} runs in {len(groups)} groups\n",
           "Runs: " + ", ".join(f"`{_shown(r.workdir)}`" for r in runs) + "\n"]
  for table in tables:
    table.write_csv(out / f"{table.name}.csv")
    parts.append(table.markdown())
    png = curves.plot_curves(table.runs, labels, out / f"curves_{table.name}.png", table.title)
    if png:
      parts.append(f"![{table.title} curves]({png.name})\n")
  text = "\n".join(parts)
  (out / "report.md").write_text(text)
  return text, tables


def _shown(workdir: str) -> str:
  return workdir if "://" in workdir else os.path.relpath(workdir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vitreg_jax.reports", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run workdirs or folders holding them")
  parser.add_argument("--out", default="report", help="output folder (default ./report)")
  parser.add_argument("--target", type=float, default=None,
                      help="target accuracy (0-1) for steps / wall time to target")
  parser.add_argument("--target_split", default=None,
                      help="eval split of the target (default: the first, alphabetically)")
  summary.add_arguments(parser, "poster table")
  args = parser.parse_args(argv)
  if args.target is not None and not 0 < args.target <= 1:
    parser.error(f"--target is an accuracy in (0, 1], got {args.target}.")
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    text, _ = write_report(args.workdirs, args.out, args.target, args.target_split,
                           args.statistic, args.std)
  print(text)
  print(f"Written to {args.out}/ (report.md, *.csv, curves_*.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
