"""Basis refresh: the new bases of every matrix that switches in a step, solved together, and the moment policies
at a switch (docs/algorithms.md sections 4 and 6)."""

from __future__ import annotations

import torch

from lotus_dist.counters import to_host

from . import state_codes
from .job import _Job
from .refresh_batches import cut_batches, workspace_bytes
from .basis_solvers import compute_projector, projector_steps
from .solver_rounds import run_batched
from .subspace import columns, derive_seed
from .switching import POLICIES
from .tensors import _local, state_dtype

REFRESH_BATCH_BYTES = 256 << 20  # solver workspace of the matrices one batched refresh solves (optim.refresh_batch_mb)
SALT_BASIS = 0x42


class BasisRefresh:
    """``LowRankAdamW``'s basis refresh (a mixin of it): uses its ``comm_for``, ``_timer``, ``_project_all``,
    ``_use_projector``, ``_store_projector`` and ``refresh_batch_bytes``."""

    def _refresh(self, jobs: list[_Job]) -> None:
        """New bases for every matrix switching this step, solved together: the solvers run in lockstep
        (``run_batched``), so each solver stage costs one collective for a batch of matrices, and one host sync
        checks every new basis. Batches are capped at ``refresh_batch_bytes`` of solver workspace, measured on the
        global matrices, so every rank cuts them at the same matrices (optim/refresh_batches.py)."""
        for batch in self._refresh_batches(jobs):
            with self._timer:
                solvers, gens = [], []
                for job in batch:
                    group, st, comm = job.group, job.state, self.comm_for(job.p)
                    first = st["n_bases"] == 0
                    if not first and job.P is None and (group["solver"] == "grasswalk" or group["moments"] != "keep"):
                        job.P = self._use_projector(job.p, st)  # the old basis is needed: prev / rotation
                    seed = derive_seed(group["seed"], st["index"], st["n_bases"], SALT_BASIS)
                    gens.append(torch.Generator(device=job.p.device).manual_seed(seed))
                    solvers.append(projector_steps(
                        group["solver"], _local(job.p.grad), job.side, job.r, gen=gens[-1],
                        prev=None if first else job.P, oversample=group["oversample"],
                        power_iters=group["power_iters"], geodesic_step=group["geodesic_step"],
                        prev_rounded=st["projector"].dtype != state_dtype(job.p.dtype),
                        comm=comm))
                news = run_batched(solvers)
                # One sync per refresh, for the whole batch (every rank holds the same reduced or broadcast bases,
                # so every rank takes the same branches below).
                finite = torch.stack([torch.isfinite(n).all() if isinstance(n, torch.Tensor)
                                      else torch.zeros((), dtype=torch.bool, device=job.p.device)
                                      for n, job in zip(news, batch)])
                solved = to_host(finite)
            for job, gen, new, ok in zip(batch, gens, news, solved):
                self._switch_basis(job, new if ok else None, gen)
            self._project_all(batch)  # R in the new bases (a fallback's reductions together)
            for job in batch:
                POLICIES[job.group["switch"]].on_switch(job.state, job.group, job.R)

    def _refresh_batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        # from p.shape, the global one (a DTensor's; a whole matrix on its owner under ddp/deepspeed), never the shard's
        needs = [workspace_bytes(self.comm_for(job.p).batch_shape(tuple(job.p.shape)), job.group["solver"], job.r,
                                 job.group["oversample"]) for job in jobs]
        return [[jobs[i] for i in batch] for batch in cut_batches(needs, self.refresh_batch_bytes)]

    def _switch_basis(self, job: _Job, new: torch.Tensor | None, gen: torch.Generator) -> None:
        """Keep the new basis (apply the moment policy), or after a failed solve keep the current one, or for a first
        basis start from a random orthonormal one."""
        group, st, side, comm = job.group, job.state, job.side, self.comm_for(job.p)
        G = _local(job.p.grad)
        first = st["n_bases"] == 0
        if new is None:
            # A degenerate gradient broke the solver: never store a NaN basis. Counted in the state for the logs.
            st["solver_fallbacks"] += 1
            if first:
                new = compute_projector("random", G, side, job.r, gen=gen, comm=comm)
        if new is not None:
            if not first:
                self._apply_moment_policy(group, st, job.P, new, side)
            job.P = self._store_projector(job.p, st, new)
            st["n_bases"] += 1
            job.refreshed = True
        elif job.P is None:
            job.P = self._use_projector(job.p, st)

    @staticmethod
    def _apply_moment_policy(group, st, old, new, side) -> None:
        """Moments at a switch (docs/algorithms.md section 6), C mapping old coordinates to new ones: keep, reset, rotate
        (LDAdam: the bias-corrected second moment of the gradient in the new coordinates) or rotate_subtrack
        (SubTrack++'s code, with its extra (1 - beta2) factor, for comparison)."""
        mode = group["moments"]
        if mode == "keep":
            return
        if mode == "reset":  # zero codes and scales decode to zero moments
            for key in state_codes.STORED_KEYS & set(st):
                st[key].zero_()
            return
        beta1, beta2 = group["betas"]
        S_old, S_new = columns(old, side).float(), columns(new, side).float()
        Mf, Vf = state_codes.load(st, torch.float32)  # fp32 copies, or the fp32 state itself (read only here)
        # left: C = S_newᵀ S_old acts on M's rows (r x n); right: C = S_oldᵀ S_new (= B_old B_newᵀ) on its columns
        C = S_new.T @ S_old if side == "left" else S_old.T @ S_new

        def rotate(X: torch.Tensor, square: bool = False) -> torch.Tensor:
            Cx = C.square() if square else C
            return Cx @ X if side == "left" else X @ Cx

        CM = rotate(Mf)
        if mode == "rotate_subtrack":
            V_new = (rotate(Vf - Mf.square(), square=True) + CM.square()).abs_().mul_(1 - beta2)
        else:  # rotate: b1, b2 the bias corrections of the s steps taken so far (s >= 1 at any switch)
            s = st["step"]
            b1, b2 = 1 - beta1**s, 1 - beta2**s
            V_new = (rotate(Vf / b2 - Mf.square() / b1**2, square=True) + CM.square() / b1**2).abs_().mul_(b2)
        state_codes.store(st, [CM, V_new])  # into the stored moments (requantized under int8)
