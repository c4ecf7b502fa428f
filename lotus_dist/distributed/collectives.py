"""``Comm`` implementations over a process group: what LowRankAdamW needs to run on FSDP2 shards.

ALGORITHMS.md section 7. One ``MatrixComm`` per projected matrix, over the FSDP shard group (the inner mesh dim;
under HSDP every replica group holds the same gradient shards and works on its own):

- normal case (sharded along the long side): R, moments and back-projection are local; ``reduce_long`` sums the
  rsvd sketches (n x k) and the k x k Gram; the Gaussian sketch is drawn whole from the shared seed and each rank
  takes its rows (uneven shards included);
- fallback (a left projector on a ``Shard(0)`` matrix: the projected side is sharded): ``R = Σ_i A_iᵀ G_i`` is
  reduce-scattered by columns every step, so each rank keeps a 1/W column slice of the r x n state (moments,
  ``d_init``, path-efficiency buffers) and runs Adam on it; the update N is all-gathered for the back-projection
  (the bytes of one all-reduce, 1/W of the memory). rsvd orthonormalises the row-sharded sketch by CholeskyQR2
  (two k x k all-reduces) before all-gathering the new basis;
- the exact ``svd`` solver gathers G on the plan's owner rank, which solves and broadcasts the projector;
- ``projectors="shard"``: each rank stores a 1/W row slice of the projector, all-gathered before use.

Every call goes through ``torch.distributed``'s module functions (``dist.all_reduce`` ...), so a test can count
them by patching the module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lotus_dist.optim.subspace import Comm, svd_projector


def chunk_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``torch.chunk(n, world)`` padded with empty chunks: DTensor's and FSDP2's uneven Shard rule."""
    size = -(-n // world) if n else 0
    return [max(0, min(size, n - i * size)) for i in range(world)]


def reduce_scatter_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Sum ``t`` over the ranks and keep this rank's rows (``sizes[i]`` rows for rank i, in order); the list form
    of reduce-scatter with chunks padded to the largest, which gloo and NCCL both take on every torch version."""
    rows = max(sizes)
    chunks = []
    for chunk in t.split(sizes):
        padded = t.new_zeros((rows, *t.shape[1:]))
        padded[: chunk.shape[0]] = chunk
        chunks.append(padded)
    out = t.new_empty((rows, *t.shape[1:]))
    dist.reduce_scatter(out, chunks, group=group)
    return out[: sizes[dist.get_rank(group)]]


def all_gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (``sizes[i]`` rows on rank i, ``chunk_sizes`` layout); gloo needs equal sizes,
    so each rank sends its rows padded to the largest. The ranks' blocks land in one buffer, and since only the tail
    ranks are short (chunk layout) the result is a view of its first rows: one full-size tensor, no concatenation."""
    rows = max(sizes)
    if t.shape[0] == rows and t.is_contiguous():
        send = t
    else:
        send = t.new_zeros((rows, *t.shape[1:]))
        send[: t.shape[0]] = t
    out = t.new_empty((rows * len(sizes), *t.shape[1:]))
    dist.all_gather(list(out.chunk(len(sizes))), send, group=group)
    return out[: sum(sizes)]


class StatsComm(Comm):
    """The batched switch statistics: one all-reduce of the step's [L, s] fp32 rows over the shard group."""

    def __init__(self, group):
        self.group = group

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


class MatrixComm(Comm):
    """Communication of one projected matrix whose gradient is ``Shard(shard_dim)`` over ``group``.

    ``shape`` is the global (m, n); ``side`` the projector side; ``fallback``: the sharded dim is the projected
    one (left projector, rows sharded); ``owner``: global rank that runs the exact svd; ``projectors``:
    "replicate" or "shard".
    """

    def __init__(self, group, shape: tuple[int, int], side: str, rank: int, shard_dim: int, fallback: bool,
                 owner: int, projectors: str = "replicate"):
        self.group = group
        self.world = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.shape, self.side, self.r, self.shard_dim, self.fallback = tuple(shape), side, rank, shard_dim, fallback
        self.owner = owner
        self.projectors = projectors
        self.gathers_projector = projectors == "shard"
        self.sizes = chunk_sizes(self.shape[shard_dim], self.world)  # this matrix's shard sizes
        self.offset = sum(self.sizes[: self.me])
        self.full_projector = (self.shape[0], rank) if side == "left" else (rank, self.shape[1])
        self.proj_sizes = chunk_sizes(self.full_projector[0], self.world)  # projectors="shard": row slices
        self.proj_offset = sum(self.proj_sizes[: self.me])
        # fallback: this rank's column slice of the r x n low-rank state (DTensor's Shard(1) rule)
        self.long_sizes = chunk_sizes(self.shape[1], self.world)
        if fallback != (side == "left" and shard_dim == 0):
            raise ValueError(f"inconsistent plan: side {side}, Shard({shard_dim}), fallback {fallback}")

    # ------------------------------------------------------------------------------------------ reductions

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t

    def reduce_long(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.fallback else self.reduce(t)

    def reduce_short(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t) if self.fallback else t

    def reduce_projected(self, R: torch.Tensor) -> torch.Tensor:
        if not self.fallback:
            return R
        # The fallback's per-step Σ_i A_iᵀ G_i (r x n), reduce-scattered: this rank's r x n_j column slice.
        return reduce_scatter_rows(R.T.contiguous(), self.long_sizes, self.group).T.contiguous()

    def state_piece(self, shape, side):
        return (shape[0], self.long_sizes[self.me]) if self.fallback else tuple(shape)

    def gather_long(self, N: torch.Tensor) -> torch.Tensor:
        if not self.fallback:
            return N
        return all_gather_rows(N.T.contiguous(), self.long_sizes, self.group).T

    # --------------------------------------------------------------------------------------------- solvers

    def sketch(self, gen, rows, cols, device):
        if self.fallback:  # the long side (columns) is whole on every rank
            return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
        # The global sketch, drawn whole from the shared seed (identical on every rank), this rank's rows of it.
        full = torch.randn(self.shape[self.shard_dim], cols, generator=gen, device=device, dtype=torch.float32)
        return full[self.offset : self.offset + rows]

    def short_size(self, d: int) -> int:
        return self.shape[0] if self.fallback else d

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        if not self.fallback:
            return super().orth(Y)
        # CholeskyQR2 of the row-sharded Y in float64: Q = Y L⁻ᵀ with L Lᵀ = Σ_i Y_iᵀ Y_i (one k x k all-reduce),
        # twice: one pass loses orthogonality as κ(Y)²·eps, the second restores it. R = (L₂ᵀ L₁ᵀ) has a positive
        # diagonal, the convention of the single-process Householder orth, so both give the same Q. Should the
        # Gram not be positive definite (κ(Y) ≳ 1e8), gather Y and use the single-process Householder.
        Q = Y.double()
        for _ in range(2):
            L, info = torch.linalg.cholesky_ex(self.reduce(Q.T @ Q))
            if int(info):  # identical Gram on every rank: every rank takes this branch together
                full = all_gather_rows(Y.contiguous(), self.sizes, self.group)
                return super().orth(full)[self.offset : self.offset + Y.shape[0]]
            Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T
        return Q.to(Y.dtype)

    def gather_short(self, S: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(S.contiguous(), self.sizes, self.group) if self.fallback else S

    def svd(self, G: torch.Tensor, side: str, r: int) -> torch.Tensor:
        """Exact svd on the owner: gather G there (padded shards), solve, broadcast the full projector."""
        Gt = G.movedim(self.shard_dim, 0).contiguous()  # shard rows first, so padding is along dim 0
        buf = Gt.new_zeros((max(self.sizes), *Gt.shape[1:]))
        buf[: Gt.shape[0]] = Gt
        mine = dist.get_global_rank(self.group, self.owner) if self.group is not None else self.owner
        is_owner = dist.get_rank() == mine
        parts = [torch.empty_like(buf) for _ in self.sizes] if is_owner else None
        dist.gather(buf, parts, dst=mine, group=self.group)
        if is_owner:
            full = torch.cat([p[:s] for p, s in zip(parts, self.sizes)]).movedim(0, self.shard_dim)
            try:
                P = svd_projector(full, side, r).to(G.dtype).contiguous()
            except torch.linalg.LinAlgError:
                # Broadcast the failure (NaN) rather than leave the other ranks waiting: every rank then takes
                # the optimizer's solver fallback together.
                P = G.new_full(self.full_projector, float("nan"))
        else:
            P = G.new_empty(self.full_projector)
        dist.broadcast(P, src=mine, group=self.group)
        return P

    # ------------------------------------------------------------------------------------------ projectors

    def projector_storage(self, shape):
        if self.projectors == "shard":
            return (self.proj_sizes[self.me], shape[1])
        return tuple(shape)

    def use_projector(self, stored: torch.Tensor) -> torch.Tensor:
        if self.projectors == "shard":
            return all_gather_rows(stored, self.proj_sizes, self.group)
        return stored

    def store_projector(self, stored: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        if self.projectors == "shard":
            stored.copy_(full[self.proj_offset : self.proj_offset + stored.shape[0]])
            return full.to(stored.dtype)
        return stored.copy_(full)

    def local_projector(self, P: torch.Tensor, side: str) -> torch.Tensor:
        # fallback: A's rows that multiply this rank's rows of G
        return P[self.offset : self.offset + self.sizes[self.me]] if self.fallback else P


__all__ = ["MatrixComm", "StatsComm", "all_gather_rows", "chunk_sizes", "reduce_scatter_rows"]
