"""The fused low-rank step (``optim.fused``): the projected matrices of one shape, side, dtype and state format, in
one param group and at one step count, stepped as a stack, so the kernels of a step grow with the number of such
groups (a LLaMA model: at most 7, whatever its depth), not with the number of matrices.

Per group (cut into chunks of at most ``FUSED_CHUNK_BYTES`` of stacked weights): the gradients, projectors and
weights are stacked, R = project(G) is one batched GEMM, the moments are loaded as stacks (decoded from bf16 / int8
as ``state_codes.load`` decodes each), Adam's update, Fira's residual or APOLLO's scaling and the norm-growth
limiter run on the stacks, the back-projection is one ``baddbmm`` into the stacked weights, and everything is
copied back into the per-parameter tensors with one ``_foreach_copy_`` per kind. The state stays per parameter
(checkpoints, DCP resharding and resume are those of the per-matrix step); only the arithmetic is batched, op for op
the per-matrix step's, so on the CPU it is equal to it bit for bit (tests/optim/test_fused_step.py).

What stays per matrix (``LowRankAdamW._fused_key`` returns None): the FSDP fallback (its R and N need collectives
of their own), online PCA (its projector takes a step of its own), path efficiency (it sketches every G), and the
check and switch steps' projections and solvers; with ``optim.per_layer`` only the update after the projection is
fused (a unit's matrices are projected one by one, see ``unit_step.py``). Costs: a stacked copy of each chunk's
gradients and weights at a time (transient, at most ``FUSED_CHUNK_BYTES`` each) and of its projectors.
"""

from __future__ import annotations

import math

import torch

from . import state_codes
from .apollo import APOLLO_RESIDUALS, apollo_scaling, channel_scaling
from .fira_online_pca import limit_growth
from .job import _Job
from .solver_rounds import run_batched
from .subspace import add_project_back_, project, project_back
from .switching import POLICIES, Policy
from .tensors import _local, state_dtype

FUSED_CHUNK_BYTES = 256 << 20  # stacked weights of one fused chunk: the transient copies stay bounded


class FusedSteps:
    """``LowRankAdamW``'s fused update (a mixin of it): uses its ``comm_for``, ``_use_projector`` and
    ``_step_size``."""

    fused_chunk_bytes = FUSED_CHUNK_BYTES

    def _fused_key(self, job: _Job) -> tuple | None:
        """What must be alike for matrices to step as one stack; None where the matrix steps alone."""
        group, st = job.group, job.state
        if not group.get("fused", False) or group["solver"] == "online_pca":
            return None
        if type(POLICIES[group["switch"]]).observe is not Policy.observe:  # path efficiency sketches each G
            return None
        comm = self.comm_for(job.p)
        if comm.shards_projected_side:
            return None
        W, G = _local(job.p), _local(job.p.grad)
        return (id(group), tuple(job.p.shape), tuple(W.shape), W.dtype, G.dtype, W.device, job.side, job.r,
                st["step"], st.get("fira_ready"), getattr(comm, "batch_key", id(comm)), job.R is None)

    def _chunks(self, jobs: list[_Job]) -> list[list[_Job]]:
        """``jobs`` grouped by ``_fused_key`` (first-seen order), each group cut to ``fused_chunk_bytes``."""
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(self._fused_key(job), []).append(job)
        out = []
        for same in groups.values():
            W = _local(same[0].p)
            per = max(1, self.fused_chunk_bytes // max(1, W.numel() * W.element_size()))
            out += [same[i:i + per] for i in range(0, len(same), per)]
        return out

    def _update_fused(self, jobs: list[_Job], ok: torch.Tensor | None = None) -> None:
        """``_adam_step`` and ``_apply_update`` of every job, a stack at a time; R = project(G) first where
        ``_prepare`` left it to this (job.R None). ``ok``: as in ``_update_all``."""
        for chunk in self._chunks(jobs):
            self._step_stack(chunk, ok)
            for job in chunk:
                job.P = job.R = None

    def _step_stack(self, jobs: list[_Job], ok: torch.Tensor | None) -> None:
        first, group, side = jobs[0], jobs[0].group, jobs[0].side
        states = [job.state for job in jobs]
        comms = [self.comm_for(job.p) for job in jobs]
        for job in jobs:
            if job.P is None:
                job.P = self._use_projector(job.p, job.state)
        P = torch.stack([comm.local_projector(job.P, side) for comm, job in zip(comms, jobs)])
        G = torch.stack([_local(job.p.grad) for job in jobs])
        if first.R is None:
            R = project(G, P, side)
            outs = run_batched([comm.projected_steps(t) for comm, t in zip(comms, R.unbind(0))])
            if any(o is not t for o, t in zip(outs, R.unbind(0))):  # a Comm that reduces R (not the identity)
                R = torch.stack(outs)
        else:
            R = torch.stack([job.R for job in jobs])

        # _adam_step's low-rank Adam, on the stack
        beta1, beta2 = group["betas"]
        for st in states:
            st["step"] += 1
        M, V = state_codes.load_stacked(states, state_dtype(first.p.dtype))
        if ok is None:
            M.mul_(beta1).add_(R, alpha=1.0 - beta1)
            V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        else:
            one = torch.ones((), dtype=M.dtype, device=M.device)
            Rm = torch.where(ok, R, torch.zeros((), dtype=R.dtype, device=R.device))
            M.mul_(torch.where(ok, torch.full_like(one, beta1), one)).add_(Rm, alpha=1.0 - beta1)
            V.mul_(torch.where(ok, torch.full_like(one, beta2), one)).addcmul_(Rm, Rm, value=1.0 - beta2)
        N = M / V.sqrt().add_(group["eps"])
        state_codes.store_stacked(states, [M, V], keep=None if ok is None else ~ok)

        # _apply_update's weight step, on the stack
        Ws = [_local(job.p) for job in jobs]
        W = torch.stack(Ws)
        lr, wd = group["lr"], group["weight_decay"]
        if ok is not None:
            N.mul_(ok.to(N.dtype))
        step_size = self._step_size(group, states[0]["step"])
        comm = comms[0]  # alike in the stack (its batch key): the limiter's sums go out once for all
        if group["residual"] in APOLLO_RESIDUALS:
            U = limit_growth(states, G * apollo_scaling(N, R, side, group["residual"], comm), comm)
            W.add_(U, alpha=-step_size * math.sqrt(group["scale"]))
        else:
            if group["residual"] == "fira":
                residual = (G - project_back(R, P, side)) * channel_scaling(N, R, side)
                W.add_(limit_growth(states, residual, comm), alpha=-step_size)
            add_project_back_(W, N, P, side, alpha=-step_size * group["scale"])
        if wd > 0.0:
            W.add_(W if ok is None else W * ok.to(W.dtype), alpha=-lr * wd)
        torch._foreach_copy_(Ws, list(W.unbind(0)))


__all__ = ["FUSED_CHUNK_BYTES", "FusedSteps"]
