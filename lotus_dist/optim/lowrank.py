"""LowRankAdamW: the low-rank gradient-projection AdamW of docs/algorithms.md section 3, with the parts of sections 3-5.

A param group with a ``rank`` key is projected (one combination of solver, switch policy, moment policy and
residual, see ``LOWRANK_DEFAULTS``); every other group is plain AdamW with ``torch.optim.AdamW`` semantics.

State per projected matrix (tensors and ints only, so ``torch.load(weights_only=True)`` and DCP work):
``step``, ``index`` (matrix index, seeds the random draws), ``n_bases`` (bases computed so far; 0 = no projector
yet), ``exp_avg``/``exp_avg_sq`` (R-shaped: r x n for a left projector, m x r for a right one, i.e. the weight's
long side), ``projector`` (A m x r or B r x n), plus per part: ``tau``/``d_init`` (displacement), ``pe_*``
(path_efficiency), ``fira_norm``/``fira_ready`` (Fira), ``pca_*`` (online_pca). The state is allocated in full at
the first step that sees a gradient, even a zero one, so DCP's zero-gradient initialising step builds the complete
structure; the projector is only computed from the first non-zero gradient.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from lotus_dist.counters import to_host

from .subspace import (
    IDENTITY,
    PROJ_TYPES,
    SOLVERS,
    Comm,
    Timer,
    add_project_back_,
    columns,
    compute_projector,
    derive_seed,
    lowrank_shape,
    online_pca_update_,
    project,
    projector_steps,
    run_batched,
    project_back,
    projected_dim,
    projector_shape,
    side_for,
)
from .refresh_batches import cut_batches, workspace_bytes
from .switching import CHECK, POLICIES, STATS_WIDTH, STAY, SWITCH

# The Lotus method (docs/algorithms.md section 8); gamma None = the switch policy's own default.
LOWRANK_DEFAULTS: dict[str, Any] = dict(
    scale=0.25,
    proj_type="std",
    solver="rsvd",
    switch="displacement",
    update_gap=200,
    gamma=None,
    verify_gap=50,
    t_min=50,
    window=50,
    moments="keep",
    residual="none",
    oversample=8,
    power_iters=2,
    geodesic_step=0.1,
    reference_dtype="bf16",  # the displacement policy's d_init: bf16 (half the bytes) or fp32 (exact)
    seed=0,
)
MOMENT_POLICIES = ("keep", "reset", "rotate", "rotate_subtrack")
RESIDUALS = ("none", "fira")
REFERENCE_DTYPES = ("bf16", "fp32")
CHOICES: dict[str, tuple[str, ...]] = {
    "proj_type": PROJ_TYPES,
    "solver": SOLVERS,
    "switch": tuple(POLICIES),
    "moments": MOMENT_POLICIES,
    "residual": RESIDUALS,
    "reference_dtype": REFERENCE_DTYPES,
}
_POSITIVE_INT = ("rank", "update_gap", "verify_gap", "t_min", "window")
_NONNEG_INT = ("oversample", "power_iters", "seed")
_POSITIVE_FLOAT = ("gamma", "geodesic_step")
FIRA_LIMIT = 1.01  # ζ, Fira's norm-growth limiter
REFRESH_BATCH_BYTES = 256 << 20  # solver workspace of the matrices one batched refresh solves (optim.refresh_batch_mb)
ONLINE_PCA_WD = 0.01
SALT_BASIS = 0x42

_FUSED_ADAMW = hasattr(torch, "_fused_adamw_")

# memory_report's classes of state tensors
MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq", "v_row", "v_col"})
PROJECTOR_KEYS = frozenset({"projector"})
FP32_KEYS = frozenset({"pe_acc", "pe_sketch", "fira_norm"})  # statistics kept in fp32 whatever the param dtype
OWN_DTYPE_KEYS = frozenset({"d_init"})  # kept in the dtype they were saved in (optim.reference_dtype)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Moments, projectors and statistics are fp32 at least whatever the parameter dtype (bf16 ones stall: V moves by
    (1 - β2) = 1e-3 of itself a step, below bf16's 2^-8; bf16 projectors drift from orthonormal); fp64 stays fp64."""
    return torch.promote_types(param_dtype, torch.float32)


def reference_dtype(name: str, param_dtype: torch.dtype) -> torch.dtype:
    """The switch reference's dtype: bf16, or ``fp32`` = the exact form (the state dtype)."""
    return torch.bfloat16 if name == "bf16" else state_dtype(param_dtype)


def _fused(p: torch.Tensor) -> bool:
    """Whether ``p`` takes torch's fused AdamW kernel: a plain tensor on CPU/CUDA whose states share its dtype (the
    kernel takes one dtype: a bf16 parameter with fp32 states takes the op-by-op form, computed in fp32)."""
    return (_FUSED_ADAMW and type(_local(p)) in (torch.Tensor, torch.nn.Parameter)
            and p.device.type in ("cpu", "cuda") and state_dtype(p.dtype) == p.dtype)


def check_options(opts: dict, prefix: str = "") -> None:
    """Raise ValueError naming ``prefix + key`` for a bad low-rank option."""
    for key, allowed in CHOICES.items():
        if key in opts and opts[key] not in allowed:
            raise ValueError(f"{prefix}{key}: {opts[key]!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE_INT + _NONNEG_INT:
        v = opts.get(key)
        if v is None and key != "rank":
            continue
        if key in opts and (not isinstance(v, int) or isinstance(v, bool) or v < (1 if key in _POSITIVE_INT else 0)):
            kind = "a positive" if key in _POSITIVE_INT else "a non-negative"
            raise ValueError(f"{prefix}{key}: expected {kind} integer, got {v!r}")
    for key in _POSITIVE_FLOAT + ("scale",):
        v = opts.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{prefix}{key}: expected a positive number, got {v!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view), else t: the projected math runs on local tensors, so a weight sharded
    along its long side keeps R, the moments and the back-projection local (docs/algorithms.md section 11)."""
    to_local = getattr(t, "to_local", None)  # duck-typed: optim never imports torch.distributed
    return to_local() if callable(to_local) else t


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² in fp32 without a t-sized temporary (``t.float().square()`` would allocate one: a per-layer step
    would then hold two lm_head-sized buffers at its peak)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dtype=torch.float32).square()
    return torch.linalg.vector_norm(t).float().square()  # fp32 as is; fp64 (tests) in fp64


class _Job:
    """Transient per-step work item of one projected matrix (never stored in the state)."""

    __slots__ = ("group", "p", "state", "side", "r", "R", "P", "action", "row", "switch", "done", "refreshed")

    def __init__(self, group, p, state, side, r):
        self.group, self.p, self.state, self.side, self.r = group, p, state, side, r
        self.R = None
        self.P = None  # the full projector while in use (all-gathered when stored sharded), dropped after
        self.action = None
        self.row = -1
        self.switch = False
        self.done = False  # updated already in _prepare (nothing to decide)
        self.refreshed = False  # its new basis was solved this step (_refresh)


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


class LowRankAdamW(Optimizer):
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

    def _init_adamw_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)
        return st

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
        st["exp_avg"] = torch.zeros(lowrank_shape(piece, side, r), dtype=dtype, device=device)
        st["exp_avg_sq"] = torch.zeros(lowrank_shape(piece, side, r), dtype=dtype, device=device)
        # the projector follows the global matrix (p.shape is global for a DTensor); the Comm decides what part
        # of it this rank stores (all of it, or a 1/W slice)
        stored = self.comm_for(p).projector_storage(projector_shape(tuple(p.shape), side, r))
        st["projector"] = torch.zeros(stored, dtype=dtype, device=device)
        short = self.comm_for(p).short_size(projected_dim(shape, side))
        POLICIES[group["switch"]].allocate(st, piece, side, r, dtype, device, short=short,
                                           reference_dtype=reference_dtype(group["reference_dtype"], p.dtype))
        if group["residual"] == "fira":
            st["fira_norm"] = torch.zeros((), dtype=torch.float32, device=device)
            st["fira_ready"] = 0
        if group["solver"] == "online_pca":
            st["pca_exp_avg"] = torch.zeros_like(st["projector"])
            st["pca_exp_avg_sq"] = torch.zeros_like(st["projector"])
            st["pca_step"] = 0
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that the states keep the dtype ``state_dtype`` gives them (fp32 statistics, the
        switch reference its own): torch casts every floating state tensor to the parameter's, which would make a
        bf16-parameter resume keep bf16 moments and projectors, and a bf16 reference grow back to fp32."""
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
            extra = {k: v for k, v in st.items() if k in FP32_KEYS | OWN_DTYPE_KEYS or (
                promoted and k != "step" and torch.is_tensor(v) and v.is_floating_point())} if p is not None else {}
            if extra:
                kept[key] = extra
                state[key] = {k: v for k, v in st.items() if k not in extra}
        super().load_state_dict({**state_dict, "state": state})
        self._groups = None  # torch's load puts new group dicts in place
        for key, extra in kept.items():
            p = params[key]
            for k, v in extra.items():
                dtype = torch.float32 if k in FP32_KEYS else v.dtype if k in OWN_DTYPE_KEYS else state_dtype(p.dtype)
                self.state[p][k] = v.to(device=p.device, dtype=dtype)

    def _projected_ids(self) -> set[int]:
        return {id(p) for group in self.param_groups if group.get("rank") is not None for p in group["params"]}

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state as its first step would, without stepping (works on ``meta``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    if group.get("rank") is None:
                        self._init_adamw_state(p)
                    else:
                        self._init_lowrank_state(p, group)

    # ------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plain, jobs = self._collect(None)
        for group, params in plain:
            self._adamw_group(group, params)
        if jobs:
            rows = self._prepare(jobs, settle=True)
            stats = to_host(self.stats_comm.reduce_stats(torch.stack(rows).float())) if rows else []
            self._apply(jobs, stats)
        return loss

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
        if not all(_fused(p) for _, ps in plain for p in ps):
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
        states = [self.state[p] or self._init_adamw_state(p) for _, ps in plain for p in ps]
        counters = [(st, st["step"], st.get("tau")) for st in states + [job.state for job in jobs]]
        for group, ps in plain:
            self._adamw_group(group, ps, found_inf=(~ok).float())
        for job in jobs:
            self._decide(job, None)
        self._update_all(jobs, ok=ok)
        for job in jobs:
            job.P = job.R = None
        return UnitStep(norm_sq, ok, finite, counters, local)

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

    # ------------------------------------------------------------------------------ optimizer-in-backward support

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
        return self._project(p, _local(p.grad), self.comm_for(p).use_projector(st["projector"]), side)

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

    def _adamw_group(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None = None) -> None:
        """torch.optim.AdamW semantics: decoupled decay first, bias-corrected denominator.

        Uses torch's fused AdamW kernel (one pass over memory, ~8x faster than the op-by-op form on CPU) for
        tensors of one device/dtype/step, DTensors through their local shards; anything else takes the op-by-op
        loop. ``found_inf`` (a device scalar, only with the fused kernel) skips the update where it is non-zero.
        """
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        buckets: dict[tuple, list[torch.Tensor]] = {}
        loop = []
        for p in params:
            st = self.state[p] or self._init_adamw_state(p)
            st["step"] += 1
            if _fused(p):
                buckets.setdefault((p.device, p.dtype, st["step"]), []).append(p)
            else:
                loop.append(p)
        for (device, _, t), ps in buckets.items():
            step_t = torch.full((), float(t), dtype=torch.float32, device=device)  # read-only in the kernel
            # DTensors (FSDP2 shards) step on their local shards: elementwise, so no communication
            torch._fused_adamw_(
                [_local(p) for p in ps],
                [_local(p.grad) for p in ps],
                [_local(self.state[p]["exp_avg"]) for p in ps],
                [_local(self.state[p]["exp_avg_sq"]) for p in ps],
                [],
                [step_t] * len(ps),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
                **({} if found_inf is None else {"found_inf": found_inf.to(device)}),
            )
        if loop and found_inf is not None:
            raise RuntimeError("found_inf needs the fused AdamW kernel for every parameter (see _deferrable)")
        for p in loop:
            st = self.state[p]
            t, M = st["step"], st["exp_avg"]
            g = p.grad.to(M.dtype)
            W = p.to(M.dtype)  # a bf16 weight: its update computed in fp32 and rounded once (copied back below)
            W.mul_(1 - lr * wd)
            M.lerp_(g, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1 = 1 - beta1**t
            bc2_sqrt = math.sqrt(1 - beta2**t)
            denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(eps)
            W.addcdiv_(M, denom, value=-lr / bc1)
            if W is not p:
                p.copy_(W)

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
            comm = self.comm_for(job.p)
            job.P = comm.use_projector(st["projector"])
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
            if settle and self.comm_for(job.p).gathers_projector:
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
                        job.P = comm.use_projector(st["projector"])  # the old basis is needed: prev / rotation
                    seed = derive_seed(group["seed"], st["index"], st["n_bases"], SALT_BASIS)
                    gens.append(torch.Generator(device=job.p.device).manual_seed(seed))
                    solvers.append(projector_steps(
                        group["solver"], _local(job.p.grad), job.side, job.r, gen=gens[-1],
                        prev=None if first else job.P, oversample=group["oversample"],
                        power_iters=group["power_iters"], geodesic_step=group["geodesic_step"], comm=comm))
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
            job.P = comm.store_projector(st["projector"], new)
            st["n_bases"] += 1
            job.refreshed = True
        elif job.P is None:
            job.P = comm.use_projector(st["projector"])

    @staticmethod
    def _apply_moment_policy(group, st, old, new, side) -> None:
        """Moments at a switch (docs/algorithms.md section 6), C mapping old coordinates to new ones: keep, reset, rotate
        (LDAdam: the bias-corrected second moment of the gradient in the new coordinates) or rotate_subtrack
        (SubTrack++'s code, with its extra (1 - beta2) factor, for comparison)."""
        mode = group["moments"]
        if mode == "keep":
            return
        M, V = st["exp_avg"], st["exp_avg_sq"]
        if mode == "reset":
            M.zero_()
            V.zero_()
            return
        beta1, beta2 = group["betas"]
        S_old, S_new = columns(old, side).float(), columns(new, side).float()
        Mf, Vf = M.float(), V.float()
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
        M.copy_(CM)
        V.copy_(V_new)

    def _update(self, job: _Job, ok: torch.Tensor | None = None) -> None:
        self._update_all([job], ok)

    def _update_all(self, jobs: list[_Job], ok: torch.Tensor | None = None) -> None:
        """Low-rank Adam on R and the back-projection into W (then online PCA's projector step), for each job. ``ok``
        (a device bool, ``step_unit(defer=True)``): where it is False the moments and W are left as they were, with
        the same arithmetic as the unmasked step where it is True.

        A matrix whose update is whole on this rank goes through at once; the fallback matrices' updates (their N
        is a column slice, all-gathered for the back-projection) go out in one all-gather for all of them."""
        grouped = []
        for job in jobs:
            N = self._adam_step(job, ok)
            if self.comm_for(job.p).shards_projected_side:
                grouped.append((job, N))
            else:
                self._apply_update(job, N, job.R, ok)
                job.P = job.R = None  # one (gathered) projector whole at a time
        if grouped:
            fira = [job.group["residual"] == "fira" for job, _ in grouped]
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
            job.P = comm.use_projector(st["projector"])
        POLICIES[group["switch"]].observe(st, group, R, G, job.P, side, self._gen(G.device), comm)

        # Low-rank Adam (GaLore's code semantics: eps outside the sqrt, bias correction in the step size).
        beta1, beta2 = group["betas"]
        st["step"] += 1
        M, V = st["exp_avg"], st["exp_avg_sq"]
        if ok is None:
            M.mul_(beta1).add_(R, alpha=1.0 - beta1)
            V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        else:  # decays of 1 and a zero R leave the moments as they were where not ok
            # torch.full fills on the device (torch.tensor(beta, device=cuda) would be a blocking host copy)
            one = torch.ones((), dtype=M.dtype, device=M.device)
            R = torch.where(ok, R, torch.zeros((), dtype=R.dtype, device=R.device))
            M.mul_(torch.where(ok, torch.full_like(one, beta1), one)).add_(R, alpha=1.0 - beta1)
            V.mul_(torch.where(ok, torch.full_like(one, beta2), one)).addcmul_(R, R, value=1.0 - beta2)
        return M / V.sqrt().add_(group["eps"])

    def _apply_update(self, job: _Job, N: torch.Tensor, R_whole: torch.Tensor | None,
                      ok: torch.Tensor | None) -> None:
        """W -= step * project_back(N) (plus Fira's residual from the whole R), weight decay, online PCA's step; N
        and R cover this rank's whole piece of W."""
        group, st, side = job.group, job.state, job.side
        W, G = _local(job.p), _local(job.p.grad)
        policy = POLICIES[group["switch"]]
        online = group["solver"] == "online_pca" and not job.refreshed  # its first basis is an svd one
        comm = self.comm_for(job.p)
        P = job.P  # full projector; P_local multiplies this rank's piece of G
        P_local = comm.local_projector(P, side)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = st["step"]
        if ok is not None:
            N.mul_(ok.to(N.dtype))
        step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        if group["residual"] == "fira":
            W.add_(self._fira_residual(st, G, R_whole, N, P_local, side, comm), alpha=-step_size)
        add_project_back_(W, N, P_local, side, alpha=-step_size * group["scale"])
        if wd > 0.0:
            W.add_(W if ok is None else W * ok.to(W.dtype), alpha=-lr * wd)

        if job.switch and online:  # Online Subspace Descent: one AdamW step on P after the weight step
            st["pca_step"] += 1
            old = P.clone() if group["moments"] != "keep" else None
            with self._timer:
                online_pca_update_(
                    P,
                    st["pca_exp_avg"],
                    st["pca_exp_avg_sq"],
                    G,
                    side,
                    st["pca_step"],
                    lr=lr / group["initial_lr"] / group["update_gap"] if group["initial_lr"] > 0 else 0.0,
                    betas=group["betas"],
                    eps=eps,
                    weight_decay=ONLINE_PCA_WD,
                    comm=comm,
                )
            if old is not None:
                self._apply_moment_policy(group, st, old, P, side)
            st["n_bases"] += 1
            if group["switch"] in ("displacement", "path_efficiency"):  # their reference point is the new basis
                policy.on_switch(st, group, self._project(job.p, G, P, side))

    @staticmethod
    def _fira_residual(st, G, R, N, P, side, comm: Comm) -> torch.Tensor:
        """Λ = φ ⊙ (G − project_back(R)), φ per long-side index = ‖N‖/‖R‖ over the r dim, growth-limited."""
        dim = 0 if side == "left" else 1
        phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
        lam = (G - project_back(R, P, side)) * phi
        norm = comm.reduce(lam.float().square().sum()).sqrt()
        if st["fira_ready"]:
            limiter = torch.clamp(norm / (st["fira_norm"] + 1e-8), min=FIRA_LIMIT) / FIRA_LIMIT
            lam = lam / limiter.to(lam.dtype)
            st["fira_norm"].copy_(norm / limiter)
        else:
            st["fira_norm"].copy_(norm)
            st["fira_ready"] = 1
        return lam


# ------------------------------------------------------------------------------------------------- reports


def memory_report(optimizer: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by this process: moments, projectors, other tensors, total."""
    out = {"moments": 0, "projectors": 0, "other": 0}
    for st in optimizer.state.values():
        for key, value in st.items():
            if not isinstance(value, torch.Tensor):
                continue
            t = _local(value)
            nbytes = t.numel() * t.element_size()
            cls = "moments" if key in MOMENT_KEYS else "projectors" if key in PROJECTOR_KEYS else "other"
            out[cls] += nbytes
    out["total"] = out["moments"] + out["projectors"] + out["other"]
    return out


def switch_report(optimizer: Optimizer) -> dict[str, int]:
    """Subspace switches (bases computed after the first) per projected matrix, keyed by a stable name."""
    refresh = getattr(optimizer, "refresh_report", None)  # an owner-sharded optimizer syncs its mirrors first
    if callable(refresh):
        refresh()
    names = getattr(optimizer, "param_names", {})
    out: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("rank") is None:
            continue
        for pi, p in enumerate(group["params"]):
            st = optimizer.state.get(p, {})
            out[names.get(id(p), f"group{gi}.param{pi}")] = max(int(st.get("n_bases", 0)) - 1, 0)
    return out


def solver_fallback_report(optimizer: Optimizer) -> int:
    """Basis solves that failed and fell back (kept the previous basis, or a random first one), in total."""
    return sum(int(st.get("solver_fallbacks", 0)) for st in optimizer.state.values())


__all__ = ["LowRankAdamW", "LOWRANK_DEFAULTS", "check_options", "memory_report", "switch_report",
           "solver_fallback_report"]
