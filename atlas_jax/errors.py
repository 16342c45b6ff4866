"""The one base class of every error meant for the user.

A command line prints an `AtlasError` as one line starting `error:` and exits with code 1; any other
exception is a bug and keeps its traceback. Each subclass also derives from the built-in exception its
case is (most are `ValueError`), so `except ValueError` in user code still catches them.
"""

import functools
import sys
from typing import Any, Callable

from absl import logging


class AtlasError(Exception):
  """Something the user can fix: a config field, a path, a file, a checkpoint. The message says how."""


def one_line_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Wraps a command line's absl `main`: an AtlasError prints as one `error:` line and exits with code 1.

  The traceback is logged at debug level, so `--verbosity=1` shows it; every other exception propagates
  with its traceback.
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except AtlasError as error:
      logging.debug('traceback of the error below (shown with --verbosity=1)', exc_info=True)
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  return wrapped
