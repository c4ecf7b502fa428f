"""VLoRP / ProjFactor (docs/algorithms.md section 8): a random projection of a reshaped gradient for the first moment
and Adafactor-style factored second moments of the back-projected gradient.

The Gaussian projector P̃ ((n/c) x r, entries N(0, 1/r)) is never stored: it is regenerated each step from
(seed, matrix index, draw count), the draw count advancing every ``update_gap`` steps. State per matrix:
``step``, ``index``, ``n_bases`` (draws so far), ``exp_avg`` ((m·c) x r), ``v_row`` (m·c), ``v_col`` (n/c).
Groups without ``rank`` are plain AdamW, as in LowRankAdamW.
"""

from __future__ import annotations

import math

import torch

from . import state_codes
from .lowrank import LowRankAdamW
from .subspace import derive_seed, seeded
from .tensors import state_dtype

SALT_PROJFACTOR = 0x5046


class ProjFactor(LowRankAdamW):
    @staticmethod
    def _extra_defaults() -> dict:
        return {"granularity": 1}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        rounded = param_group.get("projector_dtype")
        if param_group.get("rank") is not None and rounded in ("bf16", "int8"):
            raise ValueError(f"projector_dtype={rounded} does not apply to projfactor: it stores no projector (its "
                             f"Gaussian one is regenerated every step); use projector_dtype=fp32")
        c = param_group.get("granularity")
        if param_group.get("rank") is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise ValueError(f"granularity: expected a positive integer, got {c!r}")

    @staticmethod
    def _dims(p: torch.Tensor, group: dict) -> tuple[int, int, int]:
        """(rows m·c, cols n/c, rank) of the reshaped gradient."""
        if p.dim() != 2:
            raise ValueError(f"a projected parameter must be 2-D, got shape {tuple(p.shape)}")
        m, n = p.shape
        c = group["granularity"]
        if n % c:
            raise ValueError(f"granularity: {c} does not divide the input dimension {n} of a {m}x{n} matrix")
        return m * c, n // c, min(group["rank"], n // c)

    def _init_lowrank_state(self, p: torch.Tensor, group: dict) -> dict:
        rows, cols, r = self._dims(p, group)
        st = self.state[p]
        st["step"] = 0
        st["index"] = self._index_of(p)
        st["n_bases"] = 0
        dtype = state_dtype(p.dtype)  # fp32 at least, as every optimizer state
        # exp_avg in optim.state_dtype (int8: one scale per row); the factored v_row / v_col stay in dtype
        state_codes.allocate(st, state_codes.group_format(group), (rows, r), lambda dt, scale: torch.zeros(
            rows, 1 if scale else r, dtype=dt, device=p.device), dtype, keys=("exp_avg",))
        st["v_row"] = torch.zeros(rows, dtype=dtype, device=p.device)
        st["v_col"] = torch.zeros(cols, dtype=dtype, device=p.device)
        return st

    @staticmethod
    def _geometry(p, group):
        return "right", 0  # unused: ProjFactor has its own geometry (_dims)

    def _prepare(self, jobs, projected=None, settle=False):
        if projected:
            raise ValueError("ProjFactor accumulates full gradients: it has no fixed basis to accumulate R in")
        return []  # no switch statistics: the random projector is redrawn on a schedule

    def _apply(self, jobs, stats) -> None:
        for job in jobs:
            self._projfactor_update(job.group, job.p, job.state)

    def accumulates_projected(self, p) -> bool:
        return False

    def _deferrable(self, plain, jobs) -> bool:
        return False  # its update is its own (_projfactor_update), without a device mask

    def _projfactor_update(self, group: dict, p: torch.Tensor, st: dict) -> None:
        rows, cols, r = self._dims(p, group)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if st["step"] % group["update_gap"] == 0:
            st["n_bases"] += 1
        gen = seeded(self._gen(p.device), derive_seed(group["seed"], st["index"], st["n_bases"], SALT_PROJFACTOR))
        with self._timer:
            Pt = torch.randn(cols, r, generator=gen, device=p.device, dtype=torch.float32).div_(math.sqrt(r))
        Pt = Pt.to(state_dtype(p.dtype))
        st["step"] += 1
        t = st["step"]
        Gr = p.grad.reshape(rows, cols).to(Pt.dtype)
        Gt = Gr @ Pt  # (m·c) x r
        (M,) = state_codes.load(st, state_dtype(p.dtype), keys=("exp_avg",))
        M.mul_(beta1).add_(Gt, alpha=1 - beta1)
        state_codes.store(st, [M], keys=("exp_avg",))
        G_hat_sq = (Gt @ Pt.T).square_()
        st["v_row"].mul_(beta2).add_(G_hat_sq.sum(dim=1), alpha=1 - beta2)
        st["v_col"].mul_(beta2).add_(G_hat_sq.sum(dim=0), alpha=1 - beta2)
        del G_hat_sq
        v_hat = torch.outer(st["v_row"], st["v_col"]).div_(st["v_row"].sum().clamp_min(1e-30))
        delta = (M @ Pt.T).div_(v_hat.add_(eps).sqrt_())
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p.add_(delta.reshape(p.shape), alpha=-step_size)
        if wd > 0.0:
            p.add_(p, alpha=-lr * wd)


__all__ = ["ProjFactor"]
