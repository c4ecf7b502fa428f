"""One unit's step for optimizer-in-backward (optim/in_backward.py): the per-unit step with its device mask, and
what gradient accumulation may keep of a unit's matrices."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from lotus_dist.counters import to_host

from .adamw_step import _FUSED_ADAMW, _fused
from .job import _Job
from .switching import POLICIES, STAY
from .tensors import _local, _sq_norm


class UnitStep:
    """A unit stepped on the device (``LowRankAdamW.step_unit(defer=True)``): its squared gradient norm, whether
    it was applied (``ok``) and whether its gradient was finite, as device scalars; ``undo()`` restores the host
    counters (step, tau) of a unit that was not applied. ``local``: the three are this rank's (its shard's partial
    norm, its own mask), not reduced across ranks (see optim/in_backward.py)."""

    def __init__(self, norm_sq: torch.Tensor, ok: torch.Tensor, finite: torch.Tensor,
                 counters: list[tuple[dict, int, int | None]], local: bool = False):
        self.norm_sq, self.ok, self.finite, self._counters, self.local = norm_sq, ok, finite, counters, local

    def undo(self) -> None:
        for st, step, tau in self._counters:
            st["step"] = step
            if tau is not None:
                st["tau"] = tau


class UnitStepping:
    """``LowRankAdamW``'s per-unit path (a mixin of it): uses its ``_collect``, ``_prepare``, ``_apply``,
    ``_decide``, ``_update_all``, ``_project``, ``_use_projector``, ``_geometry``, its plain-AdamW step and
    ``stats_comm``."""

    @torch.no_grad()
    def step_unit(self, params: Iterable[torch.Tensor], *, projected: dict[int, torch.Tensor] | None = None,
                  max_norm: float = 0.0, defer: bool = False, gate: torch.Tensor | None = None) -> "float | UnitStep":
        """Update only ``params``: one unit (an FSDP unit / block) of optimizer-in-backward (``in_backward.py``).

        ``projected`` maps id(param) -> R accumulated over earlier micro-batches (added to R of ``param.grad``).
        The unit's squared gradient norm rides as one more row in the switch statistics, so the switch consensus,
        the non-finite check and per-unit clipping (``max_norm`` > 0) cost one reduction and one host sync per
        unit. Returns that squared norm summed across ranks (of R for matrices given in ``projected``): if it is
        not finite, nothing of the unit is updated. ``gate`` (a device bool, this rank's: False after an earlier
        non-finite unit of the step, on_nonfinite=stop) rides in the same reduction: where it is False on any rank
        nothing is updated and None is returned, on every rank alike.

        ``defer``: when nothing in the unit needs a host decision this step (no check, no switch; see
        ``_deferrable``), the unit updates without any collective or host sync (unless ``max_norm`` > 0, whose
        clipping needs the reduced norm) and returns a ``local`` ``UnitStep``: this rank's partial norm and its
        shard's finiteness stay on the device, a non-finite shard (or a False ``gate``) is masked on the device
        (its weights and moments are left as they were), and the caller reduces every unit's values once per step
        and calls ``UnitStep.undo()`` (host counters) where any rank masked the unit.
        """
        projected = projected or {}
        plain, jobs = self._collect({id(p) for p in params})
        unit = [p for _, ps in plain for p in ps] + [job.p for job in jobs]
        if not unit:
            return 0.0
        grads = [_local(p.grad) for p in unit]
        zero = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        # [Σ‖G‖² of full gradients, Σ‖R‖² of accumulated projections, gate closed]: local partial sums
        norm_row = torch.stack([
            sum((_sq_norm(g) for p, g in zip(unit, grads) if id(p) not in projected), zero),
            sum((_sq_norm(projected[id(p)]) for p in unit if id(p) in projected), zero),
            zero if gate is None else (~gate).float(),
        ])
        if defer and self._deferrable(plain, jobs):
            return self._step_unit_on_device(plain, jobs, grads, norm_row, projected, max_norm, gate)
        rows = [norm_row] + self._prepare(jobs, projected)
        stats = to_host(self.stats_comm.reduce_stats(torch.stack(rows).float()))
        if stats[0][2] > 0:  # some rank's gate is closed: the step stops here on every rank
            return None
        norm_sq = stats[0][0] + stats[0][1]
        if not math.isfinite(norm_sq):
            return norm_sq
        if max_norm > 0.0:
            coef = max_norm / (math.sqrt(norm_sq) + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule, per unit
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
                for job in jobs:
                    if job.R is not None:
                        job.R.mul_(coef)
        for group, ps in plain:
            self._adamw_group(group, ps)
        self._apply(jobs, stats[1:])
        return norm_sq

    def _deferrable(self, plain: list[tuple[dict, list]], jobs: list[_Job]) -> bool:
        """Whether a unit can step without a host decision: every plain parameter takes the fused AdamW kernel
        (its ``found_inf`` skips a non-finite unit), and every projected matrix has a basis and stays this step
        with a policy and method whose state a device mask covers (not Fira, online PCA or path efficiency)."""
        if not _FUSED_ADAMW:
            return False
        if not all(_fused(p, group) for group, ps in plain for p in ps):
            return False
        for job in jobs:
            group, st = job.group, job.state
            if st["n_bases"] == 0 or group["residual"] != "none" or group["solver"] == "online_pca":
                return False
            if group["switch"] == "path_efficiency" or POLICIES[group["switch"]].peek(st, group) != STAY:
                return False
        return True

    def can_defer(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether ``step_unit(params, defer=True)`` would step on the device (ask before a host-path unit)."""
        plain, jobs = self._collect({id(p) for p in params})
        return self._deferrable(plain, jobs)

    def _step_unit_on_device(self, plain, jobs, grads, norm_row, projected, max_norm, gate) -> "UnitStep":
        """``step_unit`` without a host sync: clipping and the non-finite mask are device scalars, from this rank's
        partial norm, or from the reduced norm with ``max_norm`` > 0 (see ``step_unit``)."""
        self._prepare(jobs, projected)
        local = max_norm <= 0.0
        reduced = norm_row if local else self.stats_comm.reduce_stats(norm_row.reshape(1, -1).float())[0]
        norm_sq = reduced[0] + reduced[1]
        finite = torch.isfinite(norm_sq)
        ok = finite if gate is None else finite & gate
        if max_norm > 0.0:  # torch.nn.utils.clip_grad_norm_'s rule, per unit, as a device scalar (1 when not clipping)
            coef = (max_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
            for job in jobs:
                job.R.mul_(coef.to(job.R.dtype))
        states = [self.state[p] or self._init_adamw_state(p, group) for group, ps in plain for p in ps]
        counters = [(st, st["step"], st.get("tau")) for st in states + [job.state for job in jobs]]
        for group, ps in plain:
            self._adamw_group(group, ps, found_inf=(~ok).float())
        for job in jobs:
            self._decide(job, None)
        self._update_all(jobs, ok=ok)
        for job in jobs:
            job.P = job.R = None
        return UnitStep(norm_sq, ok, finite, counters, local)

    def _group_of(self, p: torch.Tensor) -> dict:
        if self._groups is None:
            self._groups = {id(q): group for group in self.param_groups for q in group["params"]}
        return self._groups[id(p)]

    def accumulates_projected(self, p: torch.Tensor) -> bool:
        """Whether gradient accumulation for ``p`` may keep only R = project(G) this step (optimizer-in-backward):
        a projected matrix with a basis whose step neither switches nor checks, and whose method reads only R
        (no Fira residual, no online PCA, no path-efficiency sketch of G)."""
        group, st = self._group_of(p), self.state.get(p)
        if group.get("rank") is None or not st or st["n_bases"] == 0:
            return False
        if group["residual"] != "none" or group["solver"] == "online_pca":
            return False
        return not POLICIES[group["switch"]].needs_gradient(st, group)

    @torch.no_grad()
    def project_gradient(self, p: torch.Tensor) -> torch.Tensor:
        """R = project(p.grad) in the current basis, as the step would compute it (reduced where sharded)."""
        group, st = self._group_of(p), self.state[p]
        side, _ = self._geometry(p, group)
        return self._project(p, _local(p.grad), self._use_projector(p, st), side)
