"""model.init_from under torchrun: fsdp and ddp start from a Hugging Face folder's weights (one tensor at a time,
each rank keeping its part) and take the same first step as one process computing the loss directly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lotus_dist.data import build_train_stream, load_tokenizer
from lotus_dist.model.hf import hf_config, hf_name
from lotus_dist.model.llama import Llama, LlamaConfig
from lotus_dist.train.config import load_config, merge_overrides
from lotus_dist.train.metrics import read_metrics
from pretrain_launch import REPO, SMALL, launch

pytestmark = pytest.mark.slow  # torchrun runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random LLaMA of the SMALL shape as a save_pretrained-style folder."""
    path = tmp_path_factory.mktemp("hf_import")
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=load_tokenizer("tokenizer/embedded.model").vocab_size, dim=64, n_layers=2,
                      n_heads=4, ffn_dim=172, max_seq_len=512)
    model = Llama(cfg)
    save_file({hf_name(n): p.detach().contiguous() for n, p in model.named_parameters()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(cfg, dtype=torch.float32, bos_id=1, eos_id=2)))
    return path, model


def first_batch_loss(model, args) -> float:
    cfg = load_config(str(REPO / "configs/tiny.yaml"), merge_overrides(args))
    t = cfg.train
    stream = build_train_stream(cfg.data, load_tokenizer(cfg.data.tokenizer), seq_len=t.seq_len,
                                micro_batch_size=t.batch_size, rank=0, world_size=1, seed=cfg.seed)
    batch = next(stream)  # the whole global batch of step 1 (data.split=global: the same at any world size)
    with torch.no_grad():
        return model(batch[:, :-1], batch[:, 1:]).item()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_init_from_in_every_mode_gives_the_first_loss_of_those_weights(tmp_path, folder, mode):
    path, model = folder
    args = [*SMALL, "train.steps=1", "train.eval_every=0", "checkpoint.every=0", f"data.cache_dir={tmp_path / 'c'}"]
    proc = launch(2, [*args, f"dist.mode={mode}", f"model.init_from={path}", f"run.dir={tmp_path / mode}"])
    assert f"initialising the model from {path}" in proc.stdout
    loss = read_metrics(tmp_path / mode)[0]["loss"]
    assert loss == pytest.approx(first_batch_loss(model, args), rel=1e-5)


def test_init_from_a_folder_of_another_function_is_refused_on_every_rank(tmp_path, folder):
    """Same shapes, another function (half the heads): fsdp at 2 ranks stops before step 1 with one line."""
    path, _ = folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").symlink_to(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2, "head_dim": None}))
    args = [*SMALL, "train.steps=1", "train.eval_every=0", "checkpoint.every=0", f"data.cache_dir={tmp_path / 'c'}"]
    proc = launch(2, [*args, "dist.mode=fsdp", f"model.init_from={other}", f"run.dir={tmp_path / 'run'}"],
                  check=False)
    assert proc.returncode != 0 and "num_attention_heads=2 but this run's model.n_heads is 4" in proc.stderr
    assert "UserError" not in proc.stderr  # one line from each rank, no Python traceback
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run")


def test_hub_tokenizer_under_torchrun_offline_from_the_cache(tmp_path):
    """data.tokenizer=hf:<repo> at 2 ranks with HF_HUB_OFFLINE=1 over a cache laid out as huggingface_hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = tmp_path / "hub" / "models--google-t5--t5-base"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    (entry / "snapshots" / commit).mkdir(parents=True)
    (entry / "snapshots" / commit / "spiece.model").write_bytes((REPO / "tokenizer" / "embedded.model").read_bytes())
    args = [*SMALL, "train.steps=2", "train.eval_every=0", "checkpoint.every=0", f"data.cache_dir={tmp_path / 'c'}"]
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    launch(2, [*args, "data.tokenizer=hf:google-t5/t5-base", f"run.dir={tmp_path / 'hub_run'}"], env=env)
    launch(0, [*args, f"run.dir={tmp_path / 'file_run'}"])  # the same model file by path
    hub, local = read_metrics(tmp_path / "hub_run"), read_metrics(tmp_path / "file_run")
    assert [l["loss"] for l in hub] == pytest.approx([l["loss"] for l in local], rel=1e-4)
    failed = launch(2, [*args, "data.tokenizer=hf:google-t5/t5-small", f"run.dir={tmp_path / 'missing'}"], env=env,
                    check=False)
    assert failed.returncode != 0 and "hf:google-t5/t5-small' has no sentencepiece model in reach" in failed.stderr
    assert "DataError" not in failed.stderr  # one line from each rank, no Python traceback (torchrun adds its own)
