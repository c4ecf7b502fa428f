"""What each section runs: the GPU's sizes, or the dry run's tiny ones on the CPU, and each item's time: ``needs``
(about the least it takes: below that it is skipped) and ``limit`` (the most it may take, before the budget cuts it).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Plan:
    device: torch.device
    yardstick: tuple[int, torch.dtype]  # n of the n x n x n product, its dtype
    refresh_shapes: list[tuple[int, int, int]]  # (m, n, r)
    step_models: list[tuple[str, dict, int, int, int]]  # (name, overrides, rank, micro-batch rows, seq)
    memory_model: tuple[str, dict, int, list[tuple[int, int]]]  # (name, overrides, rank, micro-batch shapes)
    rounds: int
    pretrain: list[str]  # overrides of the torchrun check
    resume_tolerance: float  # relative loss difference allowed after resume (GPU kernels may use atomics)
    needs: dict[str, float]  # item kind -> seconds it needs at least
    limits: dict[str, float]  # item kind -> seconds it may take at most


def plan_for(dry_run: bool) -> Plan:
    if dry_run:
        small = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=172, vocab_size=512)
        return Plan(
            device=torch.device("cpu"), yardstick=(256, torch.float32),
            refresh_shapes=[(64, 172, 16), (128, 344, 32)],
            step_models=[("tiny", small, 8, 2, 32), ("tiny", dict(small, n_layers=3), 8, 2, 32)],
            memory_model=("tiny", small, 8, [(1, 8), (2, 32)]), rounds=3,
            pretrain=["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "train.seq_len=32",
                      "train.batch_size=8", "train.micro_batch_size=4", "data.val_tokens=1024", "optim.rank=8"],
            resume_tolerance=0.0,
            needs=dict(env=2, pytest=10, pretrain=10, refresh=1, step=2, memory=1, compile=20),
            limits=dict(env=60, pytest=300, pretrain=300, refresh=60, step=120, memory=60, compile=240))
    return Plan(
        device=torch.device("cuda"), yardstick=(8192, torch.bfloat16),
        refresh_shapes=[(2048, 5461, 512), (4096, 11008, 1024)],
        step_models=[("llama_350m", {}, 256, 8, 1024), ("llama_1b", {}, 512, 8, 1024)],
        memory_model=("llama_1b", {}, 512, [(1, 64), (4, 1024)]), rounds=5,
        pretrain=["train.seq_len=128", "train.batch_size=16", "train.micro_batch_size=8", "data.val_tokens=4096"],
        resume_tolerance=1e-3,
        # needs: CUDA context, NCCL start-up and a model built on the device come first (guesses, not measured:
        # nothing has run on a GPU yet; a wrong guess costs a skip or a timeout, never the budget)
        # compile: the blocks' graph (training and its backward) once per model shape, inductor's cache cold
        needs=dict(env=10, pytest=30, pretrain=45, refresh=5, step=15, memory=15, compile=60),
        limits=dict(env=60, pytest=240, pretrain=240, refresh=120, step=180, memory=120, compile=180))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device):
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
