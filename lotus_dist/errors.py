"""Errors the user must fix (bad config, missing data, incompatible checkpoint).

The entry point prints them as one line naming the cause and exits non-zero on every rank; anything else is a bug
and keeps its traceback.
"""

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the run's inputs, reported as one line without a traceback."""


def exit_status(work: Callable[[], object]) -> int:
    """A script's exit status for ``work()``: 0, or 2 with its UserError printed as one line on stderr."""
    try:
        work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
