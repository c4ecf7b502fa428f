"""The whole-model step that clips by the norm of what it consumes (``train.grad_clip_norm=consumed``), and in which
data-parallel replicas may exchange R = project(G) instead of G (``dist.replica_sync=lowrank``; docs/distributed.md).

``LowRankAdamW.step`` hands over to ``ConsumedStep.run`` when ``optimizer.consumed`` is set. The step:

1. projects every matrix that stays in its basis this step (R in the current basis, a check's included);
2. has ``replicas`` average, in one collective, those R and the gradient shards of the matrices that need their
   full gradient now (a first basis, a scheduled switch): projection is linear, so the mean of the replicas' R is
   R of the mean gradient; plain gradients arrive averaged already (FSDP2 all-reduces them);
3. reduces the checks' statistics and decides; a check that switches averages its gradient then (switch steps
   only), and every switching matrix is solved from the averaged G (``_refresh``: R in the new basis);
4. clips: the norm is that of every R in the basis it updates with and of the plain gradients, summed over the
   shard group (``stats_comm``); R, the plain gradients and the projected gradients are scaled together;
5. updates (AdamW on the plain groups, the low-rank update).

``Replicas`` is the identity (one replica, or replicas whose gradients FSDP2 reduced in full); the distributed
layer's ``ReplicaSync`` averages over the HSDP replicate group. Methods that read G on ordinary steps (a Fira or
APOLLO residual, online PCA, path efficiency) must keep full replica sync; the consumed clipping works for all.
"""

from __future__ import annotations

import torch

from lotus_dist.counters import to_host

from .job import _Job
from .switching import CHECK, POLICIES, STATS_WIDTH, SWITCH
from .tensors import _local, _sq_norm


class Replicas:
    """Averages tensors over data-parallel replicas, in place; the identity: nothing to average."""

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        pass


NO_REPLICAS = Replicas()


class ConsumedStep:
    """``max_norm``: train.grad_clip (0: no clipping, the norm is still measured); ``replicas``: see the module.
    After ``run``, ``norm`` is the consumed norm of the step before clipping (a device scalar)."""

    def __init__(self, max_norm: float, replicas: Replicas = NO_REPLICAS):
        self.max_norm, self.replicas = max_norm, replicas
        self.norm: torch.Tensor | None = None

    @torch.no_grad()
    def run(self, opt, plain: list[tuple[dict, list]], jobs: list[_Job]) -> None:
        projected, whole = [], []  # R taken now / the full gradient needed now (first basis, scheduled switch)
        for job in jobs:
            st = job.state
            if st["n_bases"] == 0:
                job.action = "init"
                whole.append(job)
                continue
            job.action = POLICIES[job.group["switch"]].peek(st, job.group)
            if job.action == SWITCH and job.group["solver"] != "online_pca":  # online PCA's switch updates P from R
                whole.append(job)
                continue
            job.P = opt._use_projector(job.p, st)
            projected.append(job)
        opt._project_all(projected)
        self.replicas.mean_([job.R for job in projected] + [_local(job.p.grad) for job in whole])

        rows = []
        for job in whole:
            if job.action == "init":
                job.row = len(rows)
                gsq = _sq_norm(_local(job.p.grad))
                rows.append(torch.cat([gsq.reshape(1), gsq.new_zeros(STATS_WIDTH - 1)]))
        for job in projected:
            if job.action == CHECK:
                job.row = len(rows)
                rows.append(POLICIES[job.group["switch"]].statistics(job.state, job.group, job.R))
        stats = to_host(opt.stats_comm.reduce_stats(torch.stack(rows).float())) if rows else []
        for job in jobs:
            opt._decide(job, stats)
        # decided from reduced statistics: the same on every rank, and so is this collective
        late = [job for job in projected if job.switch and job.group["solver"] != "online_pca"]
        if late:
            self.replicas.mean_([_local(job.p.grad) for job in late])
        opt._refresh([job for job in jobs if job.switch and job.action != "skip"
                      and not (job.group["solver"] == "online_pca" and job.state["n_bases"] > 0)])
        live = [job for job in jobs if job.action != "skip"]
        self._clip(opt, plain, live)
        for group, params in plain:
            opt._adamw_group(group, params)
        opt._update_all(live)
        for job in jobs:
            job.P = job.R = None

    def _clip(self, opt, plain: list[tuple[dict, list]], live: list[_Job]) -> None:
        """The consumed norm (R of each live matrix, plain gradients), and torch's clip_grad_norm_ rule on it."""
        grads = [_local(p.grad) for _, params in plain for p in params]
        device = (grads or [job.R for job in live] or [None])[0]
        if device is None:
            return
        norm_sq = torch.zeros((), dtype=torch.float32, device=device.device)
        for t in grads + [job.R for job in live]:
            norm_sq = norm_sq + _sq_norm(t)
        self.norm = opt.stats_comm.reduce_stats(norm_sq.reshape(1, 1))[0, 0].sqrt()
        if self.max_norm <= 0:
            return
        coef = (self.max_norm / (self.norm + 1e-6)).clamp(max=1.0)
        for t in grads + [job.R for job in live] + [_local(job.p.grad) for job in live]:
            t.mul_(coef.to(t.dtype))


__all__ = ["ConsumedStep", "NO_REPLICAS", "Replicas"]
