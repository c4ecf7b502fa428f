"""Switch policies of docs/algorithms.md section 5: when a projected matrix recomputes its basis.

A policy is a stateless singleton; everything it remembers lives in the parameter's optimizer state as tensors and
ints. Each step runs in two halves so that the whole optimizer needs at most one host sync:

1. ``advance`` (host counters only) says STAY, SWITCH, or CHECK; ``peek`` says the same without advancing (what
   optimizer-in-backward asks before a step: does this matrix need its full gradient, or only R?). On CHECK the
   policy returns ``statistics``: a row of ``STATS_WIDTH`` fp32 partial sums (sums of squares / dot products over
   the matrix's elements, so that a sharded matrix only needs the rows summed across ranks).
2. The optimizer stacks every row into one [L, STATS_WIDTH] tensor, passes it through ``reduce_stats`` and syncs
   once; ``decide`` turns a reduced row into the decision on the host.
After a switch, ``on_switch`` re-initialises the policy state from R in the new basis; ``observe`` runs every step
after the decision (path_efficiency's accumulators).
"""

from __future__ import annotations

import math

import torch

from . import reference_codes
from .subspace import IDENTITY, Comm, derive_seed, lowrank_shape, projected_dim, seeded

STAY, CHECK, SWITCH = "stay", "check", "switch"
STATS_WIDTH = 3
PE_SKETCH_ROWS = 32  # rows of path_efficiency's short-side sketch of the out-of-subspace residual
SALT_PE = 0x5045


class Policy:
    name = ""
    default_gamma: float | None = None

    def allocate(self, state: dict, shape, side: str, r: int, dtype, device, short: int | None = None,
                 reference: str = "fp32") -> None:
        """``shape`` is this rank's piece of the matrix; ``short`` the global size of its projected side;
        ``reference`` the form of a stored reference gradient (optim.reference_dtype; fp32: ``dtype``, exact)."""

    def peek(self, state: dict, group: dict) -> str:
        """What ``advance`` will return, without changing the state."""
        raise NotImplementedError

    def advance(self, state: dict, group: dict) -> str:
        return self.peek(state, group)

    def needs_gradient(self, state: dict, group: dict) -> bool:
        """Whether this step needs the full gradient G, not only R = project(G): a switch (or a check that may
        switch) solves for a new basis from G, and some policies observe G every step."""
        return self.peek(state, group) != STAY

    def statistics(self, state: dict, group: dict, R: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, state: dict, group: dict, row: list[float]) -> bool:
        raise NotImplementedError

    def on_switch(self, state: dict, group: dict, R: torch.Tensor) -> None:
        pass

    def observe(self, state, group, R, G, P, side, gen, comm: Comm = IDENTITY) -> None:
        pass

    def gamma(self, group: dict) -> float:
        g = group.get("gamma")
        return self.default_gamma if g is None else g


class Fixed(Policy):
    """GaLore: recompute when the matrix's step count (0-based, before this step) is a multiple of T."""

    name = "fixed"

    def peek(self, state, group):
        return SWITCH if state["step"] % group["update_gap"] == 0 else STAY


class EveryStep(Policy):
    name = "every_step"

    def peek(self, state, group):
        return SWITCH


class Displacement(Policy):
    """Lotus Algorithm 1: switch when ‖d_cur − d_init‖_F / τ < γ, checked when τ % η == 0.

    The reference D stores R of the switch step unnormalised (normalising needs the global norm, i.e. a
    collective); the statistics row [‖R‖², ⟨R, D⟩, ‖D‖²] gives ‖R/‖R‖ − D/‖D‖‖² = 2 − 2⟨R, D⟩ / (‖R‖ ‖D‖) after
    reduction. D is stored in bf16 by default (optim.reference_dtype, ``d_init``): it only enters through a
    normalised inner product, where bf16's 2^-9 relative rounding moves the distance by far less than the gap to
    γ·τ that a decision needs; ``int4`` stores 4-bit codes per long-side index with the exact ‖D‖²
    (reference_codes.py); the statistics are accumulated in fp32.
    """

    name = "displacement"

    def gamma(self, group: dict) -> float:
        """optim.gamma, or 2 / optim.update_gap when unset (the paper's 0.01 at GaLore's T = 200): the distance
        shrinks like 2/τ once the unit gradient settles, so this switches at the latest near τ = T, never keeping a
        basis longer than the fixed schedule would (docs/algorithms.md, Lotus's clock)."""
        g = group.get("gamma")
        return 2.0 / group["update_gap"] if g is None else g

    def allocate(self, state, shape, side, r, dtype, device, short=None, reference="fp32"):
        state["tau"] = 0
        reference_codes.allocate(state, shape, side, r, reference, dtype, device)

    def peek(self, state, group):
        return CHECK if (state["tau"] + 1) % group["verify_gap"] == 0 else STAY

    def advance(self, state, group):
        action = self.peek(state, group)
        state["tau"] += 1
        return action

    def statistics(self, state, group, R):
        rd, dd = reference_codes.sums(state, R)
        return torch.stack([R.float().square().sum(), rd, dd])

    @staticmethod
    def distance(row: list[float]) -> float | None:
        rr, rd, dd = row[0], row[1], row[2]
        if rr <= 0.0 or dd <= 0.0:
            return None  # a zero gradient has no direction: never switch on it
        return math.sqrt(max(2.0 - 2.0 * rd / math.sqrt(rr * dd), 0.0))

    def decide(self, state, group, row):
        dist = self.distance(row)
        return dist is not None and dist / state["tau"] < self.gamma(group)

    def on_switch(self, state, group, R):
        reference_codes.store(state, R)
        state["tau"] = 1


class PathEfficiency(Policy):
    """Lotus Eq. 1-3 over tumbling windows of w unit gradients ĝ_i = G_i / ‖G_i‖.

    ρ = ‖Σ P Pᵀ ĝ_i‖ / ‖Σ ĝ_i‖. With an orthonormal basis the numerator is ‖Σ R_i/‖G_i‖‖, accumulated exactly in
    a low-rank buffer ``pe_acc``. The denominator splits as ‖Σĝ‖² = num² + ‖(I − P Pᵀ) Σĝ‖²; the second term is
    estimated by a Gaussian sketch Ψ (s x d, entries N(0, 1/s), s = 32, the same Ψ for a whole window) applied on
    the projected side: E‖Ψ X‖² = ‖X‖², relative std ≤ sqrt(2/s). So ρ_est ∈ [0, 1] and is exact when the
    gradients stay in the subspace. Default γ_ρ = 0.5, w = 50, T_min = 50 are uncalibrated (the paper gives none).
    """

    name = "path_efficiency"
    default_gamma = 0.5

    @staticmethod
    def sketch_rows(shape, side, short=None):
        return min(PE_SKETCH_ROWS, projected_dim(shape, side) if short is None else short)

    def allocate(self, state, shape, side, r, dtype, device, short=None, reference="fp32"):
        s = self.sketch_rows(shape, side, short)
        state["pe_acc"] = torch.zeros(lowrank_shape(shape, side, r), dtype=torch.float32, device=device)
        state["pe_sketch"] = torch.zeros(lowrank_shape(shape, side, s), dtype=torch.float32, device=device)
        state["pe_count"] = 0
        state["pe_window"] = 0
        state["pe_last_switch"] = 0
        state["pe_rho"] = 1.0

    def peek(self, state, group):
        return CHECK if state["pe_count"] >= group["window"] else STAY

    def needs_gradient(self, state, group):
        return True  # observe() sketches the part of every G outside the subspace

    def statistics(self, state, group, R):
        zero = torch.zeros((), dtype=torch.float32, device=R.device)
        return torch.stack([state["pe_acc"].square().sum(), state["pe_sketch"].square().sum(), zero])

    @staticmethod
    def rho(row: list[float]) -> float:
        num, res = row[0], row[1]
        return 1.0 if num + res <= 0.0 else math.sqrt(num / (num + res))

    def decide(self, state, group, row):
        rho = self.rho(row)
        state["pe_rho"] = rho
        switch = rho < self.gamma(group) and state["step"] - state["pe_last_switch"] >= group["t_min"]
        if not switch:
            self._reset_window(state)
        return switch

    def _reset_window(self, state):
        state["pe_acc"].zero_()
        state["pe_sketch"].zero_()
        state["pe_count"] = 0
        state["pe_window"] += 1

    def on_switch(self, state, group, R):
        self._reset_window(state)
        state["pe_last_switch"] = state["step"]

    def observe(self, state, group, R, G, P, side, gen, comm=IDENTITY):
        Gf, Rf, Pf = G.float(), R.float(), P.float()
        inv = comm.reduce(Gf.square().sum()).rsqrt()
        s = state["pe_sketch"].shape[0 if side == "left" else 1]
        d = comm.short_size(projected_dim(tuple(G.shape), side))  # Ψ spans the whole projected side
        seeded(gen, derive_seed(group["seed"], state["index"], state["n_bases"], SALT_PE + state["pe_window"]))
        psi = torch.randn(s, d, generator=gen, device=G.device, dtype=torch.float32) / math.sqrt(s)
        if side == "left":  # Ψ (I − A Aᵀ) G = Ψ G − (Ψ A) R; Ψ G sums over the projected side (sharded: fallback),
            psi_local = comm.local_projector(psi.T, side).T  # reduced and sliced along the long side like R
            sk = comm.reduce_projected(psi_local @ Gf) - (psi @ Pf) @ Rf
        else:  # G (I − Bᵀ B) Ψᵀ = G Ψᵀ − R (B Ψᵀ)
            sk = Gf @ psi.T - Rf @ (Pf @ psi.T)
        state["pe_acc"].add_(Rf * inv)
        state["pe_sketch"].add_(sk * inv)
        state["pe_count"] += 1


POLICIES: dict[str, Policy] = {p.name: p for p in (Fixed(), Displacement(), PathEfficiency(), EveryStep())}


def exact_path_efficiency(grads: list[torch.Tensor], P: torch.Tensor, side: str) -> float:
    """ρ from full matrices (tests and diagnostics only): ‖Σ P Pᵀ ĝ_i‖ / ‖Σ ĝ_i‖."""
    total = sum(g.double() / g.double().norm() for g in grads)
    Pd = P.double()
    inside = Pd @ (Pd.T @ total) if side == "left" else (total @ Pd.T) @ Pd
    return float(inside.norm() / total.norm())


__all__ = [
    "STAY",
    "CHECK",
    "SWITCH",
    "STATS_WIDTH",
    "Policy",
    "Fixed",
    "EveryStep",
    "Displacement",
    "PathEfficiency",
    "POLICIES",
    "exact_path_efficiency",
]
