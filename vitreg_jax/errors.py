"""User errors: one exception type for a mistake the user can fix, printed as one line.

A mistake (an unknown config field or name, a bad value, a missing path, a dataset that is not
prepared) raises `UserError` with a message that names the field, the value and what is valid
or how to fix it. Every command's entry point runs under `exit_on_user_error`, which prints
that message as one line on stderr and exits with status 1, before any compute where the
check allows. Anything else is a bug and keeps its traceback (absl's `app.UsageError` makes the
same split).

`UserError` subclasses `ValueError`, so code that validates with `except ValueError` keeps
working; a plain `ValueError` is not a user error and is not caught at the entry points.
`PathNotFoundError` is the `UserError` for a path that does not exist (also a
`FileNotFoundError`); the dataset errors (`data.DatasetNotPreparedError`, `CorruptDataError`)
and the training refusals (`NegligibleTermError`, `ConfigChangedError`,
`CheckpointMismatchError`) subclass `UserError` too.
"""

from __future__ import annotations

import contextlib
import sys

EXIT_STATUS = 1


class UserError(ValueError):
  """A mistake in what the user gave (config, flags, paths, data): the message is the fix."""


class PathNotFoundError(UserError, FileNotFoundError):
  """A path the user named does not exist (a workdir, a config file, a mask, ...).

  Also a `FileNotFoundError`, so callers that handle a missing file as such keep working.
  """


def message(error: BaseException) -> str:
  """The one line printed for `error`: its text with newlines folded."""
  return " ".join(str(error).split())


@contextlib.contextmanager
def exit_on_user_error(prefix: str = "error"):
  """Inside: a `UserError` prints `PREFIX: message` on stderr and exits with `EXIT_STATUS`."""
  try:
    yield
  except UserError as e:
    sys.stderr.write(f"{prefix}: {message(e)}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_STATUS) from None
