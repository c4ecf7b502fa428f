"""LowRankAdamW: the low-rank gradient-projection AdamW of docs/algorithms.md section 3, with the parts of sections 3-5.

A param group with a ``rank`` key is projected (one combination of solver, switch policy, moment policy and
residual, see ``LOWRANK_DEFAULTS``); every other group is plain AdamW with ``torch.optim.AdamW`` semantics.

State per projected matrix (tensors and ints only, so ``torch.load(weights_only=True)`` and DCP work):
``step``, ``index`` (matrix index, seeds the random draws), ``n_bases`` (bases computed so far; 0 = no projector
yet), ``exp_avg``/``exp_avg_sq`` (R-shaped: r x n for a left projector, m x r for a right one, i.e. the weight's
long side), ``projector`` (A m x r or B r x n), plus per part: ``tau``/``d_init`` (displacement; reference_codes.py:
``d_codes``, ``d_scale``, ``d_top``, ``d_norm_sq`` with optim.reference_dtype=int4), ``pe_*``
(path_efficiency), ``fira_norm``/``fira_ready`` (the norm-growth limiter of Fira and APOLLO), ``pca_*``
(online_pca). The state is allocated in full at
the first step that sees a gradient, even a zero one, so DCP's zero-gradient initialising step builds the complete
structure; the projector is only computed from the first non-zero gradient.

This module is the low-rank step itself (state, projection, statistics, decision, low-rank Adam, back-projection);
its other parts are mixins beside it: ``unit_step.py`` (one unit of optimizer-in-backward), ``refresh.py`` (new
bases, moment policies), ``fira_online_pca.py``, ``adamw_step.py`` (plain groups); the options are in ``options.py``,
the dtype rules in ``tensors.py``, the reports in ``reports.py``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer

from lotus_dist.counters import to_host

from . import projector_codes, state_codes
from .adamw_step import AdamWStep
from .apollo import APOLLO_RESIDUALS, apollo_scaling
from .fira_online_pca import FiraAndOnlinePCA, limit_growth
from .fused_step import FusedSteps
from .job import _Job
from .options import LOWRANK_DEFAULTS, check_options
from .refresh import REFRESH_BATCH_BYTES, BasisRefresh
from .solver_rounds import run_batched
from .subspace import (
    IDENTITY,
    Comm,
    Timer,
    add_project_back_,
    lowrank_shape,
    project,
    projected_dim,
    projector_shape,
    side_for,
)
from .switching import CHECK, POLICIES, STATS_WIDTH, STAY, SWITCH
from .tensors import (FP32_KEYS, OWN_DTYPE_KEYS, _local, _sq_norm, closure_loss, projector_dtype, state_dtype)
from .unit_step import UnitStepping


class LowRankAdamW(UnitStepping, BasisRefresh, FiraAndOnlinePCA, FusedSteps, AdamWStep, Optimizer):
    """AdamW whose ``rank`` groups keep their moments in a low-rank gradient subspace.

    ``lowrank_defaults`` override ``LOWRANK_DEFAULTS`` (the Lotus method) for groups that have a ``rank``.
    Attributes the distributed layer / trainer may use: ``set_comm(param, comm)``, ``stats_comm`` (a Comm whose
    ``reduce_stats`` sums the per-step statistics), ``param_names`` (id(param) -> name, for ``switch_report``),
    ``refresh_seconds`` (wall time in basis solvers), ``init_state()``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **lowrank_defaults,
    ):
        unknown = sorted(set(lowrank_defaults) - set(LOWRANK_DEFAULTS) - set(self._extra_defaults()))
        if unknown:
            raise TypeError(f"unknown low-rank option(s) {unknown}; known: {sorted(LOWRANK_DEFAULTS)}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        self.lowrank_defaults = {**LOWRANK_DEFAULTS, **self._extra_defaults(), **lowrank_defaults}
        check_options(self.lowrank_defaults)
        self.param_names: dict[int, str] = {}
        self.stats_comm: Comm = IDENTITY
        self._comms: dict[int, Comm] = {}
        self._gens: dict[str, torch.Generator] = {}
        self._indices: dict[int, int] | None = None
        self._groups: dict[int, dict] | None = None
        self._timer = Timer()
        self.refresh_batch_bytes = REFRESH_BATCH_BYTES
        self.consumed = None  # a ConsumedStep (optim/consumed_step.py): train.grad_clip_norm=consumed runs the step
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _extra_defaults() -> dict:
        return {}

    # ------------------------------------------------------------------------------------------ configuration

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("rank") is not None:
            for key, value in self.lowrank_defaults.items():
                param_group.setdefault(key, value)
            check_options(param_group)
        else:
            param_group.pop("rank", None)
            # a plain group's moments follow optim.state_dtype too (its only low-rank option)
            param_group.setdefault("state_dtype", self.lowrank_defaults["state_dtype"])
            check_options({"state_dtype": param_group["state_dtype"]})
        super().add_param_group(param_group)
        param_group.setdefault("initial_lr", param_group["lr"])  # lr_0 of online_pca's projector lr
        self._indices = self._groups = None

    def set_comm(self, param: torch.Tensor, comm: Comm) -> None:
        """Communication for one projected matrix (the distributed layer); identity by default."""
        self._comms[id(param)] = comm

    def comm_for(self, param: torch.Tensor) -> Comm:
        return self._comms.get(id(param), IDENTITY)

    @property
    def refresh_seconds(self) -> float:
        return self._timer.seconds

    def _index_of(self, p: torch.Tensor) -> int:
        if self._indices is None:
            self._indices = {}
            for group in self.param_groups:
                for q in group["params"]:
                    self._indices.setdefault(id(q), len(self._indices))
        return self._indices[id(p)]

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device)
        return self._gens[key]

    @staticmethod
    def _geometry(p: torch.Tensor, group: dict) -> tuple[str, int]:
        if p.dim() != 2:
            raise ValueError(f"a projected parameter must be 2-D, got shape {tuple(p.shape)}")
        shape = tuple(p.shape)
        side = side_for(shape, group["proj_type"])
        return side, min(group["rank"], projected_dim(shape, side))

    # ------------------------------------------------------------------------------------------------ state

    def _init_lowrank_state(self, p: torch.Tensor, group: dict) -> dict:
        side, r = self._geometry(p, group)
        # side and r follow the global matrix; tensors have the local (long-side shard) shape, see _local
        shape, dtype, device = tuple(_local(p).shape), state_dtype(p.dtype), p.device
        piece = self.comm_for(p).state_piece(shape, side)  # the long side this rank's state covers
        st = self.state[p]
        st["step"] = 0
        st["index"] = self._index_of(p)
        st["n_bases"] = 0
        st["solver_fallbacks"] = 0  # solves that failed (degenerate gradient) and kept the previous basis
        local, r_dim = lowrank_shape(piece, side, r), 0 if side == "left" else 1

        def zeros(dt: torch.dtype, scale: bool) -> torch.Tensor:  # int8: one scale per long-side index
            return torch.zeros([1 if scale and d == r_dim else n for d, n in enumerate(local)], dtype=dt,
                               device=device)

        full = lowrank_shape(tuple(p.shape), side, r)  # the global state's shape decides its format
        state_codes.allocate(st, state_codes.group_format(group), full, zeros, dtype)
        # the projector follows the global matrix (p.shape is global for a DTensor); the Comm decides what part
        # of it this rank stores (all of it, or a 1/W slice)
        stored = self.comm_for(p).projector_storage(projector_shape(tuple(p.shape), side, r))
        st["projector"] = torch.zeros(projector_codes.stored_shape(stored, group["projector_dtype"]),
                                      dtype=projector_dtype(group["projector_dtype"], p.dtype), device=device)
        short = self.comm_for(p).short_size(projected_dim(shape, side))
        POLICIES[group["switch"]].allocate(st, piece, side, r, dtype, device, short=short,
                                           reference=group["reference_dtype"])
        if group["residual"] != "none":  # Fira's and APOLLO's norm-growth limiter
            st["fira_norm"] = torch.zeros((), dtype=torch.float32, device=device)
            st["fira_ready"] = 0
        if group["solver"] == "online_pca":
            st["pca_exp_avg"] = torch.zeros_like(st["projector"])
            st["pca_exp_avg_sq"] = torch.zeros_like(st["projector"])
            st["pca_step"] = 0
        return st

    def after_load(self) -> None:
        """Call after a load that filled this optimizer's state or groups without ``load_state_dict`` (DCP's
        in-place load): drops the param -> group cache, rebuilt on the next use. Local, no communication."""
        self._groups = None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that the states keep the dtype ``state_dtype`` gives them (fp32 statistics, the
        switch reference and the projector their own (bf16, the state's, or uint8 codes), stored moments their
        codes', scales' or bf16, optim/state_codes.py): torch casts every state tensor to the parameter's dtype,
        which would make a bf16-parameter resume keep bf16 moments, a bf16 reference or projector grow back to fp32
        and int8 codes become floats."""
        state = dict(state_dict["state"])
        # saved keys (ints, or FQNs when DCP's set_state_dict calls us) map to parameters by group order, as in torch
        saved = [k for group in state_dict["param_groups"] for k in group["params"]]
        params = dict(zip(saved, (p for group in self.param_groups for p in group["params"])))
        projected = self._projected_ids()
        kept = {}
        for key, st in list(state.items()):
            p = params.get(key)
            if p is not None and id(p) in projected:
                # a sharded checkpoint hands projected-matrix state over as DTensors; the step runs on local tensors
                st = state[key] = {k: _local(v) for k, v in st.items()}
            promoted = p is not None and state_dtype(p.dtype) != p.dtype
            extra = {k: v for k, v in st.items() if k in FP32_KEYS | OWN_DTYPE_KEYS or (torch.is_tensor(v) and (
                state_codes.keeps_dtype(k, v) or promoted and k != "step" and v.is_floating_point()))
            } if p is not None else {}
            if extra:
                kept[key] = extra
                state[key] = {k: v for k, v in st.items() if k not in extra}
        super().load_state_dict({**state_dict, "state": state})
        self.after_load()  # torch's load puts new group dicts in place
        for key, extra in kept.items():
            p = params[key]
            for k, v in extra.items():
                dtype = (torch.float32 if k in FP32_KEYS else v.dtype if k in OWN_DTYPE_KEYS
                         or state_codes.keeps_dtype(k, v) else state_dtype(p.dtype))
                self.state[p][k] = v.to(device=p.device, dtype=dtype)

    def _use_projector(self, p: torch.Tensor, st: dict) -> torch.Tensor:
        """The full projector in the state dtype: gathered where stored sharded, upcast where stored in bf16 or
        decoded from int8 codes (optim.projector_dtype), a copy of one matrix at a time; the stored tensor itself
        otherwise."""
        return projector_codes.working(self.comm_for(p).use_projector(st["projector"]), state_dtype(p.dtype))

    def _store_projector(self, p: torch.Tensor, st: dict, new: torch.Tensor) -> torch.Tensor:
        """Keep a new basis (rounded once where stored in bf16 or int8); returns the full projector to use from now
        on, the stored one in the state dtype, so this step computes with what the next steps read back."""
        if projector_codes.is_packed(st["projector"]):
            new = projector_codes.encode(new)
        return projector_codes.working(self.comm_for(p).store_projector(st["projector"], new), state_dtype(p.dtype))


    def _projected_ids(self) -> set[int]:
        return {id(p) for group in self.param_groups if group.get("rank") is not None for p in group["params"]}

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state as its first step would, without stepping (works on ``meta``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    if group.get("rank") is None:
                        self._init_adamw_state(p, group)
                    else:
                        self._init_lowrank_state(p, group)

    # ------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        plain, jobs = self._collect(None)
        if self.consumed is not None:  # clip by the consumed norm, replicas exchanging R (optim/consumed_step.py)
            self.consumed.run(self, plain, jobs)
            return loss
        for group, params in plain:
            self._adamw_group(group, params)
        if jobs:
            rows = self._prepare(jobs, settle=True)
            stats = to_host(self.stats_comm.reduce_stats(torch.stack(rows).float())) if rows else []
            self._apply(jobs, stats)
        return loss

    def _collect(self, ids: set[int] | None) -> tuple[list[tuple[dict, list]], list[_Job]]:
        """(plain groups with their parameters that have a gradient, projected jobs), limited to ``ids``."""
        plain, jobs = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and (ids is None or id(p) in ids)]
            if group.get("rank") is None:
                if params:
                    plain.append((group, params))
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("LowRankAdamW does not support sparse gradients")
                st = self.state[p] or self._init_lowrank_state(p, group)
                jobs.append(_Job(group, p, st, *self._geometry(p, group)))
        return plain, jobs

    def _project_all(self, jobs: list[_Job]) -> None:
        """``job.R`` = project(G) with ``job.P`` for every job; the reductions of the matrices sharded along their
        projected side (the fallbacks' reduce-scatters) go out together, one collective for all of them."""
        partials = []
        for job in jobs:
            comm = self.comm_for(job.p)
            partials.append(project(_local(job.p.grad), comm.local_projector(job.P, job.side), job.side))
        for job, R in zip(jobs, run_batched([self.comm_for(job.p).projected_steps(t)
                                             for job, t in zip(jobs, partials)])):
            job.R = R

    def _project(self, p: torch.Tensor, G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
        """R = project(G) with the full projector P: this rank's piece of G times its piece of P, reduced across
        ranks where the matrix is sharded along its projected side."""
        comm = self.comm_for(p)
        return comm.reduce_projected(project(G, comm.local_projector(P, side), side))

    def _prepare(self, jobs: list[_Job], projected: dict[int, torch.Tensor] | None = None,
                 settle: bool = False) -> list[torch.Tensor]:
        """Phase 1: project with the current basis and collect the statistics rows (host counters untouched, so a
        unit whose gradient turns out non-finite can be left exactly as it was).

        A scheduled switch is not projected here (its R is taken in the new basis): it waits for ``_apply``, where
        the step's switches are solved together. ``settle`` (whole-model steps, whose gradients were checked
        before the step): a matrix with nothing to decide and no switch is updated right away, so its projector
        and R are freed before the next matrix is projected, and a projector stored sharded is all-gathered once
        per step and only one is ever whole at a time. A checking matrix keeps R for its decision and gives its
        gathered projector back (gathered again when it is used).
        """
        rows: list[torch.Tensor] = []
        grouped: list[_Job] = []
        fused: list[_Job] = []  # optim.fused: settled matrices projected and updated together, below
        for job in jobs:
            st, G = job.state, _local(job.p.grad)
            if st["n_bases"] == 0:
                job.action = "init"
                job.row = len(rows)
                gsq = _sq_norm(G)
                rows.append(torch.cat([gsq.reshape(1), gsq.new_zeros(STATS_WIDTH - 1)]))
                continue
            job.action = POLICIES[job.group["switch"]].peek(st, job.group)
            online = job.group["solver"] == "online_pca"  # its switch is an update of P: it needs R and P now
            if job.action == SWITCH and not online:
                continue
            if settle and job.action == STAY and not projected and self._fused_key(job) is not None:
                self._decide(job, None)
                job.done = True
                fused.append(job)
                continue
            comm = self.comm_for(job.p)
            job.P = self._use_projector(job.p, st)
            if comm.shards_projected_side:  # a fallback: its reduction goes out with the others', below
                grouped.append(job)
                continue
            job.R = self._project(job.p, G, job.P, job.side)
            self._settle_or_check(job, projected, settle, rows)
        if grouped:
            self._project_all(grouped)
            settled = [job for job in grouped if self._settle_or_check(job, projected, settle, rows, defer=True)]
            self._update_all(settled)
            for job in settled:
                job.P = job.R = None
        self._update_fused(fused)
        return rows

    def _settle_or_check(self, job: _Job, projected, settle: bool, rows: list, defer: bool = False) -> bool:
        """With R taken: add R accumulated over earlier micro-batches; then update a matrix with nothing to decide
        now (settle; with ``defer`` the caller updates it, returned True), or give a checking one its statistics
        row."""
        st = job.state
        if projected and id(job.p) in projected:
            job.R.add_(projected[id(job.p)])
        if settle and job.action != CHECK:
            self._decide(job, None)
            job.done = True
            if defer:
                return True
            self._update(job)
            job.P = job.R = None
            return False
        if job.action == CHECK:
            job.row = len(rows)
            rows.append(POLICIES[job.group["switch"]].statistics(st, job.group, job.R))
            if settle and job.P is not st["projector"]:  # a gathered or upcast copy: one whole at a time
                job.P = None
        return False

    def _apply(self, jobs: list[_Job], stats: list[list[float]]) -> None:
        """Phase 3, after the one host sync on the reduced [L, STATS_WIDTH] statistics: decide; solve the new bases
        of every matrix that switches, together (``_refresh``); update."""
        pending = [job for job in jobs if not job.done]
        for job in pending:
            self._decide(job, stats)
        self._refresh([job for job in pending if job.switch and job.action != "skip"
                       and not (job.group["solver"] == "online_pca" and job.state["n_bases"] > 0)])
        self._update_all([job for job in pending if job.action != "skip"])
        for job in pending:
            job.P = job.R = None

    def _decide(self, job: _Job, stats: list[list[float]] | None) -> None:
        """Advance the policy's counters and set ``job.switch`` (from the reduced statistics row, on a check); a
        first basis waiting for a non-zero gradient becomes a "skip" (e.g. DCP's zero-gradient initialising step)."""
        if job.action == "init":
            if stats[job.row][0] <= 0.0:
                job.action = "skip"
                return
            job.switch = True
            return
        policy = POLICIES[job.group["switch"]]
        action = policy.advance(job.state, job.group)
        assert action == job.action, (action, job.action)
        job.switch = policy.decide(job.state, job.group, stats[job.row]) if action == CHECK else action == SWITCH

    def _update(self, job: _Job, ok: torch.Tensor | None = None) -> None:
        self._update_all([job], ok)

    def _update_all(self, jobs: list[_Job], ok: torch.Tensor | None = None) -> None:
        """Low-rank Adam on R and the back-projection into W (then online PCA's projector step), for each job. ``ok``
        (a device bool, ``step_unit(defer=True)``): where it is False the moments and W are left as they were, with
        the same arithmetic as the unmasked step where it is True.

        A matrix whose update is whole on this rank goes through at once; the fallback matrices' updates (their N
        is a column slice, all-gathered for the back-projection) go out in one all-gather for all of them; with
        optim.fused the others step a stack at a time (fused_step.py)."""
        fused = {id(job): job for job in jobs if self._fused_key(job) is not None}
        self._update_fused(list(fused.values()), ok)
        grouped = []
        for job in jobs:
            if id(job) in fused:
                continue
            N = self._adam_step(job, ok)
            if self.comm_for(job.p).shards_projected_side:
                grouped.append((job, N))
            else:
                self._apply_update(job, N, job.R, ok)
                job.P = job.R = None  # one (gathered) projector whole at a time
        if grouped:
            fira = [job.group["residual"] != "none" for job, _ in grouped]  # Fira and APOLLO read the whole R
            steps = [self.comm_for(job.p).gather_long_steps(N) for job, N in grouped]
            steps += [self.comm_for(job.p).gather_long_steps(job.R) for (job, _), f in zip(grouped, fira) if f]
            gathered = iter(run_batched(steps))
            Ns = [next(gathered) for _ in grouped]
            for (job, _), N, f in zip(grouped, Ns, fira):
                self._apply_update(job, N, next(gathered) if f else None, ok)
                job.P = job.R = None

    def _adam_step(self, job: _Job, ok: torch.Tensor | None) -> torch.Tensor:
        """The moments' step on R and this rank's part of the update N = M / (sqrt(V) + eps)."""
        group, st, side = job.group, job.state, job.side
        G = _local(job.p.grad)
        R = job.R  # after a switch, in the new basis (_refresh)
        comm = self.comm_for(job.p)
        if job.P is None:  # given back after a check (see _prepare): gathered again
            job.P = self._use_projector(job.p, st)
        POLICIES[group["switch"]].observe(st, group, R, G, job.P, side, self._gen(G.device), comm)

        # Low-rank Adam (GaLore's code semantics: eps outside the sqrt, bias correction in the step size).
        beta1, beta2 = group["betas"]
        st["step"] += 1
        # the stored moments, or fp32 copies decoded from bf16 / int8 codes (stored back below)
        M, V = state_codes.load(st, state_dtype(job.p.dtype))
        if ok is None:
            M.mul_(beta1).add_(R, alpha=1.0 - beta1)
            V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        else:  # decays of 1 and a zero R leave the moments as they were where not ok
            # torch.full fills on the device (torch.tensor(beta, device=cuda) would be a blocking host copy)
            one = torch.ones((), dtype=M.dtype, device=M.device)
            R = torch.where(ok, R, torch.zeros((), dtype=R.dtype, device=R.device))
            M.mul_(torch.where(ok, torch.full_like(one, beta1), one)).add_(R, alpha=1.0 - beta1)
            V.mul_(torch.where(ok, torch.full_like(one, beta2), one)).addcmul_(R, R, value=1.0 - beta2)
        N = M / V.sqrt().add_(group["eps"])
        state_codes.store(st, [M, V], keep=None if ok is None else ~ok)  # a masked unit keeps its codes exactly
        return N

    @staticmethod
    def _step_size(group: dict, t: int) -> float:
        """lr with Adam's bias corrections (GaLore's code: in the step size, not in N)."""
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

    def _apply_update(self, job: _Job, N: torch.Tensor, R_whole: torch.Tensor | None,
                      ok: torch.Tensor | None) -> None:
        """W -= step * project_back(N) (plus Fira's residual from the whole R), or APOLLO's W -= step * √α * the
        scaled raw gradient (apollo.py), weight decay, online PCA's step; N and R cover this rank's whole piece of W."""
        group, st, side = job.group, job.state, job.side
        W, G = _local(job.p), _local(job.p.grad)
        online = group["solver"] == "online_pca" and not job.refreshed  # its first basis is an svd one
        comm = self.comm_for(job.p)
        P = job.P  # full projector; P_local multiplies this rank's piece of G
        P_local = comm.local_projector(P, side)
        lr, wd = group["lr"], group["weight_decay"]
        if ok is not None:
            N.mul_(ok.to(N.dtype))
        step_size = self._step_size(group, st["step"])
        if group["residual"] in APOLLO_RESIDUALS:  # APOLLO: the raw gradient scaled, instead of project_back(N)
            U = limit_growth(st, G * apollo_scaling(N, R_whole, side, group["residual"], comm), comm)
            W.add_(U, alpha=-step_size * math.sqrt(group["scale"]))
        else:
            if group["residual"] == "fira":
                W.add_(self._fira_residual(st, G, R_whole, N, P_local, side, comm), alpha=-step_size)
            add_project_back_(W, N, P_local, side, alpha=-step_size * group["scale"])
        if wd > 0.0:
            W.add_(W if ok is None else W * ok.to(W.dtype), alpha=-lr * wd)

        if job.switch and online:  # Online Subspace Descent: one AdamW step on P after the weight step
            self._online_pca_step(job, P, G)


__all__ = ["LowRankAdamW"]
