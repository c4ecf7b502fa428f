"""The basis solvers of docs/algorithms.md section 4 as solver generators (see ``solver_rounds``): the randomized
SVD by subspace iteration (Lotus), random (GoLore) and Gaussian (APOLLO) bases, the Grassmannian walk, online PCA,
and ``projector_steps``, which picks one by ``solver``; ``compute_projector`` / ``rsvd_columns`` run one alone.
Every product that sums over a sharded side goes through the matrix's ``Comm`` (subspace.py)."""

from __future__ import annotations

import math

import torch

from .apollo import gaussian_columns
from .linalg_batch import solve_dtype
from .solver_rounds import _drive, linalg_steps, orth_columns_steps, solver_dtype
from .subspace import IDENTITY, SOLVERS, Comm, columns, oriented, projected_dim, to_projector


def _fix_signs(E: torch.Tensor) -> torch.Tensor:
    """Each column's largest-|entry| made positive: eigh's sign choice is arbitrary, the basis must not be."""
    idx = E.abs().argmax(dim=0, keepdim=True)
    sign = torch.where(torch.gather(E, 0, idx) < 0, -1.0, 1.0).to(E.dtype)
    return E * sign


def rsvd_steps(Gs: torch.Tensor, r: int, oversample: int, power_iters: int, gen: torch.Generator,
               comm: Comm = IDENTITY):
    """Top-r left singular subspace of Gs (d x l) by subspace iteration in sketch form (section 7); a solver
    generator (see ``run_batched``; ``rsvd_columns`` runs it alone).

    Every product that sums over the long side l goes through ``comm.sum_long``, over the projected side d
    through ``comm.sum_short``; the d x k orthonormalisations go through ``comm.orth_steps`` (local Householder
    unless d is sharded). The half-step Gsᵀ Q lives on the long side and is not orthonormalised: Q is, after
    every full step. The final small SVD comes from the k x k Gram of Qᵀ Gs, diagonalised in ``linalg_dtype``
    (float64 on the CPU), with deterministic eigenvector signs.
    """
    Gs = Gs.to(solver_dtype(Gs))
    d, l = Gs.shape
    k = min(r + oversample, comm.short_size(d))
    omega = comm.sketch(gen, l, k, Gs.device).to(Gs.dtype)  # drawn in fp32 whatever the dtype: same draws
    Q = yield from comm.orth_steps((yield from comm.sum_long(Gs @ omega)))
    for _ in range(power_iters):
        half = yield from comm.sum_short(Gs.T @ Q)
        Q = yield from comm.orth_steps((yield from comm.sum_long(Gs @ half)))
    Z = yield from comm.sum_short(Gs.T @ Q)  # = (Qᵀ Gs)ᵀ, l x k
    gram = yield from comm.sum_long(Z.T @ Z)
    evals, evecs = yield from linalg_steps("eigh", gram.to(solve_dtype(gram)))
    top = torch.argsort(evals, descending=True)[:r]
    return (yield from comm.gather_short_steps(Q @ _fix_signs(evecs[:, top]).to(Q.dtype)))


def rsvd_columns(
    Gs: torch.Tensor, r: int, oversample: int, power_iters: int, gen: torch.Generator, comm: Comm = IDENTITY
) -> torch.Tensor:
    """``rsvd_steps`` for one matrix alone."""
    return _drive(rsvd_steps(Gs, r, oversample, power_iters, gen, comm))


def random_columns_steps(d: int, r: int, gen: torch.Generator, device):
    """Uniformly random orthonormal basis (GoLore): Q of a Gaussian d x r; a solver generator."""
    Z = torch.randn(d, r, generator=gen, device=device, dtype=torch.float32)
    return (yield from orth_columns_steps(Z))


def random_columns(d: int, r: int, gen: torch.Generator, device) -> torch.Tensor:
    return _drive(random_columns_steps(d, r, gen, device))


def grasswalk_steps(S: torch.Tensor, eta: float, gen: torch.Generator, rounded: bool = False):
    """One geodesic step of length eta on the Grassmannian from span(S) in a random tangent direction; a solver
    generator. ``rounded``: S was stored in bf16 (optim.projector_dtype), so it is orthonormalised first (the Q of
    its QR, ≈ S): without that each walk would start from the last one's rounding and the drift from orthonormal
    would grow with the number of refreshes, not stay one rounding."""
    S = S.float()
    if rounded:
        S = yield from orth_columns_steps(S)
    Z = torch.randn(S.shape, generator=gen, device=S.device, dtype=torch.float32)
    H = Z - S @ (S.T @ Z)
    H = H / H.norm()
    U_h, sig, Vh_h = yield from linalg_steps("svd", H)
    V_h = Vh_h.T
    new = (S @ V_h) * torch.cos(eta * sig) @ Vh_h + (U_h * torch.sin(eta * sig)) @ Vh_h
    return new + S - (S @ V_h) @ Vh_h  # S (I - V_h V_hᵀ): zero for a full-rank H, kept for rank-deficient H


def grasswalk_columns(S: torch.Tensor, eta: float, gen: torch.Generator, rounded: bool = False) -> torch.Tensor:
    return _drive(grasswalk_steps(S, eta, gen, rounded))


def online_pca_grad(S: torch.Tensor, Gs: torch.Tensor, comm: Comm = IDENTITY) -> torch.Tensor:
    """Gradient in S of ‖S Sᵀ g - g‖²_F, g = Gs/‖Gs‖: 2 (E gᵀ S + g Eᵀ S) with E = S (Sᵀ g) - g; no d x d matrix."""
    g = Gs.float()
    g = g / comm.reduce(g.square().sum()).sqrt().clamp_min(1e-30)
    E = S @ (S.T @ g) - g
    return 2.0 * comm.reduce(E @ (g.T @ S) + g @ (E.T @ S))


def online_pca_update_(P: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, G: torch.Tensor, side: str,
                       step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.01,
                       comm: Comm = IDENTITY) -> None:
    """One AdamW step (torch.optim.AdamW semantics) on the projector P, in place; never re-orthonormalised."""
    S = columns(P, side)
    grad = online_pca_grad(S.float(), oriented(G, side), comm).to(P.dtype)
    grad = grad if side == "left" else grad.T
    beta1, beta2 = betas
    P.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    P.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)


def projector_steps(solver: str, G: torch.Tensor, side: str, r: int, *, gen: torch.Generator,
                    prev: torch.Tensor | None = None, oversample: int = 8, power_iters: int = 2,
                    geodesic_step: float = 0.1, prev_rounded: bool = False, comm: Comm = IDENTITY):
    """A new projector (stored layout, ``solver_dtype(G)``: fp32 at least) from the current gradient G and the
    previous projector (``prev_rounded``: it was stored in bf16, see ``grasswalk_steps``); a solver generator
    (``run_batched`` runs many together, ``compute_projector`` one alone).

    online_pca's first basis is the svd one (its later updates are ``online_pca_update_``); grasswalk starts from
    a random basis and then walks.
    """
    d = comm.short_size(projected_dim(tuple(G.shape), side))
    if solver in ("svd", "online_pca"):
        P = yield from comm.svd_steps(G, side, r)
    elif solver == "rsvd":
        P = to_projector((yield from rsvd_steps(oriented(G, side), r, oversample, power_iters, gen, comm)), side)
    elif solver == "random" or (solver == "grasswalk" and prev is None):
        P = to_projector((yield from random_columns_steps(d, r, gen, G.device)), side)
    elif solver == "gaussian":
        P = to_projector(gaussian_columns(d, r, gen, G.device), side)
    elif solver == "grasswalk":
        P = to_projector((yield from grasswalk_steps(columns(prev, side), geodesic_step, gen, prev_rounded)), side)
    else:
        raise ValueError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    return P.to(solver_dtype(G))  # a bf16 gradient's basis is kept in fp32 (tensors.state_dtype)


def compute_projector(solver: str, G: torch.Tensor, side: str, r: int, **kwargs) -> torch.Tensor:
    """``projector_steps`` for one matrix alone."""
    return _drive(projector_steps(solver, G, side, r, **kwargs))


__all__ = ["rsvd_steps", "rsvd_columns", "random_columns", "random_columns_steps", "grasswalk_columns",
           "grasswalk_steps", "online_pca_grad", "online_pca_update_", "projector_steps", "compute_projector"]
