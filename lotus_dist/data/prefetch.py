"""``PrefetchStream``: a background thread keeps the next micro-batches ready, and resume stays bitwise exact.

A thread, not a process: the costly parts (sentencepiece, which releases the GIL while encoding; gzip; the
``torch.tensor`` copy) overlap with the training step, the stream is not pickled into another process, and its
exact position stays in one place.

Exact resume: the worker runs up to ``depth`` batches ahead, so the wrapped stream's own position is ahead of the
consumer's. Each queued batch therefore carries the stream's ``state_dict()`` taken right after producing it, and
``state_dict()`` returns the one of the last batch handed out: what the unwrapped stream reports after the same
batches. ``epoch`` and ``stats`` are snapshotted with it; other attributes read through the wrapper are the wrapped
stream's live values, which may be up to ``depth + 1`` batches ahead.

Collectives stay on the training thread: a stream whose next batch needs work that may synchronise the ranks
(megatron's dataset build calls ``torch.distributed.barrier()``) returns it from ``collective_work()``; the worker
hands it to the consumer, which runs it where the unwrapped stream would have, in the same order on every rank.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from typing import Any, Optional

import torch

_BATCH, _CALL, _RAISE = "batch", "call", "raise"
SNAPSHOT = ("epoch", "stats")  # attributes reported as of the last batch handed out, like state_dict()


def _snapshot(stream) -> dict:
    view = {}
    for name in SNAPSHOT:
        try:
            view[name] = getattr(stream, name)
        except AttributeError:  # a stream without it: the wrapper has none either
            pass
    return view


class _Worker:
    """The producing thread. It holds no reference to its PrefetchStream, so a dropped stream is collected and
    its finalizer stops the thread."""

    def __init__(self, stream, depth: int, pin_memory: bool):
        self.stream, self.pin_memory = stream, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.resume = threading.Event()  # set by the consumer once it has run a collective_work() callable
        # Daemon: a stream nobody closed must never keep the process alive.
        self.thread = threading.Thread(target=self._run, name="lotus-data-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        collective_work = getattr(self.stream, "collective_work", None)
        try:
            while not self.stopping.is_set():
                work = collective_work() if collective_work is not None else None
                if work is not None:
                    self.queue.put((_CALL, work, None))
                    self.resume.wait()
                    self.resume.clear()
                    continue
                batch = next(self.stream)
                position = self.stream.state_dict(), _snapshot(self.stream)  # of exactly this batch
                if self.pin_memory:
                    batch = batch.pin_memory()
                self.queue.put((_BATCH, batch, position))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer as is (StopIteration included)
            if not self.stopping.is_set():
                self.queue.put((_RAISE, e, None))

    def stop(self, join: bool = True) -> None:
        """Stop producing. Draining the queue frees a ``put`` blocked on it; the worker then sees ``stopping``
        after at most the batch it is making. ``join=False`` (garbage collection, interpreter exit) never waits."""
        self.stopping.set()
        self.resume.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if join and self.thread is not threading.current_thread():
            self.thread.join()
            while True:  # the one item put after the drain above
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break


class PrefetchStream:
    """Wraps a training stream (``next()``, ``state_dict()``, ``load_state_dict()``); see the module docstring.

    ``depth``: micro-batches queued ahead (the worker may hold one more, made but not yet queued).
    ``pin_memory``: pin each batch in the worker (for ``.to(device, non_blocking=True)``); ignored without CUDA.
    The worker starts on the first ``next()``; ``close()`` stops it.
    """

    def __init__(self, stream, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"PrefetchStream depth must be at least 1, got {depth}")
        self._stream = stream
        self.depth = depth
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()  # pinning needs a CUDA driver
        self._state, self._view = stream.state_dict(), _snapshot(stream)  # as of the last batch handed out
        self._worker: Optional[_Worker] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._failure: Optional[BaseException] = None  # what the stream raised; raised again on every next()
        self._closed = False

    @property
    def stream(self):
        """The wrapped stream (do not advance it while the worker runs)."""
        return self._stream

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("next() on a closed PrefetchStream")
        if self._worker is None:
            self._start()
        while True:
            kind, value, position = self._worker.queue.get()
            if kind == _BATCH:
                self._state, self._view = position
                return value
            if kind == _CALL:
                try:
                    value()  # on this, the training thread: see the module docstring
                except BaseException as e:
                    self._fail(e)
                    raise
                self._worker.resume.set()
                continue
            self._fail(value)
            raise value  # the worker's own exception: its type, message and traceback

    def state_dict(self) -> dict:
        # A copy: the caller may serialise it later or change it, and it must stay the position of this batch.
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._stop()  # the stream must not move while it loads; queued batches belong to the old position
        self._stream.load_state_dict(state)
        # The stream may adapt the state it loads (e.g. data.split=node at another world size).
        self._state, self._view = self._stream.state_dict(), _snapshot(self._stream)
        self._failure = None
        self._closed = False  # the worker restarts on the next next()

    def close(self) -> None:
        """Stop the worker thread and drop the queued batches (idempotent)."""
        self._stop()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def epoch(self) -> int:
        """The epoch of the last batch handed out."""
        return self._snapshotted("epoch")

    @property
    def stats(self) -> dict:
        """The wrapped stream's stats (skipped inputs) as of the last batch handed out."""
        return self._snapshotted("stats")

    def _snapshotted(self, name: str) -> Any:
        if name not in self._view:  # the wrapped stream has no such attribute
            raise AttributeError(name)
        return copy.deepcopy(self._view[name])

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the wrapped stream's seq_len, micro_batch_size, rank, ...
        try:
            stream = self.__dict__["_stream"]
        except KeyError:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name) from None
        return getattr(stream, name)

    def __repr__(self) -> str:
        return f"PrefetchStream({self._stream!r}, depth={self.depth}, pin_memory={self.pin_memory})"

    def _start(self) -> None:
        self._worker = _Worker(self._stream, self.depth, self.pin_memory)
        # Stops the thread (without waiting) when this wrapper is collected or at interpreter exit.
        self._finalizer = weakref.finalize(self, self._worker.stop, False)

    def _stop(self) -> None:
        if self._worker is not None:
            self._finalizer.detach()
            self._worker.stop()
            self._worker = self._finalizer = None

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._stop()
