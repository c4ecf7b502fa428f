"""The per-layer optimizer's own CUDA stream (optim.per_layer under FSDP2; docs/distributed.md).

FSDP2 calls post-accumulate-grad hooks with its reduce-scatter stream current (``post_reduce_stream``; the
all-reduce stream under HSDP), so a unit's update issued there would queue in front of the next reduce-scatter and
delay the all-gather prefetch waiting behind it. ``UnitStream`` moves that work onto a stream of its own:

- ``run(device)``: the optimizer stream first waits for the stream current at the hook (where the gradient was just
  written), then the unit's kernels are issued on it; the caller's stream is current again on exit.
- ``release(t)``: a tensor made on another stream (a gradient) that the caller drops while the optimizer stream may
  still read it is ``record_stream``-ed first, so the caching allocator does not hand its memory to the
  reduce-scatter stream before the update has read it. Tensors made inside ``run`` belong to the optimizer stream.
- ``join(device)``: at the end of the step (before the host sync and the next forward) the stream current there
  waits for the optimizer stream, so everything after it sees the updated weights and the device scalars.

Chosen at run time: on any device but CUDA every method does nothing.
"""

from __future__ import annotations

import contextlib

import torch


class UnitStream:
    def __init__(self):
        self._streams: dict[torch.device, object] = {}  # one optimizer stream per CUDA device, made on first use
        self._pending: set[torch.device] = set()  # devices whose stream has work the step has not joined yet

    @contextlib.contextmanager
    def run(self, device: torch.device):
        if device.type != "cuda":
            yield
            return
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self._pending.add(device)
        with torch.cuda.stream(stream):
            yield

    def release(self, t: torch.Tensor) -> None:
        """Before the caller drops ``t`` (made on another stream, read by this one)."""
        local = t.to_local() if hasattr(t, "to_local") else t  # duck-typed DTensor: optim never imports distributed
        stream = self._streams.get(local.device)
        if local.device.type == "cuda" and stream is not None and local.device in self._pending:
            local.record_stream(stream)

    def join(self) -> None:
        for device in sorted(self._pending, key=str):
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
        self._pending.clear()


__all__ = ["UnitStream"]
