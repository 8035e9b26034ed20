"""`python -m vitreg_jax.dfr`: DFR: the last layer retrained on group-balanced validation features.

The command only; the method lives in `vitreg_jax/baselines/dfr.py`.
"""

import argparse
import json

from vitreg_jax import errors
from vitreg_jax.baselines import dfr


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=dfr.__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained run")
  parser.add_argument("--head_mask", default=None,
                      help="DFR + SEL: a head_mask.json (or a run dir holding one)")
  parser.add_argument("--heldout", default=None, help="held-out split (default: ID val)")
  parser.add_argument("--num_retrains", type=int, default=dfr.NUM_RETRAINS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
  parser.add_argument("--out", default=None, help="output folder (default: the workdir)")
  args = parser.parse_args(argv)
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    paths = dfr.write(args.workdir, args.out, head_mask=args.head_mask, heldout=args.heldout,
                      num_retrains=args.num_retrains, seed=args.seed, step=args.step)
  print(open(paths["md"]).read())
  print("wrote " + ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
