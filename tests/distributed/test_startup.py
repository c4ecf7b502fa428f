"""Meta-device start-up at the scale of a real recipe: llama_60m on 2 gloo ranks never holds the whole model on a
rank, and starts from exactly the single-process weights (the first loss is the same)."""

from __future__ import annotations

import pytest

from lotus_dist.train.metrics import read_events, read_metrics
from pretrain_launch import launch

pytestmark = pytest.mark.slow  # torchrun on llama_60m

# The command of issue 14's acceptance: llama_60m (vocab 32000: its embedding and head are the largest matrices).
ARGS = ["train.micro_batch_size=1", "train.seq_len=64", "train.batch_size=2", "train.steps=1", "train.eval_every=0",
        "data.source=embedded", "data.tokenizer=embedded", "data.val_tokens=4096", "log.progress=false",
        "log.tensorboard=false"]


def test_llama_60m_start_up_holds_half_the_model_per_rank_and_the_single_process_weights(tmp_path):
    import torch

    from lotus_dist.model.llama import Llama, llama_config

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    launch(2, [*ARGS, cache, f"run.dir={tmp_path / 'fsdp'}"], config="configs/llama_60m.yaml")
    launch(0, [*ARGS, cache, f"run.dir={tmp_path / 'single'}"], config="configs/llama_60m.yaml")
    (startup,) = read_events(tmp_path / "fsdp", "startup")
    with torch.device("meta"):
        model = Llama(llama_config("llama_60m"))
    largest = max(p.numel() * 4 for p in model.parameters())
    assert startup["model_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    # each rank's shards, one full matrix drawn at a time, and little else
    bound = startup["model_bytes"] / 2 + largest + 0.05 * startup["model_bytes"]
    assert startup["startup_peak_bytes"] <= bound, (startup, bound)
    (single,) = read_events(tmp_path / "single", "startup")
    assert single["startup_peak_bytes"] >= single["model_bytes"]  # one process holds it all, of course
    fsdp_loss, single_loss = read_metrics(tmp_path / "fsdp")[0]["loss"], read_metrics(tmp_path / "single")[0]["loss"]
    assert abs(fsdp_loss - single_loss) <= 1e-5 * abs(single_loss)
