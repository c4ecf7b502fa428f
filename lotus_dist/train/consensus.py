"""The step's one host synchronisation (docs/design.md section 3: at most one per optimizer step).

Everything the loop must agree on or read on the host rides in one vector, summed over the ranks in one all-reduce
and read with one ``.tolist()``: the loss, the squared gradient norm (its non-finite check and clipping), the stop
request (SIGTERM/SIGINT on any rank) and whether an asynchronous checkpoint is still being written on any rank (its
commit waits for every writer). Clipping scales the gradients on the device from the reduced norm, before the sync.
"""

from __future__ import annotations

import torch

from lotus_dist.counters import to_host


def replicas_of(g: torch.Tensor) -> int:
    """How many ranks hold the same values as this rank's piece of ``g``: the replicated mesh dims of a DTensor
    (HSDP's replicate dim); a plain gradient is held by one rank (one process, or its owner after the ddp /
    deepspeed reduce-scatter)."""
    placements = getattr(g, "placements", None)
    if placements is None:
        return 1
    mesh = g.device_mesh
    n = 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            n *= mesh.size(dim)
    return n


def grad_sq_partial(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """This rank's share of Σ‖g‖² (fp32, on ``device``): each local piece's squared norm divided by the ranks that
    hold it too, so that the sum over all ranks is the global squared norm. One fused norm per device and dtype."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        local = g.to_local() if hasattr(g, "to_local") else g
        buckets.setdefault((replicas_of(g), local.device, local.dtype), []).append(local)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (replicas, _, _), tensors in buckets.items():
        norms = torch._foreach_norm(tensors, 2.0)
        total += (torch.stack([n.float() for n in norms]).square().sum() / replicas).to(device)
    return total


def clip_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients by min(1, max_norm / (‖g‖ + 1e-6)) (torch's clip_grad_norm_ rule), on the device."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    locals_ = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    for device_dtype in {(t.device, t.dtype) for t in locals_}:
        group = [t for t in locals_ if (t.device, t.dtype) == device_dtype]
        torch._foreach_mul_(group, coef.to(device=device_dtype[0], dtype=device_dtype[1]))


class StepConsensus:
    """Builds, reduces and reads the step's vector; after ``read``, ``stop`` (a rank was asked to stop) and
    ``saves_done`` (no rank is still writing an asynchronous checkpoint) hold for every rank alike."""

    def __init__(self, mode):
        self.mode = mode
        self.stop = False
        self.saves_done = True

    def reduce(self, values: list[torch.Tensor], *, stop: bool, writing: bool) -> torch.Tensor:
        """All-reduce (sum) of this rank's ``values`` and its two flags; no host sync."""
        # torch.full fills on the device from a kernel argument; torch.tensor(..., device=cuda) would be a blocking
        # host-to-device copy every step (lotus_dist/sync_audit.py finds those)
        flags = [torch.full((1,), float(f), dtype=torch.float32, device=self.mode.device) for f in (stop, writing)]
        local = torch.cat([torch.stack([v.float().reshape(()).to(self.mode.device) for v in values]), *flags])
        return self.mode.all_reduce_sum(local)

    def read(self, summed: torch.Tensor, exact: list[torch.Tensor] = ()) -> list[float]:
        """The step's one host sync: the summed values (flags taken off), then ``exact`` (values that are global
        already, e.g. reduced per unit during backward)."""
        host = to_host(torch.cat([summed, *[e.float().reshape(1).to(summed.device) for e in exact]]))
        n = summed.numel() - 2
        self.stop, self.saves_done = host[n] > 0, host[n + 1] == 0
        return host[:n] + host[n + 2:]


__all__ = ["StepConsensus", "clip_", "grad_sq_partial", "replicas_of"]
