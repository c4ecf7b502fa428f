"""Drop-in optimizers with galore-torch's API: ``GaLoreAdamW`` (galore-torch 1.0's ``GaLoreAdamW``) and
``LotusAdamW`` (the ``lotus`` method), and ``ApolloAdamW`` with apollo-torch 1.0.3's (apollo.py), for a plain
training loop or a Hugging Face ``Trainer``.

Both take galore-torch's parameter groups as galore-torch users write them::

    [{"params": regular_params},
     {"params": galore_params, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]

A group with ``rank`` is projected, any other group is plain AdamW. They are ``LowRankAdamW`` subclasses: the
projected matrices go through the same code as ``optim.name=galore`` / ``optim.name=lotus`` in ``pretrain.py``.
What the drop-ins change, so that ``GaLoreAdamW`` gives galore-torch 1.0's numbers (``tests/optim/test_dropin.py``
checks every parameter against a reference written from galore-torch's code):

- plain parameters take Hugging Face's AdamW form (galore-torch's ``AdamW`` is a copy of it): ε added to
  ``sqrt(V)`` before the bias correction (which goes into the step size), decoupled decay ``p -= lr·wd·p`` after the
  update, on the updated weight. ``LowRankAdamW`` (and so ``pretrain.py``) uses ``torch.optim.AdamW``'s form: the
  two drift apart by ~1e-5 over a few hundred steps without weight decay, and by far more with it.
- ``correct_bias=False`` (galore-torch's option, per group) drops the bias correction for every parameter.
- ``GaLoreAdamW`` solves its bases as galore-torch does: ``torch.linalg.svd(G.float())``, i.e. in fp32 also for an
  fp64 gradient (``LowRankAdamW`` keeps fp64 in fp64), the projector cast back to the gradient's dtype; and it clips
  the rank to ``min(m, n)`` (what ``svd(full_matrices=False)`` returns) for every ``proj_type``.
- ``update_proj_gap`` (galore-torch's name, read at every step) is ``LowRankAdamW``'s ``update_gap``.
- The optimizer state is fp32 whatever the parameter dtype (galore-torch keeps a bf16 model's moments and
  projectors in bf16, where V stalls at β2 = 0.999 and the projector drifts from orthonormal); a bf16 weight's
  update is computed in fp32 and rounded once.

Known differences from galore-torch 1.0: ``proj_type="full"`` and the tensor (>2-D) projector are refused; a
projected matrix whose first gradient is exactly zero waits for its first non-zero gradient before it computes a
basis and steps (galore-torch would take the SVD of the zero matrix and keep that basis for ``update_proj_gap``
steps); ``proj_type="reverse_std"`` with ``rank >= min(m, n)`` works (galore-torch's back-projection fails there).

No ``torch.distributed``, no trainer: this module imports only ``lotus_dist.optim``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .lowrank import LowRankAdamW
from .methods import METHODS
from .subspace import PROJ_TYPES, Comm
from . import state_codes
from .tensors import _local, state_dtype

GALORE_PROJ_TYPES = PROJ_TYPES  # galore-torch 1.0 also has "full" (both sides), not supported here


class _GaLoreSVD(Comm):
    """Single-process communication whose exact svd is galore-torch's ``get_orthogonal_matrix``: a gradient that
    is not fp32 is decomposed as ``G.float()`` (fp64 included), the projector cast back to the gradient's dtype,
    but never below fp32 (a bf16 model's projector stays fp32, see the module doc)."""

    def svd(self, G: torch.Tensor, side: str, r: int) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        return (U[:, :r] if side == "left" else Vh[:r]).to(torch.promote_types(G.dtype, torch.float32))


_GALORE_SVD = _GaLoreSVD()


class _DropIn(LowRankAdamW):
    """galore-torch's group format and Hugging Face's AdamW form on top of LowRankAdamW (see the module doc).

    A subclass names its row of ``METHODS`` (``METHOD``) and whether it takes low-rank options as keywords
    (``TAKES_OPTIONS``; galore-torch's class takes none). ``no_deprecation_warning`` is accepted and ignored
    (galore-torch inherits it from transformers' AdamW)."""

    METHOD: str
    TAKES_OPTIONS = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        **lowrank_defaults,
    ):
        if lowrank_defaults and not self.TAKES_OPTIONS:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {sorted(lowrank_defaults)}")
        if "update_proj_gap" in lowrank_defaults:
            lowrank_defaults["update_gap"] = lowrank_defaults.pop("update_proj_gap")
        parts = {k: v for k, v in METHODS[self.METHOD].items() if k != "seed"}
        self._correct_bias = bool(correct_bias)  # read by add_param_group, which torch calls from __init__
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **{**parts, **lowrank_defaults})
        self.defaults["correct_bias"] = self._correct_bias

    # ------------------------------------------------------------------------------------------ configuration

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("correct_bias", self._correct_bias)
        rank = param_group.get("rank")
        if rank is not None:
            proj_type = param_group.get("proj_type", self.lowrank_defaults["proj_type"])
            if proj_type not in GALORE_PROJ_TYPES:
                raise ValueError(
                    f"proj_type: {proj_type!r} is not supported by {type(self).__name__} "
                    f"(supported: {', '.join(GALORE_PROJ_TYPES)}; galore-torch's 'full' is not)"
                )
            if "update_proj_gap" in param_group:
                param_group["update_gap"] = param_group["update_proj_gap"]
        super().add_param_group(param_group)
        if rank is not None:
            for p in param_group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"a group with 'rank' holds only 2-D matrices; got a parameter of shape {tuple(p.shape)} "
                        "(put it in a group without 'rank')"
                    )

    def _sync_gaps(self) -> None:
        """galore-torch reads ``update_proj_gap`` at every step: a change to the group takes effect."""
        for group in self.param_groups:
            if group.get("rank") is not None and "update_proj_gap" in group:
                group["update_gap"] = group["update_proj_gap"]

    @torch.no_grad()
    def step(self, closure=None):
        self._sync_gaps()
        return super().step(closure)

    # ------------------------------------------------------------------------------------------------- math

    def _adamw_group(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None = None) -> None:
        """Hugging Face's (galore-torch's) AdamW, op for op: M, V; denom = sqrt(V) + eps; step size
        lr·sqrt(1−β2^t)/(1−β1^t) (lr without ``correct_bias``); p −= step_size·M/denom; then p −= lr·wd·p."""
        if found_inf is not None:
            raise RuntimeError("the drop-in optimizers step on the host path only (see _deferrable)")
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        correct = group.get("correct_bias", True)
        for p in params:
            g = _local(p.grad)
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            st = self.state[p] or self._init_adamw_state(p, group)
            st["step"] += 1
            t = st["step"]
            W = _local(p)
            M, V = state_codes.load(st, state_dtype(p.dtype), _local)  # decoded copies unless stored as fp32
            g = g.to(M.dtype)
            Wf = W.to(M.dtype)  # a bf16 weight: its update computed in fp32 and rounded once (copied back below)
            M.mul_(beta1).add_(g, alpha=1.0 - beta1)
            V.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = V.sqrt().add_(eps)
            step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if correct else lr
            Wf.add_(M / denom, alpha=-step_size)
            if wd > 0.0:
                Wf.add_(Wf, alpha=-lr * wd)
            if Wf is not W:
                W.copy_(Wf)
            state_codes.store(st, [M, V], _local)

    @staticmethod
    def _step_size(group: dict, t: int) -> float:
        return LowRankAdamW._step_size(group, t) if group.get("correct_bias", True) else group["lr"]

    def _deferrable(self, plain, jobs) -> bool:
        return False  # the plain update is the op-by-op form above, without a device mask


class GaLoreAdamW(_DropIn):
    """galore-torch 1.0's ``GaLoreAdamW`` (same arguments, same group keys, same numbers).

    Group keys of a projected group: ``rank`` (required), ``update_proj_gap`` (default 200), ``scale`` (default
    0.25), ``proj_type`` (``std`` default, ``reverse_std``, ``left``, ``right``). Basis: exact SVD of the current
    gradient at the matrix's steps 0, T, 2T, ...; Adam moments kept across switches.
    ``no_deprecation_warning`` is accepted and ignored (galore-torch inherits it from transformers' AdamW).
    """

    METHOD = "galore"
    TAKES_OPTIONS = False

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("rank") is not None:
            param_group.setdefault("update_proj_gap", self.lowrank_defaults["update_gap"])
        super().add_param_group(param_group)

    def comm_for(self, param: torch.Tensor) -> Comm:
        return self._comms.get(id(param), _GALORE_SVD)

    @staticmethod
    def _geometry(p: torch.Tensor, group: dict) -> tuple[str, int]:
        side, r = LowRankAdamW._geometry(p, group)
        return side, min(r, min(p.shape))  # what svd(full_matrices=False)[:r] gives, whatever the side


class ApolloAdamW(_DropIn):
    """apollo-torch 1.0.3's ``AdamW`` (APOLLO / APOLLO-Mini; same arguments, same group keys, its numbers for a given
    projection: tests/optim/test_apollo.py).

    A projected group: ``rank`` (required; APOLLO-Mini is rank 1), ``proj`` (``random`` only: the seeded Gaussian
    N(0, 1/r) projection), ``scale_type`` (``channel``: APOLLO, default; ``tensor``: APOLLO-Mini), ``scale`` (α,
    default 1; √α multiplies the update; the paper's Mini uses 128), ``update_proj_gap`` (default 200),
    ``proj_type`` (``std`` default, ``reverse_std``, ``left``, ``right``). Known differences: the Gaussian draws are
    seeded by (``seed``, matrix index, refresh count), not by apollo-torch's parameter counter and ``next_seed``
    (same distribution, other numbers); ``proj="svd"``, ``scale_front=True`` and ``disable_nl=True`` are refused;
    the rank is clipped to the projected side (apollo-torch would draw an over-complete projection); ``channel``
    works with every ``proj_type`` (apollo-torch's only with the projection on the short side).
    """

    METHOD = "apollo"
    SCALE_TYPES = {"channel": "apollo_channel", "tensor": "apollo_tensor"}

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, scale_front: bool = False,
                 disable_nl: bool = False, no_deprecation_warning: bool = True, **lowrank_defaults):
        if scale_front or disable_nl:
            raise ValueError("ApolloAdamW: scale_front=True and disable_nl=True are not supported (apollo-torch's "
                             "defaults, False, are: the norm-growth limiter on, sqrt(scale) applied after it)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         **lowrank_defaults)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("rank") is not None:
            proj = param_group.setdefault("proj", "random")
            scale_type = param_group.setdefault("scale_type", "channel")
            if proj != "random":
                raise ValueError(f"proj: {proj!r} is not supported by ApolloAdamW (supported: random)")
            if scale_type not in self.SCALE_TYPES:
                raise ValueError(f"scale_type: {scale_type!r} is not one of {', '.join(self.SCALE_TYPES)}")
            param_group["residual"] = self.SCALE_TYPES[scale_type]
        super().add_param_group(param_group)


class LotusAdamW(_DropIn):
    """Lotus (the ``lotus`` method): randomized-SVD bases, switched when the unit low-rank gradient stops moving.

    Same arguments and group format as ``GaLoreAdamW``; a projected group also takes Lotus's keys: ``gamma``
    (switch threshold, default 0.01), ``verify_gap`` (η: steps between checks, default 50, also the shortest
    interval between switches), ``oversample`` (8) and ``power_iters`` (2) of the randomized SVD, ``seed`` (0),
    ``reference_dtype`` (``bf16``: the stored reference direction; ``fp32`` exact; ``int4`` compact codes), and any
    other part of ``LOWRANK_DEFAULTS`` (``switch="path_efficiency"`` with ``gamma``/``window``/``t_min`` is
    ``lotus_rho``).
    Those keys given to the constructor become defaults for every projected group. There is no fixed clock:
    ``update_proj_gap`` is accepted (a group copied from galore-torch keeps working) and only used with
    ``switch="fixed"``; the displacement rule switches by τ ≈ 2/γ steps at the latest.
    """

    METHOD = "lotus"


__all__ = ["ApolloAdamW", "GaLoreAdamW", "LotusAdamW"]
