"""The side rule and the projection of docs/algorithms.md sections 1-2, and the ``Comm`` a solver sums through.

A projector is stored in GaLore's layout: ``A`` (m x r, left) or ``B`` (r x n, right). Solvers (basis_solvers.py)
work on the "oriented" view ``Gs`` (d x l) whose rows are the projected (usually short) side: ``Gs = G`` for left,
``G.T`` for right, and return the basis ``S`` (d x r, orthonormal columns); ``to_projector`` turns it into the
stored layout.

Everything that would be a sum over shards of the long dimension goes through a ``Comm`` (identity here), so the
distributed layer can run the same code on a long-side-sharded gradient without rewriting it (section 7); its
batched hooks yield ``Request``s that ``solver_rounds.run_batched`` runs for many matrices together.
"""

from __future__ import annotations

import time

import torch

from .solver_rounds import _orth, orth_columns_steps, svd_projector, svd_projector_steps

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
           "derive_seed", "seeded", "Timer"]
