"""Plain AdamW for the parameters that are not projected: torch.optim.AdamW semantics, torch's fused kernel where it
applies (docs/algorithms.md section 3, "Plain parameter")."""

from __future__ import annotations

import math

import torch

from . import state_codes
from .tensors import _local, state_dtype

_FUSED_ADAMW = hasattr(torch, "_fused_adamw_")


def _fused(p: torch.Tensor, group: dict) -> bool:
    """Whether ``p`` takes torch's fused AdamW kernel: a plain tensor on CPU/CUDA whose states are unquantized and
    share its dtype (the kernel takes one dtype: a bf16 parameter with fp32 states, or int8 / bf16 states of an
    fp32 one, take the op-by-op form, computed in fp32)."""
    held = state_codes.stored_as(state_codes.group_format(group), tuple(p.shape), state_dtype(p.dtype))
    return (_FUSED_ADAMW and type(_local(p)) in (torch.Tensor, torch.nn.Parameter)
            and p.device.type in ("cpu", "cuda") and held == p.dtype)


class AdamWStep:
    """``LowRankAdamW``'s plain groups (a mixin of it): their state and their step, on ``self.state``."""

    def _init_adamw_state(self, p: torch.Tensor, group: dict) -> dict:
        st = self.state[p]
        st["step"] = 0

        def zeros(dtype: torch.dtype, scale: bool) -> torch.Tensor:
            # like p, so a DTensor's states are DTensors sharded as it is; int8: one scale per dim-0 row (the
            # reduction over the other dims keeps p's Shard(0) placement)
            like = p.detach().sum(dim=tuple(range(1, p.dim())), keepdim=True) if scale else p
            return torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)

        state_codes.allocate(st, state_codes.group_format(group), tuple(p.shape), zeros, state_dtype(p.dtype))
        return st

    def _adamw_group(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None = None) -> None:
        """torch.optim.AdamW semantics: decoupled decay first, bias-corrected denominator.

        Uses torch's fused AdamW kernel (one pass over memory, ~8x faster than the op-by-op form on CPU) for
        tensors of one device/dtype/step, DTensors through their local shards; anything else takes the op-by-op
        loop. ``found_inf`` (a device scalar, only with the fused kernel) skips the update where it is non-zero.
        """
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        buckets: dict[tuple, list[torch.Tensor]] = {}
        loop = []
        for p in params:
            st = self.state[p] or self._init_adamw_state(p, group)
            st["step"] += 1
            if _fused(p, group):
                buckets.setdefault((p.device, p.dtype, st["step"]), []).append(p)
            else:
                loop.append(p)
        for (device, _, t), ps in buckets.items():
            step_t = torch.full((), float(t), dtype=torch.float32, device=device)  # read-only in the kernel
            # DTensors (FSDP2 shards) step on their local shards: elementwise, so no communication
            torch._fused_adamw_(
                [_local(p) for p in ps],
                [_local(p.grad) for p in ps],
                [_local(self.state[p]["exp_avg"]) for p in ps],
                [_local(self.state[p]["exp_avg_sq"]) for p in ps],
                [],
                [step_t] * len(ps),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
                **({} if found_inf is None else {"found_inf": found_inf.to(device)}),
            )
        if loop and found_inf is not None:
            raise RuntimeError("found_inf needs the fused AdamW kernel for every parameter (see _deferrable)")
        for p in loop:  # on local shards: elementwise, and a quantized block is one row of the shard
            st = self.state[p]
            t = st["step"]
            M, V = state_codes.load(st, state_dtype(p.dtype), _local)  # decoded copies unless stored as fp32
            g = _local(p.grad).to(M.dtype)
            local = _local(p)
            W = local.to(M.dtype)  # a bf16 weight: its update computed in fp32 and rounded once (copied back below)
            W.mul_(1 - lr * wd)
            M.lerp_(g, 1 - beta1)
            V.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1 = 1 - beta1**t
            bc2_sqrt = math.sqrt(1 - beta2**t)
            denom = (V.sqrt() / bc2_sqrt).add_(eps)
            W.addcdiv_(M, denom, value=-lr / bc1)
            if W is not local:
                local.copy_(W)
            state_codes.store(st, [M, V], _local)
