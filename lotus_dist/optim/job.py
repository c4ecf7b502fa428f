"""The step's work item: one projected matrix's group, state, geometry and the tensors of this step."""

from __future__ import annotations


class _Job:
    """Transient per-step work item of one projected matrix (never stored in the state)."""

    __slots__ = ("group", "p", "state", "side", "r", "R", "P", "action", "row", "switch", "done", "refreshed")

    def __init__(self, group, p, state, side, r):
        self.group, self.p, self.state, self.side, self.r = group, p, state, side, r
        self.R = None
        self.P = None  # the full projector while in use (all-gathered when stored sharded), dropped after
        self.action = None
        self.row = -1
        self.switch = False
        self.done = False  # updated already in _prepare (nothing to decide)
        self.refreshed = False  # its new basis was solved this step (_refresh)
