"""The two parts that act beside the low-rank Adam step: Fira's residual (docs/algorithms.md section 7) and online
PCA's projector step (Online Subspace Descent, section 4)."""

from __future__ import annotations

import torch

from .apollo import channel_scaling
from .job import _Job
from .basis_solvers import online_pca_update_
from .subspace import Comm, project_back
from .switching import POLICIES

FIRA_LIMIT = 1.01  # ζ, Fira's norm-growth limiter
ONLINE_PCA_WD = 0.01


class FiraAndOnlinePCA:
    """``LowRankAdamW``'s Fira residual and online PCA step (a mixin of it): uses its ``comm_for``, ``_timer``,
    ``_project`` and ``_apply_moment_policy``."""

    def _online_pca_step(self, job: _Job, P: torch.Tensor, G: torch.Tensor) -> None:
        """Online Subspace Descent: one AdamW step on the full projector P after the weight step."""
        group, st, side = job.group, job.state, job.side
        lr, eps = group["lr"], group["eps"]
        comm = self.comm_for(job.p)
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
            POLICIES[group["switch"]].on_switch(st, group, self._project(job.p, G, P, side))

    @staticmethod
    def _fira_residual(st, G, R, N, P, side, comm: Comm) -> torch.Tensor:
        """Λ = φ ⊙ (G − project_back(R)), φ per long-side index = ‖N‖/‖R‖ over the r dim, growth-limited."""
        return limit_growth(st, (G - project_back(R, P, side)) * channel_scaling(N, R, side), comm)


def limit_growth(st: dict | list[dict], U: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Fira's norm-growth limiter (also APOLLO's): U scaled down so that ‖U‖ grows by at most ζ = 1.01 a step over
    the last limited norm (``fira_norm``, kept across refreshes; the first step sets it); ‖U‖ summed across ranks,
    in fp32 at least (an fp64 U in fp64: fp32 partial sums would differ from one process's sum by ~1e-7).
    ``st`` a list of k states: U is their stack (k x m x n, optim/fused_step.py), each limited by its own norm."""
    many = isinstance(st, list)
    states = st if many else [st]
    norm = comm.reduce(U.to(torch.promote_types(U.dtype, torch.float32)).square().sum(dim=(-2, -1))).sqrt()
    if states[0]["fira_ready"]:  # alike in a stack (fused_step.py groups by it)
        last = torch.stack([s["fira_norm"] for s in states]) if many else st["fira_norm"]
        limiter = torch.clamp(norm / (last + 1e-8), min=FIRA_LIMIT) / FIRA_LIMIT
        U = U / (limiter[:, None, None] if many else limiter).to(U.dtype)
        norm = norm / limiter
    for s in states:
        s["fira_ready"] = 1
    norms = [s["fira_norm"] for s in states]
    torch._foreach_copy_(norms, list(norm.reshape(-1).to(norms[0].dtype).unbind(0)))
    return U
