"""Count what makes the host wait for the device inside a step, by watching the ops themselves (not by reading
the code): a test runs a whole training step under ``SyncAudit`` and asserts what a GPU run would see.

Two kinds of events, each recorded with the op and the innermost ``lotus_dist`` line that issued it:

- ``host_sync``: the host reads device values, so it waits for every queued kernel: ``aten._local_scalar_dense``
  (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``), ``.tolist()``, ``.cpu()``, ``.numpy()``, a copy from the
  device into a host tensor, ops whose output size depends on the data (``nonzero``, ``masked_select``,
  ``unique``), and explicit ``torch.cuda`` synchronisations.
- ``h2d``: a blocking host-to-device copy: a tensor made from Python data on the device (``torch.tensor(v,
  device=cuda)``: ``aten.lift_fresh``), or a copy of a host tensor into a device one that is not a non-blocking
  copy of pinned memory. ``torch.full`` / ``torch.zeros`` / python scalars in ops copy nothing.

Which tensors are "on the device": on a GPU run, those not on the CPU. On a CPU run (``device`` CPU, what CI has)
the CPU stands in for the GPU: every tensor the step makes counts as a device tensor, as it is on the training
device on a GPU. So there every ``torch.tensor(...)`` inside the step is an ``h2d`` and every host read a
``host_sync``: a rule that cannot miss a copy that a GPU would make, at the price of counting host-only tensors
made inside the step too (the optimizer and trainer make none; the data stream makes its batches on the prefetch
thread, or with ``data.prefetch=0`` in the step, where they count). Work on other threads is not counted: dispatch
modes are per thread, and so is the audit.

``host_syncs`` of the audit must equal ``COUNTERS.host_syncs`` (lotus_dist/counters.py) for a step: the counters
see what the code declares (``to_host``), the audit what it does.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default}
_DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
                   _aten.unique_consecutive.default, _aten.unique_dim.default}
_LIFTS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SKIP = {os.path.abspath(__file__), os.path.join(_PACKAGE, "counters.py")}
_ACTIVE = threading.local()  # the audit of this thread (host reads that bypass the dispatcher on a CPU run)


def _where() -> str:
    """The innermost frame in lotus_dist (else the innermost outside torch): 'lotus_dist/x.py:12 fn'."""
    frames = traceback.extract_stack()
    fallback = None
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path in _SKIP:  # the audit, and to_host (name its caller)
            continue
        if path.startswith(_PACKAGE + os.sep):
            rel = os.path.relpath(path, os.path.dirname(_PACKAGE))
            return f"{rel}:{frame.lineno} {frame.name}"
        if fallback is None and f"{os.sep}torch{os.sep}" not in path:
            fallback = f"{os.path.basename(path)}:{frame.lineno} {frame.name}"
    return fallback or "?"


class SyncAudit(TorchDispatchMode):
    """``with SyncAudit(device) as audit: step()``; then ``audit.host_syncs``, ``audit.h2d``, ``audit.report()``.

    ``device``: the training device (default: CUDA when available, else CPU), which decides the rule above."""

    def __init__(self, device: torch.device | str | None = None):
        super().__init__()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.stand_in = torch.device(device).type == "cpu"  # a CPU run: every tensor is a device tensor
        self.events: list[tuple[str, str, str]] = []  # (kind, op, where)
        self._patched: list[tuple[object, str, object]] = []
        self._quiet = 0  # inside a host read already recorded (its own _to_copy is not counted again)

    # ------------------------------------------------------------------------------------------------ results

    def count(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.events if k == kind)

    host_syncs = property(lambda self: self.count("host_sync"), doc="host reads recorded")
    h2d = property(lambda self: self.count("h2d"), doc="host-to-device copies recorded")

    def by_site(self) -> dict[str, int]:
        """'kind op @ where' -> occurrences."""
        return dict(collections.Counter(f"{k} {op} @ {where}" for k, op, where in self.events))

    def report(self) -> str:
        sites = self.by_site()
        return "; ".join(f"{n}x {s}" for s, n in sorted(sites.items())) or "no host syncs, no host-to-device copies"

    # --------------------------------------------------------------------------------------------- recording

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type != "meta" and (self.stand_in or t.device.type != "cpu")

    def _record(self, kind: str, op: str) -> None:
        self.events.append((kind, op, _where()))

    def _h2d_copy(self, src, dst_device, non_blocking: bool) -> bool:
        """A copy of host ``src`` to ``dst_device`` that blocks the host (a real GPU run only)."""
        if self.stand_in or not isinstance(src, torch.Tensor) or src.device.type != "cpu" or dst_device is None:
            return False
        if torch.device(dst_device).type in ("cpu", "meta"):
            return False
        return not (non_blocking and src.is_pinned())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._quiet:
            return out
        name = str(func.overloadpacket.__name__)
        if func in _SCALAR_READS and self._on_device(args[0]):
            self._record("host_sync", name)
        elif func in _DATA_DEPENDENT and self._on_device(args[0]):
            self._record("host_sync", name)
        elif func in _LIFTS and self._on_device(out):
            self._record("h2d", name)
        elif func is _aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            if self._h2d_copy(src, dst, kwargs.get("non_blocking", False)):
                self._record("h2d", name)
            elif not self.stand_in and dst is not None and torch.device(dst).type == "cpu" and self._on_device(src):
                self._record("host_sync", name)
        elif func is _aten.copy_.default:
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if isinstance(src, torch.Tensor) and self._h2d_copy(src, dst.device, non_blocking):
                self._record("h2d", name)
            elif (not self.stand_in and dst.device.type == "cpu" and self._on_device(src) and src.dim() > 0
                  and not (non_blocking and dst.is_pinned())):
                self._record("host_sync", name)
        return out

    # ------------------------------------------------ host reads the dispatcher does not see on a CPU tensor

    def _host_read(self, name: str, original):
        audit = self

        @functools.wraps(original)
        def read(t, *args, **kwargs):
            if getattr(_ACTIVE, "audit", None) is not audit or audit._quiet:
                return original(t, *args, **kwargs)
            if audit._on_device(t):
                audit._record("host_sync", name)
            audit._quiet += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                audit._quiet -= 1

        return read

    def _wait(self, name: str, original):
        audit = self

        @functools.wraps(original)
        def wait(*args, **kwargs):
            if getattr(_ACTIVE, "audit", None) is audit:
                audit._record("host_sync", name)
            return original(*args, **kwargs)

        return wait

    def __enter__(self):
        if getattr(_ACTIVE, "audit", None) is not None:
            raise RuntimeError("SyncAudit does not nest")
        for name in ("tolist", "cpu", "numpy"):
            self._patch(torch.Tensor, name, self._host_read(name, getattr(torch.Tensor, name)))
        self._patch(torch.cuda, "synchronize", self._wait("cuda.synchronize", torch.cuda.synchronize))
        for cls in (torch.cuda.Event, torch.cuda.Stream):
            self._patch(cls, "synchronize", self._wait(f"{cls.__name__}.synchronize", cls.synchronize))
        _ACTIVE.audit = self
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _ACTIVE.audit = None
            for owner, name, original in reversed(self._patched):
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            self._patched.clear()

    def _patch(self, owner, name: str, replacement) -> None:
        self._patched.append((owner, name, owner.__dict__.get(name)))  # None: inherited (torch.Tensor's methods)
        setattr(owner, name, replacement)


class StepAudits:
    """Wrap a step function so that every call runs under a ``SyncAudit``; ``records`` gets one dict per call:
    ``host_syncs`` and ``h2d`` (the audit's), ``counted`` (``COUNTERS.host_syncs`` after the call: the trainer
    resets the counters before each step) and ``sites`` (``SyncAudit.by_site``). JSON-serialisable, so a
    worker process can hand them back."""

    def __init__(self, device=None):
        self.device = device
        self.records: list[dict] = []

    def wrap(self, fn):
        from lotus_dist.counters import COUNTERS

        @functools.wraps(fn)
        def step(*args, **kwargs):
            with SyncAudit(self.device) as audit:
                out = fn(*args, **kwargs)
            self.records.append({"host_syncs": audit.host_syncs, "h2d": audit.h2d, "counted": COUNTERS.host_syncs,
                                 "sites": audit.by_site()})
            return out

        return step


__all__ = ["StepAudits", "SyncAudit"]
