"""APOLLO's parts (docs/algorithms.md section 9; arXiv 2412.05270, reference code apollo-torch 1.0.3): the Gaussian
random projection and the gradient scaling factor read from the low-rank Adam step. The update they make,
W -= step_size·√α·limit(G ⊙ φ), is ``LowRankAdamW._apply_update``'s (the limiter is Fira's, fira_online_pca.py).

Imports nothing from the package: ``subspace`` imports the projection from here."""

from __future__ import annotations

import math

import torch

APOLLO_RESIDUALS = {"apollo_channel": "channel", "apollo_tensor": "tensor"}  # residual -> apollo-torch's scale_type
EPS = 1e-8  # apollo-torch's guard in ‖N‖ / (‖R‖ + eps)


def gaussian_columns(d: int, r: int, gen: torch.Generator, device) -> torch.Tensor:
    """APOLLO's projection: d x r entries N(0, 1/r), not orthonormalised (its scaling reads the projection's norm,
    so an orthonormal basis would change the update's size). Drawn in fp32 whatever the dtype: the same draws."""
    return torch.randn(d, r, generator=gen, device=device, dtype=torch.float32) / math.sqrt(r)


def channel_scaling(N: torch.Tensor, R: torch.Tensor, side: str) -> torch.Tensor:
    """‖N‖/(‖R‖ + 1e-8) per long-side channel, norms over the r dim (local under long-side sharding): APOLLO's
    channel-wise φ, and Fira's φ of the residual (fira_online_pca.py)."""
    dim = -2 if side == "left" else -1  # from the end: a stack of matrices too (optim/fused_step.py)
    return N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + EPS)


def apollo_scaling(N: torch.Tensor, R: torch.Tensor, side: str, residual: str, comm) -> torch.Tensor:
    """φ, the factor of the raw gradient G: ‖N‖/(‖R‖ + 1e-8) per long-side channel (norms over the r dim,
    ``apollo_channel``; local under long-side sharding) or over the whole tensor (``apollo_tensor``). N and R cover
    this rank's piece of the long side, or all of it where the projected side is sharded (the fallback gathers
    them): only the former sums its partial norms across ranks. N and R may be stacks (k x ...: optim/fused_step.py):
    then φ is one per matrix."""
    if APOLLO_RESIDUALS[residual] == "channel":
        return channel_scaling(N, R, side)
    sq = torch.stack([N.square().sum(dim=(-2, -1)), R.square().sum(dim=(-2, -1))])
    if not comm.shards_projected_side:
        sq = comm.reduce(sq)
    n, r = sq.sqrt().unbind()
    return (n / (r + EPS))[..., None, None]


__all__ = ["APOLLO_RESIDUALS", "apollo_scaling", "channel_scaling", "gaussian_columns"]
