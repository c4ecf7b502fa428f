"""One bounded item of a section: it runs within min(its own limit, the budget left) or is skipped with the reason
in the report. Stdlib only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

from . import budget as budget_mod
from .budget import Budget, ItemTimeout
from .report import Report


def secs(t: float) -> str:
    return f"{t:.0f}" if t >= 10 or t == int(t) else f"{t:.1f}"


@dataclasses.dataclass
class Check:
    """What the sections share: the report, the budget, the plan (sizes), a scratch folder, measured values."""
    report: Report
    budget: Budget
    plan: Any = None
    work: Optional[Path] = None
    ctx: dict = dataclasses.field(default_factory=dict)

    def _grant(self, what: str, needs: float, limit: float) -> Optional[float]:
        timeout = self.budget.grant(needs, limit)
        if timeout is None:
            self.report.skip(what, f"needs ~{secs(needs)} s, {secs(max(self.budget.left(), 0))} s of the budget left")
        return timeout

    def attempt(self, what: str, needs: float, limit: float, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn()`` in this process under a time limit: (True, its value), or (False, None) when it was
        skipped or timed out (a measurement: not a failure)."""
        timeout = self._grant(what, needs, limit)
        if timeout is None:
            return False, None
        try:
            with budget_mod.time_limit(timeout):
                return True, fn()
        except ItemTimeout:
            cut = "its own limit" if timeout >= limit else "the end of the budget"
            self.report.skip(what, f"timed out after {secs(timeout)} s ({cut})")
            return False, None

    def command(self, what: str, cmd: list[str], *, needs: float, limit: float, log: Path, env: dict,
                cwd: Path) -> Optional[tuple[int, str]]:
        """Run a subprocess check: (exit code, log tail), or None when it was skipped or timed out (its whole
        process tree killed). Overrunning its own limit is a failure (a hang); reaching the end of the budget
        first is a skip."""
        timeout = self._grant(what, needs, limit)
        if timeout is None:
            return None
        rc, tail = budget_mod.run_command(cmd, cwd=cwd, env=env, timeout=timeout, log=log)
        if rc is not None:
            return rc, tail
        if timeout >= limit:
            self.report.check(what, False, f"did not finish within its own limit of {secs(limit)} s (a hang?); its "
                                           f"process tree was killed")
        else:
            self.report.skip(what, f"stopped at the end of the budget after {secs(timeout)} s; its process tree was "
                                   f"killed")
        self.report.log_tail(tail)
        return None
