"""Stop requests from outside: SIGTERM (a scheduler's pre-emption notice) and SIGINT (Ctrl-C).

The first of either asks the training loop to finish its step, save a checkpoint on every rank and exit 0. A second
SIGINT means "now": it raises KeyboardInterrupt at once (the entry point reports it in one line and exits 130;
nothing since the last checkpoint is saved). Further SIGTERMs are ignored: schedulers repeat them before SIGKILL.
torchrun's agent forwards one SIGINT/SIGTERM it receives to its workers (which run in sessions of their own), so each
worker sees one signal per keypress.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    def __init__(self):
        self.received: str | None = None  # the name of the first signal, once one has arrived
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = ["StopSignals"]
