"""Measured peak memory of a block of code: ``with PeakMemory(device) as pm: ...; pm.peak_bytes``.

On CUDA the caching allocator's own statistics are exact. A CPU has no such statistics, so the CPU path keeps a
tracemalloc-style account of tensor storage: every storage alive at entry is counted once, a dispatch mode sees
the output of every op run inside the block (backward and backward hooks included: on CPU autograd runs in the
calling thread, with the caller's dispatch modes) and counts each new storage once, and a finalizer on the
storage subtracts it when it really dies. Views and in-place ops return storages already counted, so they add
nothing. The figure is at op granularity: scratch memory a kernel allocates and frees inside one op is not seen.

All three fields are absolute bytes of tensor storage on ``device``: ``start_bytes`` at entry, ``peak_bytes`` the
maximum while the block ran (at least ``start_bytes``), ``end_bytes`` at exit.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # a torch without it has no fake tensors to see here either
    def _is_fake(t: torch.Tensor) -> bool:
        return False


def _storage(t: torch.Tensor, device_type: str) -> torch.UntypedStorage | None:
    """The tensor's storage when it is real memory on ``device_type``; None for other devices, for wrapper
    subclasses, whose storage is a placeholder without data, and for the fake tensors ``torch.compile`` traces
    with (their storage has no data either; asking for its pointer is deprecated)."""
    if t.device.type != device_type or _is_fake(t):
        return None
    try:
        s = t.untyped_storage()
        s.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return s if s.device.type == device_type else None


class _StorageAccount(TorchDispatchMode):
    """Live storages by identity -> [nbytes, finalizer]; a running current and peak of their bytes.

    Keying by ``id(storage)`` is sound because torch preserves a storage's Python object for as long as the
    storage lives (``t.untyped_storage()`` is the same object every time), so the finalizer fires exactly when
    the memory is released, and only then can the id be reused.
    """

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, list] = {}
        self.current = 0
        self.peak = 0

    def count(self, t: torch.Tensor) -> None:
        # DTensor and the like hold their memory in inner tensors, made by ops run inside the subclass's own
        # dispatch, out of this mode's sight: count those through the subclass.
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):  # some subclasses flatten non-tensor attributes too
                    self.count(inner)
            return
        s = _storage(t, self.device_type)
        if s is None:
            return
        key, nbytes = id(s), s.nbytes()
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [nbytes, weakref.finalize(s, self._release, key)]
            self.current += nbytes
        elif entry[0] != nbytes:  # resized in place (resize_, out= ops)
            self.current += nbytes - entry[0]
            entry[0] = nbytes
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        nbytes, _ = self.live.pop(key)
        self.current -= nbytes

    def close(self) -> None:
        """Stop following storages: detach every finalizer so nothing fires (or stays referenced) after exit."""
        for _, fin in self.live.values():
            fin.detach()
        self.live.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out


class PeakMemory:
    """Context manager measuring the peak bytes of tensor storage on ``device`` while its block runs."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.start_bytes = self.peak_bytes = self.end_bytes = 0
        self._account: _StorageAccount | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        account = _StorageAccount(self.device.type)
        # What is live at entry is found through the garbage collector rather than explicit roots (model,
        # optimizer, batch): it sees every tensor object Python holds, wherever it is held, so the caller cannot
        # forget one. ``type()`` rather than ``isinstance`` skips modules' lazy ``__getattr__``. Tensors
        # only C++ holds (an autograd graph alive at entry) are missed; a training step starts without one.
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):
                account.count(obj)
        self.start_bytes = account.peak = account.current
        self._account = account
        account.__enter__()
        return self

    def peak_so_far(self) -> int:
        """The peak since entry, read inside the block (a phase of it, e.g. a step's backward)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._account.peak

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.end_bytes = torch.cuda.memory_allocated(self.device)
            return
        account, self._account = self._account, None
        account.__exit__(*exc)
        self.peak_bytes, self.end_bytes = account.peak, account.current
        account.close()
