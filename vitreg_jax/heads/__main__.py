"""`python -m vitreg_jax.heads`: per-head evaluation and head selection of a run, or the
poster's table over several runs (see vitreg_jax/heads/__init__.py and docs/heads.md).

`--select` names a rule of heads/rules.py, the built-in ones or any a module registered:
`--rules_module=my_rules` imports `my_rules` first (its `rules.register(...)` calls run)."""

from __future__ import annotations

import argparse
import importlib
import sys

from etils import epath

from vitreg_jax import errors
from vitreg_jax import heads
from vitreg_jax.heads import label_free
from vitreg_jax.heads import outputs
from vitreg_jax.heads import rules
from vitreg_jax.heads import select
from vitreg_jax.heads import selection_table
from vitreg_jax.heads import summary
from vitreg_jax.reports import tables
from vitreg_jax.training import rundir


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vitreg_jax.heads",
                              description=heads.__doc__.splitlines()[0])
  p.add_argument("--workdir", help="a training run's workdir")
  p.add_argument("--layer", default="-1", help="-1 (last), 'all' or a list like '0,3'")
  p.add_argument("--select", default=None, metavar="RULE",
                 help="selection rule (default oracle); with --table a comma-separated list "
                      f"of the +SEL rows (default {','.join(summary.TABLE_RULES)}). Rules: "
                      + rules.describe())
  p.add_argument("--k", type=int, default=None, help="heads kept per layer by --select=topk")
  p.add_argument("--topk_score", default="ood", choices=rules.TOPK_SCORES)
  p.add_argument("--ood_labels", type=int, default=None, metavar="K",
                 help="labelled OOD validation examples --select=ood_k reads (default "
                      f"{label_free.DEFAULT_OOD_LABELS}; more than the split: all of them)")
  p.add_argument("--ood_draw", type=int, default=0,
                 help="the seed of --select=ood_k's random draw of --ood_labels examples")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--out", default=None, help="output directory (default: the workdir)")
  p.add_argument("--table", nargs="+", metavar="WORKDIR",
                 help="print the poster's table over these runs, from their per-eval head "
                      "figures (heads_eval.jsonl), one row per selection rule, then each "
                      "rule's OOD accuracy and fraction of the oracle's gain recovered; with "
                      "--out also table.json and k_labels.png (OOD test accuracy of the oracle "
                      "on k OOD validation labels)")
  summary.add_arguments(p, "--table")
  p.add_argument("--rules_module", action="append", default=[], metavar="MODULE",
                 help="import MODULE first, so that the rules it registers can be named")
  p.add_argument("--no_progress", action="store_true")
  return p


def _import_rule_modules(argv) -> None:
  """Imports every `--rules_module` before the full parse, so `--help` lists their rules."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--rules_module", action="append", default=[])
  for name in pre.parse_known_args(argv)[0].rules_module:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise errors.UserError(f"--rules_module={name}: cannot import it ({e}); give a module "
                             "on the Python path.") from None


def _table(args) -> int:
  """The poster's table (its +SEL rows: `--select`, default `summary.TABLE_RULES`), then the
  table of every rule's gain recovered (`--select`, default every rule that runs over
  records) and, with `--out`, table.md, table.json and k_labels.png."""
  rule_names = tuple(args.select.split(",")) if args.select else summary.TABLE_RULES
  table = tables.poster_table(args.table, statistic=args.statistic, rules=rule_names,
                              std=args.std)
  if table is None:
    raise errors.UserError("none of these runs has evaluations to tabulate.")
  selection = selection_table.build(
      args.table, rule_names if args.select else rules.names(records=True),
      statistic=args.statistic, std=args.std)
  text = table.markdown() + "\n" + selection_table.markdown(selection)
  print(text)
  if args.out:
    rundir.write_text(epath.Path(args.out) / "table.md", text)
    paths = selection_table.write(selection, args.out)
    print("Wrote " + ", ".join([str(epath.Path(args.out) / "table.md"), *paths.values()]))
  return 0


def main(argv=None) -> int:
  with errors.exit_on_user_error():
    _import_rule_modules(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if bool(args.workdir) == bool(args.table):
      _parser().error("pass exactly one of --workdir=DIR or --table W1 W2 ...")
    if args.table:
      return _table(args)
    result = select.analyze(args.workdir, step=args.step, layer=args.layer,
                            rule=args.select or "oracle", k=args.k,
                            topk_score=args.topk_score, progress=not args.no_progress,
                            ood_labels=args.ood_labels, ood_draw=args.ood_draw)
    paths = outputs.write_outputs(result, args.out or args.workdir)
    print(outputs.markdown(result))
    print("Wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
  sys.exit(main())
