"""What a training step costs, counted where it is issued, so that a CPU test can assert what a GPU cluster sees.

- ``collectives`` / ``comm_bytes``: the collectives the optimizer path issues (the low-rank optimizer's, and in
  ``ddp``/``deepspeed`` the owner backend's gradient reduction and weight return; not FSDP's own) and the bytes this
  rank sends in them, counted as ring algorithms send them: an all-reduce of n bytes 2(W-1)/W·n; a reduce-scatter,
  all-gather, gather, broadcast or all-to-all (W-1)/W·n, n being the bytes of the whole tensor reduced or gathered.
- ``replica_comm_bytes`` / ``shard_comm_bytes``: the same bytes split by the HSDP mesh dimension they crossed (the
  replicate dim: inter-node links; the shard dim), FSDP2's gradient reductions included (counted by
  distributed/replica_sync.py from the units' shard sizes: the reduce-scatter of each micro-batch, the all-reduce
  across replicas), not its weight all-gathers; ``replica_projected_comm_bytes``: the replicate-dim bytes of the
  projected matrices alone (the part ``dist.replica_sync=lowrank`` shrinks).
- ``host_syncs``: device-to-host synchronisations of the trainer and the optimizer (``to_host``: ``.tolist()``,
  ``.item()``); on a CPU run they are counted as the same code would sync on a GPU. A host sync is anything that
  waits for the device, ``torch.tensor(v, device=cuda)`` included: ``lotus_dist/sync_audit.py`` checks in tests that
  these counts miss none.

One process-wide instance, ``COUNTERS``; the trainer resets it at the start of each step and logs what the step
added. Counting is a few integer additions per collective: always on.
"""

from __future__ import annotations

import torch

MESH_DIMS = ("replica", "shard", "replica_projected")  # bytes_by_dim's keys, always reported
RING_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0, "gather": 1.0, "broadcast": 1.0,
               "all_to_all": 1.0}


class StepCounters:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.collectives = 0
        self.comm_bytes = 0.0
        self.host_syncs = 0
        self.by_kind: dict[str, int] = {}
        self.bytes_by_kind: dict[str, float] = {}  # the bytes of ``comm_bytes``, per kind of collective
        self.bytes_by_dim: dict[str, float] = dict.fromkeys(MESH_DIMS, 0.0)  # per mesh dim (+ replica_projected)

    def collective(self, kind: str, nbytes: int, world: int, dims: tuple[str, ...] = (), optim: bool = True) -> None:
        """One collective of ``kind`` over ``world`` ranks on a tensor (the whole one) of ``nbytes`` bytes; ``dims``:
        the ``bytes_by_dim`` keys it counts in; ``optim``: issued by the optimizer path (else FSDP2's own, counted
        only by mesh dim)."""
        sent = RING_FACTOR[kind] * (world - 1) / world * nbytes if world > 1 else 0.0
        for dim in dims:
            self.bytes_by_dim[dim] = self.bytes_by_dim.get(dim, 0.0) + sent
        if not optim:
            return
        self.collectives += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if world > 1:
            self.comm_bytes += sent
            self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0.0) + sent

    def host_sync(self) -> None:
        self.host_syncs += 1

    def snapshot(self) -> dict:
        return {"optim_collectives": self.collectives, "optim_comm_bytes": int(round(self.comm_bytes)),
                "host_syncs": self.host_syncs,
                **{f"{dim}_comm_bytes": int(round(b)) for dim, b in self.bytes_by_dim.items()}}


COUNTERS = StepCounters()


def to_host(t: torch.Tensor):
    """``t.tolist()``, counted as a host sync: the one way the step path reads device values on the host."""
    COUNTERS.host_sync()
    return t.tolist()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


__all__ = ["COUNTERS", "MESH_DIMS", "RING_FACTOR", "StepCounters", "nbytes", "to_host"]
