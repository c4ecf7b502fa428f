"""Validation loss and perplexity on a fixed set of token blocks, the same number whatever the rank count."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, *, micro_batch_size: int, device: torch.device, autocast=contextlib.nullcontext,
             rank: int = 0, world_size: int = 1, all_reduce=None) -> dict:
    """Mean next-token loss over every token of ``blocks`` ([n, seq_len + 1]).

    Rank r evaluates blocks r, r + W, ...; the per-block loss sums are placed in a length-n vector (zeros
    elsewhere), summed across ranks and then added up in block order. Adding zeros is exact, so every rank count
    sees the same total as long as each block's loss is computed identically.
    """
    was_training = model.training
    model.eval()
    n, width = blocks.shape
    per_block = torch.zeros(n, dtype=torch.float64, device=device)
    mine = list(range(rank, n, world_size))
    # Every rank runs the same number of forwards: FSDP's all-gathers need all ranks in step.
    rounds = math.ceil(math.ceil(n / world_size) / micro_batch_size)
    for i in range(rounds):
        idx = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
        batch = blocks[idx if idx else [0]].to(device)
        with autocast():
            logits = model(batch[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none").sum(dim=1)
        if idx:
            per_block[idx] = losses.double()
    if all_reduce is not None:
        all_reduce(per_block)
    model.train(was_training)
    val_loss = (per_block.sum() / (n * (width - 1))).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
