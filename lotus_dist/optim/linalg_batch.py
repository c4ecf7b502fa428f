"""The small decompositions of a refresh, batched by shape, and the device rule for their precision.

On CUDA each ``torch.linalg`` decomposition checks its result on the host (a synchronisation), so a refresh that
solved its matrices one at a time would sync once per matrix and stage. The solvers therefore yield their QRs,
eigendecompositions, SVDs and Cholesky factorisations as requests (``solver_rounds.linalg_steps``); ``run_batched``
hands a round's requests of one kind to ``run_stacked``, which stacks the same-shaped ones into one batched call:
one call per stage and distinct shape, whatever the number of matrices (docs/algorithms.md section 4).
"""

from __future__ import annotations

import functools

import torch

# Compute capabilities whose fp64 runs at half the fp32 rate or better: P100, V100, A100, H100/H200, B200.
# Other CUDA GPUs (L40S, L4, A10, RTX, T4, GB300...) run fp64 at 1/32-1/64 of fp32.
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


@functools.lru_cache(maxsize=None)
def _cuda_full_rate_fp64(index: int) -> bool:
    return tuple(torch.cuda.get_device_capability(index)) in FULL_RATE_FP64


def linalg_dtype(device) -> torch.dtype:
    """The precision of the solvers' orthonormalisations (Householder QR of the d x k sketches) and small
    eigenproblems (the k x k Gram): float64 where fp64 is cheap -- the CPU, and GPUs with full-rate fp64
    (``FULL_RATE_FP64``: A100, H100, H200, ...) --, float32 elsewhere (L40S-class GPUs, MPS, others), where fp64
    would cost 32-64x. Both stages are accurate in fp32 (Householder QR is backward stable, and the Gram is formed
    in fp32 anyway); fp64 where it is free keeps the CPU results bit for bit those of earlier releases.
    CholeskyQR2 (FSDP's fallback matrices) squares the sketch's condition number and stays in float64 everywhere.
    Inputs already in float64 are never demoted (``solve_dtype``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float64
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.float64 if _cuda_full_rate_fp64(index) else torch.float32
    return torch.float32


def solve_dtype(t: torch.Tensor) -> torch.dtype:
    """``linalg_dtype`` of t's device, never below t's own precision."""
    return torch.promote_types(t.dtype, linalg_dtype(t.device))


_OPS = {
    "qr": torch.linalg.qr,
    "eigh": torch.linalg.eigh,
    "svd": lambda A: torch.linalg.svd(A, full_matrices=False),
    "cholesky": torch.linalg.cholesky_ex,  # no host check: the caller reads ``info`` (batched, see collectives)
}
LOCAL_KINDS = frozenset(_OPS)


def _one(op, A: torch.Tensor):
    try:
        return tuple(op(A))
    except torch.linalg.LinAlgError as error:
        return error


def run_stacked(kind: str, tensors: list[torch.Tensor]) -> list:
    """``op(A)`` (a tuple of tensors) for every A, or the ``LinAlgError`` it raised; the inputs of one shape, dtype
    and device in one batched call. A lone matrix is decomposed as is (exactly the per-matrix call); should a batched
    call fail, its matrices are redone one by one, so a failure stays with the matrix that caused it."""
    op = _OPS[kind]
    out: list = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, A in enumerate(tensors):
        groups.setdefault((tuple(A.shape), A.dtype, A.device), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = _one(op, tensors[idx[0]])
            continue
        try:
            res = op(torch.stack([tensors[i] for i in idx]))
        except torch.linalg.LinAlgError:
            for i in idx:
                out[i] = _one(op, tensors[i])
            continue
        for j, i in enumerate(idx):
            out[i] = tuple(t[j] for t in res)
    return out


__all__ = ["FULL_RATE_FP64", "LOCAL_KINDS", "linalg_dtype", "run_stacked", "solve_dtype"]
