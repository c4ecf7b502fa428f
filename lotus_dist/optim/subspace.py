"""Side rule, projection and the basis solvers of docs/algorithms.md sections 2 and 4.

A projector is stored in GaLore's layout: ``A`` (m x r, left) or ``B`` (r x n, right). Solvers work on the
"oriented" view ``Gs`` (d x l) whose rows are the projected (usually short) side: ``Gs = G`` for left, ``G.T`` for
right, and return the basis ``S`` (d x r, orthonormal columns); ``to_projector`` turns it into the stored layout.

Everything that would be a sum over shards of the long dimension goes through a ``Comm`` (identity here), so the
distributed layer can run the same code on a long-side-sharded gradient without rewriting it (section 7).

Solvers are written as generators (``rsvd_steps``, ``projector_steps``) that yield their collectives as requests
(``x = yield from comm.sum_long(t)``) and get the results back: ``run_batched`` advances the solvers of every matrix
switching in a step in lockstep and hands each round's requests to the Comm in one batch, so a refresh costs one
collective per solver stage, not one per matrix and stage. The small decompositions (QR, eigh, SVD, Cholesky) are
requests too (``linalg_steps``), solved for every matrix of a round in one batched call per shape
(``linalg_batch``): on CUDA each call is a host sync. ``rsvd_columns`` / ``compute_projector`` run one solver alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Generator

import torch

from .apollo import gaussian_columns
from .linalg_batch import LOCAL_KINDS, run_stacked, solve_dtype

SIDES = ("left", "right")
PROJ_TYPES = ("std", "reverse_std", "left", "right")
SOLVERS = ("svd", "rsvd", "random", "grasswalk", "online_pca", "gaussian")

_MASK64 = (1 << 64) - 1


class Comm:
    """Communication of one projected matrix. Identity: this process holds the whole matrix.

    The distributed layer subclasses it. ``reduce`` sums a partial result over every rank that holds a piece of
    G (element sums, products over the long side); ``reduce_stats`` sums the batched switch statistics;
    ``sketch`` returns this shard's rows of the global long-side Gaussian sketch. The remaining hooks let the same
    code run on a matrix sharded along its *short* (projected) side (the FSDP fallback) and with projectors
    stored sharded; their identity forms are what a single process does.
    """

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sketch(self, gen: torch.Generator, rows: int, cols: int, device) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)

    # -- solver hooks (rsvd_columns / compute_projector)
    def reduce_long(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a product over the long side (sharded in the normal case)."""
        return self.reduce(t)

    def reduce_short(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a product over the projected side (sharded only in the fallback)."""
        return t

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of Y's columns (rows of Y possibly sharded)."""
        return _orth(Y)

    def short_size(self, d: int) -> int:
        """Global size of the projected side given this rank's d."""
        return d

    def batch_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The largest rank's piece of the global ``shape`` (the one every rank pads its piece to): what sizes this
        matrix in a refresh batch, the same on every rank (optim/refresh_batches.py)."""
        return tuple(shape)

    def gather_short(self, S: torch.Tensor) -> torch.Tensor:
        """The full d x r basis from this rank's rows of it."""
        return S

    def svd(self, G: torch.Tensor, side: str, r: int) -> torch.Tensor:
        """The exact svd projector (full, stored layout) of the global G from this rank's piece."""
        return svd_projector(G, side, r)

    # -- projector hooks (LowRankAdamW)
    def projector_storage(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape this rank stores for a full projector of ``shape``."""
        return shape

    def use_projector(self, stored: torch.Tensor) -> torch.Tensor:
        """The full projector from the stored one (the same tensor when nothing is sharded)."""
        return stored

    def store_projector(self, stored: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Keep a new full projector; returns the full projector to use for the rest of the step."""
        return stored.copy_(full)

    def local_projector(self, P: torch.Tensor, side: str) -> torch.Tensor:
        """The part of the full projector that multiplies this rank's piece of G."""
        return P

    def reduce_projected(self, R: torch.Tensor) -> torch.Tensor:
        """This rank's part of R from its partial projection. Where the projected side is sharded (the FSDP
        fallback) the partial products are summed over the ranks and each keeps its slice of the long side, so the
        low-rank state stays sharded; otherwise R is already this rank's."""
        return R

    def state_piece(self, shape: tuple[int, int], side: str) -> tuple[int, int]:
        """The shape of the matrix piece whose long side this rank's low-rank state covers, given this rank's
        piece of G: the same piece, except in the fallback, where it is the whole projected side and a slice of
        the long side."""
        return shape

    def gather_long(self, N: torch.Tensor) -> torch.Tensor:
        """A low-rank tensor over this rank's whole piece of G from this rank's part of it (the fallback gathers
        the long-side slices; otherwise the identity)."""
        return N

    # -- batched solver hooks: generators, ``x = yield from comm.sum_long(t)``. The defaults call the hooks above at
    # once (no request is yielded); the distributed layer yields Requests that ``execute`` runs for many matrices.
    def sum_long(self, t: torch.Tensor):
        return self.reduce_long(t)
        yield  # a generator function

    def sum_short(self, t: torch.Tensor):
        return self.reduce_short(t)
        yield

    # A subclass that replaces ``orth`` or ``svd`` (one matrix at a time) keeps its own; the base forms are batched.
    def orth_steps(self, Y: torch.Tensor):
        if type(self).orth is not Comm.orth:
            return self.orth(Y)
        return (yield from orth_columns_steps(Y))

    def gather_short_steps(self, S: torch.Tensor):
        return self.gather_short(S)
        yield

    def svd_steps(self, G: torch.Tensor, side: str, r: int):
        if type(self).svd is not Comm.svd:
            return self.svd(G, side, r)
        return (yield from svd_projector_steps(G, side, r))

    shards_projected_side = False  # True for the FSDP fallback: R and the update N need collectives

    def projected_steps(self, R: torch.Tensor):
        return self.reduce_projected(R)
        yield

    def gather_long_steps(self, N: torch.Tensor):
        return self.gather_long(N)
        yield

    def execute(self, kind: str, requests: list["Request"]) -> list:
        """Run one round's requests of one ``kind`` (from solvers of several matrices) together."""
        raise NotImplementedError(f"{type(self).__name__} yields no {kind!r} requests")


IDENTITY = Comm()


@dataclass
class Request:
    """A collective a solver needs (``kind``: "sum", "gather_rows", "host", "owner_svd", ...), to be run by
    ``comm.execute`` together with the same kind of request of other matrices; ``args`` are the kind's inputs."""

    kind: str
    comm: Comm
    args: tuple


def run_batched(solvers: list[Generator]) -> list[Any]:
    """Run solver generators in lockstep: each round, every solver still running has yielded one Request; requests
    of one kind (and one Comm group, ``comm.batch_key``) go to one ``execute`` call, in a fixed order on every rank;
    local decompositions (``LOCAL_KINDS``) go to ``run_stacked``, one batched call per kind and shape, and a failed
    one is raised inside its solver. Returns each solver's result, or the exception it raised (a failed solve, e.g.
    ``LinAlgError``)."""
    results: list[Any] = [None] * len(solvers)
    waiting: dict[int, Request] = {}

    def advance(i: int, value) -> None:
        try:
            if isinstance(value, torch.linalg.LinAlgError):
                waiting[i] = solvers[i].throw(value)
            else:
                waiting[i] = solvers[i].send(value)
        except StopIteration as done:
            results[i] = done.value
        except torch.linalg.LinAlgError as error:  # a degenerate gradient: the caller falls back, per matrix
            results[i] = error

    for i in range(len(solvers)):
        advance(i, None)
    while waiting:
        batches: dict[tuple, list[int]] = {}
        local: dict[str, list[int]] = {}
        for i in sorted(waiting):
            req = waiting[i]
            if req.kind in LOCAL_KINDS:  # no communication: grouped by shape in run_stacked
                local.setdefault(req.kind, []).append(i)
            else:
                batches.setdefault((req.kind, getattr(req.comm, "batch_key", id(req.comm))), []).append(i)
        current, waiting = waiting, {}
        for kind, indices in sorted(local.items()):
            for i, out in zip(indices, run_stacked(kind, [current[i].args[0] for i in indices])):
                advance(i, out)
        for (kind, _), indices in sorted(batches.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            outs = current[indices[0]].comm.execute(kind, [current[i] for i in indices])
            for i, out in zip(indices, outs):
                advance(i, out)
    return results


def _drive(steps: Generator):
    """Run one solver alone; re-raise its failure."""
    (result,) = run_batched([steps])
    if isinstance(result, Exception):
        raise result
    return result


def side_for(shape: tuple[int, int], proj_type: str) -> str:
    """Which side the projector sits on (section 1): std puts it on the short side."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"proj_type: {proj_type!r} is not one of {', '.join(PROJ_TYPES)}")


def projected_dim(shape: tuple[int, int], side: str) -> int:
    return shape[0] if side == "left" else shape[1]


def lowrank_shape(shape: tuple[int, int], side: str, r: int) -> tuple[int, int]:
    """Shape of R, M, V: the long side kept, the projected side reduced to r."""
    return (r, shape[1]) if side == "left" else (shape[0], r)


def projector_shape(shape: tuple[int, int], side: str, r: int) -> tuple[int, int]:
    return (shape[0], r) if side == "left" else (r, shape[1])


def oriented(G: torch.Tensor, side: str) -> torch.Tensor:
    """View whose rows are the projected side (no copy)."""
    return G if side == "left" else G.T


def columns(P: torch.Tensor, side: str) -> torch.Tensor:
    """The basis S (d x r) of a stored projector; a view."""
    return P if side == "left" else P.T


def to_projector(S: torch.Tensor, side: str) -> torch.Tensor:
    return S if side == "left" else S.T.contiguous()


def project(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """R = Aᵀ G (left) or G Bᵀ (right), in the wider dtype (a bf16 gradient against an fp32 projector: fp32)."""
    dtype = torch.promote_types(G.dtype, P.dtype)
    G, P = G.to(dtype), P.to(dtype)
    return P.mT @ G if side == "left" else G @ P.mT  # mT: a stack of matrices too (optim/fused_step.py)


def project_back(N: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """A N (left) or N B (right)."""
    dtype = torch.promote_types(N.dtype, P.dtype)
    N, P = N.to(dtype), P.to(dtype)
    return P @ N if side == "left" else N @ P


def add_project_back_(W: torch.Tensor, N: torch.Tensor, P: torch.Tensor, side: str, alpha: float) -> None:
    """W += alpha * project_back(N) in one GEMM: no full-size temporary. A weight narrower than the update (bf16
    weight, fp32 states) takes the update computed in fp32, rounded once."""
    if W.dtype != torch.promote_types(N.dtype, P.dtype):
        W.add_(project_back(N, P, side), alpha=alpha)
    else:  # a stack (optim/fused_step.py): one batched GEMM
        (W.baddbmm_ if W.dim() == 3 else W.addmm_)(*((P, N) if side == "left" else (N, P)), alpha=alpha)


# ----------------------------------------------------------------------------------------------- randomness


def derive_seed(seed: int, index: int, count: int, salt: int = 0) -> int:
    """A 63-bit seed from (seed, matrix index, switch count, purpose): same draws on every rank and on resume."""
    x = seed & _MASK64
    for v in (index, count, salt):
        x = (x * 6364136223846793005 + (v & _MASK64) + 1442695040888963407) & _MASK64
        x ^= x >> 29
    return x & ((1 << 63) - 1)


def seeded(gen: torch.Generator, seed: int) -> torch.Generator:
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------------------------------------- solvers


def solver_dtype(G: torch.Tensor) -> torch.dtype:
    """Solvers run in fp32 at least: bf16/fp16 gradients are promoted, fp64 ones are not demoted."""
    return torch.promote_types(G.dtype, torch.float32)


def linalg_steps(kind: str, A: torch.Tensor):
    """One small decomposition (``linalg_batch.LOCAL_KINDS``) as a solver request; its outputs as a tuple."""
    return (yield Request(kind, IDENTITY, (A,)))


def _top_singular(U: torch.Tensor, Vh: torch.Tensor, side: str, r: int) -> torch.Tensor:
    return U[:, :r].contiguous() if side == "left" else Vh[:r].contiguous()


def svd_projector_steps(G: torch.Tensor, side: str, r: int):
    """GaLore: exact top-r singular vectors of G itself (not Gᵀ, so signs match GaLore's code); a solver generator."""
    U, _, Vh = yield from linalg_steps("svd", G.to(solver_dtype(G)))
    return _top_singular(U, Vh, side, r)


def svd_projector(G: torch.Tensor, side: str, r: int) -> torch.Tensor:
    """``svd_projector_steps`` for one matrix alone."""
    return _drive(svd_projector_steps(G, side, r))


def svd_projectors(Gs: list[torch.Tensor], sides: list[str], rs: list[int]) -> list:
    """``svd_projector`` of several matrices, the same-shaped ones in one batched svd; a failed matrix's entry is
    its ``LinAlgError``."""
    outs = run_stacked("svd", [G.to(solver_dtype(G)) for G in Gs])
    return [o if isinstance(o, Exception) else _top_singular(o[0], o[2], side, r)
            for o, side, r in zip(outs, sides, rs)]


def orth_columns_steps(Y: torch.Tensor):
    """Householder QR (``linalg_batch.linalg_dtype``: float64 on the CPU) with the sign convention diag(R) > 0: the
    unique Q that Cholesky-QR (the form a row-sharded Y needs, see the distributed layer) also produces, so both
    paths give the same basis; a solver generator."""
    Q, R = yield from linalg_steps("qr", Y.to(solve_dtype(Y)))
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return (Q * sign).to(Y.dtype)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return _drive(orth_columns_steps(Y))


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


class Timer:
    """Accumulates wall seconds spent in basis solvers (host time; on CUDA it excludes queued kernels)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0
        return False


__all__ = ["Comm", "IDENTITY", "SIDES", "PROJ_TYPES", "SOLVERS", "side_for", "projected_dim", "lowrank_shape",
           "projector_shape", "oriented", "columns", "to_projector", "project", "project_back", "add_project_back_",
           "derive_seed", "seeded", "svd_projector", "svd_projector_steps", "svd_projectors", "linalg_steps",
           "orth_columns_steps", "rsvd_columns", "rsvd_steps", "projector_steps", "run_batched", "Request",
           "random_columns", "gaussian_columns", "grasswalk_columns", "online_pca_grad", "online_pca_update_",
           "compute_projector"]
