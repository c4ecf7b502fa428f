"""Errors the user must fix (bad config, missing data, incompatible checkpoint).

The entry point prints them as one line naming the cause and exits non-zero on every rank; anything else is a bug
and keeps its traceback.
"""

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the run's inputs, reported as one line without a traceback."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception (``Type`` alone when it says nothing): how a caught foreign error is
    named inside one of our one-line errors."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__


def exit_status(work: Callable[[], object]) -> int:
    """A script's exit status for ``work()``: 0, or 2 with its UserError printed as one line on stderr."""
    try:
        work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
