import pytest
import torch


def _decaying_matrix(m: int, n: int, seed: int = 0, decay: float = 0.85, noise: float = 1e-3) -> torch.Tensor:
    """m x n fp32 matrix with a geometric singular spectrum (distinct values) plus a small isotropic floor."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    G = (U * s) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.25
    return G.float()


def _principal_sines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between the column spaces of orthonormal A and B (ascending cosines)."""
    cos = torch.linalg.svdvals(A.double().T @ B.double()).clamp(max=1.0)
    return (1 - cos**2).clamp(min=0).sqrt()


@pytest.fixture
def decaying_matrix():
    return _decaying_matrix


@pytest.fixture
def principal_sines():
    return _principal_sines


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests use small matrices: one intra-op thread avoids oversubscribing the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
