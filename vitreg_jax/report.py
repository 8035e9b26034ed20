"""`python -m vitreg_jax.report`: the report's command, kept under its historical name.

The report lives in `vitreg_jax/reports/` (see its `__main__.py`).
"""

import sys

from vitreg_jax.reports import __main__ as reports_main

main = reports_main.main

if __name__ == "__main__":
  sys.exit(main())
