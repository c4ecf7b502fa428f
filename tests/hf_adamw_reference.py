"""The Adam step that galore-torch 1.0 and apollo-torch 1.0.3 both take from Hugging Face's AdamW, written once for
the tests' references of those packages (tests/optim/test_dropin.py, test_apollo.py); independent of lotus_dist."""

import math

import torch


def hf_adam_direction(st: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
    """Hugging Face's AdamW on ``grad``: the moments (created once in ``st``, then kept) and ``st["step"]`` updated;
    returns N = M / (sqrt(V) + eps) and the step size lr·sqrt(1−β2^t)/(1−β1^t) (lr without ``correct_bias``)."""
    if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
    m, v = st["exp_avg"], st["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    st["step"] += 1
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = v.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2 ** st["step"]) / (1.0 - beta1 ** st["step"])
    return m / denom, step_size
