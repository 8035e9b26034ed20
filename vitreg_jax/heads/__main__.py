"""`python -m vitreg_jax.heads`: per-head evaluation and head selection of a run, or the
poster's table over several runs (see vitreg_jax/heads/__init__.py and docs/heads.md)."""

from __future__ import annotations

import argparse
import sys

from etils import epath

from vitreg_jax import errors
from vitreg_jax import heads
from vitreg_jax.heads import outputs
from vitreg_jax.heads import select
from vitreg_jax.heads import summary
from vitreg_jax.reports import tables
from vitreg_jax.training import rundir


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vitreg_jax.heads",
                              description=heads.__doc__.splitlines()[0])
  p.add_argument("--workdir", help="a training run's workdir")
  p.add_argument("--layer", default="-1", help="-1 (last), 'all' or a list like '0,3'")
  p.add_argument("--select", default="oracle", choices=select.RULES, help="selection rule")
  p.add_argument("--k", type=int, default=None, help="heads kept per layer by --select=topk")
  p.add_argument("--topk_score", default="ood", choices=select.TOPK_SCORES)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--out", default=None, help="output directory (default: the workdir)")
  p.add_argument("--table", nargs="+", metavar="WORKDIR",
                 help="print the poster's table over these runs, from their per-eval head "
                      "figures (heads_eval.jsonl), one row per selection rule")
  p.add_argument("--statistic", default="authors", choices=summary.STATISTICS,
                 help="--table: 'authors' (step and head chosen on validation, as the "
                      "authors' get_experiment_summary) or 'final' (the final checkpoint)")
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if bool(args.workdir) == bool(args.table):
    _parser().error("pass exactly one of --workdir=DIR or --table W1 W2 ...")
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    return _run(args)


def _run(args) -> int:
  kwargs = dict(layer=args.layer, rule=args.select, k=args.k, topk_score=args.topk_score,
                progress=not args.no_progress)
  if args.table:
    table = tables.poster_table(args.table, statistic=args.statistic)
    if table is None:
      raise errors.UserError("none of these runs has evaluations to tabulate.")
    table = table.markdown()
    print(table)
    if args.out:
      rundir.write_text(epath.Path(args.out) / "table.md", table)
    return 0
  result = select.analyze(args.workdir, step=args.step, **kwargs)
  paths = outputs.write_outputs(result, args.out or args.workdir)
  print(outputs.markdown(result))
  print("Wrote " + ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
