"""`python -m vitreg_jax.jtt`: JTT's stage 1: the identification run's error set.

The command only; the method lives in `vitreg_jax/baselines/jtt.py`.
"""

import argparse
import json

from vitreg_jax import errors
from vitreg_jax.baselines import jtt


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=jtt.__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the identification (stage 1) run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
  args = parser.parse_args(argv)
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    path = jtt.write(args.workdir, args.step)
  record = json.loads(open(path).read())
  print(f"{path}: {record['num_errors']} of {record['num_examples']} training examples "
        f"misclassified at step {record['step']}"
        + (f"; errors per group {record['errors_per_group']} of "
           f"{record['examples_per_group']}" if "errors_per_group" in record else ""))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
