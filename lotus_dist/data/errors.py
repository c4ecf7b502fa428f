"""The one exception the data pipeline raises for bad inputs: a missing path, a model without EOS, no documents."""

from __future__ import annotations

from lotus_dist.errors import UserError


class DataError(UserError, ValueError):
    """A data or tokenizer problem the user can fix. The message is one line and names the path or config key."""
