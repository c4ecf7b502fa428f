"""Errors the user must fix (bad config, missing data, incompatible checkpoint).

The entry point prints them as one line naming the cause and exits non-zero on every rank; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the run's inputs, reported as one line without a traceback."""
