"""Hugging Face interop end to end: a 40-step run exported, loaded by transformers, imported and trained on."""

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from script_loader import load_script

from lotus_dist.data import build_train_stream, load_tokenizer
from lotus_dist.model.llama import Llama, LlamaConfig
from lotus_dist.train.config import load_config, merge_overrides
from pretrain_runs import run as pretrain  # tests/ is on sys.path (pyproject's pythonpath)
from lotus_dist.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # trains for a while: a 40-step run exported and trained on

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
EXPORT = REPO / "scripts" / "export_hf.py"
# torch 2.6 words it without "disabled, "
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")


def train(overrides):
    assert pretrain(overrides) == 0


EXPORTER = load_script("scripts/export_hf.py", "export_hf")


def export(*args, process=False):
    """The exporter's command line: in this process (fast), or as a real one; (returncode, stdout, stderr)."""
    if process:
        proc = subprocess.run([sys.executable, str(EXPORT), *map(str, args)], capture_output=True, text=True, cwd=REPO)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = EXPORTER.main(list(map(str, args)))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def checkpoint_model(path: Path) -> Llama:
    """Our model with a checkpoint's weights, read by DCP directly (not through the exporter)."""
    model = Llama(LlamaConfig(**json.loads((path / "train_state.json").read_text())["model"])).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(path))
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_args):
    root = tmp_path_factory.mktemp("hf")
    run_dir = root / "run"
    train([*small_args, "train.steps=40", "train.eval_every=0", "checkpoint.every=20", "checkpoint.keep=2",
           f"run.dir={run_dir}", f"data.cache_dir={root / 'cache'}"])
    return root, run_dir


def test_export_is_loaded_by_transformers_with_our_logits_and_tokens(run):
    root, run_dir = run
    out = root / "export"
    proc = export("--run-dir", run_dir, "--out", out, "--max-shard-size", "200KB", process=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[3/\d+\] model-00003-of-", proc.stdout)  # progress per shard
    config = json.loads((out / "config.json").read_text())
    assert config["lotus_dist"]["step"] == 40 and config["tie_word_embeddings"] is False
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = checkpoint_model(run_dir / "checkpoints" / "step_00000040")
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5

    hf_tok, sp = transformers.AutoTokenizer.from_pretrained(out), load_tokenizer("tokenizer/embedded.model")
    # prose with single spaces (leading spaces and runs of spaces may encode differently, see hf_tokenizer_files)
    lines = [" ".join(l.split()) for l in (REPO / "README.md").read_text().splitlines() if len(l.split()) > 3][:40]
    assert [hf_tok(l)["input_ids"] for l in lines] == [sp.encode(l) for l in lines]
    assert hf_tok.eos_token_id == sp.eos_id


def test_export_of_an_older_step_and_refusals(run):
    root, run_dir = run
    out = root / "export_20"
    assert export("--run-dir", run_dir, "--out", out, "--step", 20, "--dtype", "bf16").returncode == 0
    assert json.loads((out / "config.json").read_text())["lotus_dist"]["step"] == 20
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    state = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    ours = checkpoint_model(run_dir / "checkpoints" / "step_00000020")
    assert torch.equal(state["model.norm.weight"], ours.norm.weight.to(torch.bfloat16))

    refused = export("--run-dir", run_dir, "--out", out)
    assert refused.returncode == 2 and f"{out} exists and is not empty" in refused.stderr
    missing = export("--run-dir", run_dir, "--out", root / "x", "--step", 7)
    assert missing.returncode == 2 and "complete: 20, 40" in missing.stderr
    assert not (root / "x").exists() and not (root / "x.tmp").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_exported_file_follows_the_umask(run, tmp_path, umask):
    _, run_dir = run
    old = os.umask(umask)
    try:  # shards as well as the small files (safetensors writes its files 0600 by itself)
        assert export("--run-dir", run_dir, "--out", tmp_path / "out", "--max-shard-size", "200KB").returncode == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes) and "config.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_damaged_checkpoint_is_not_exported(run, tmp_path):
    _, run_dir = run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shard = next((copy / "checkpoints" / "step_00000040").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = export("--run-dir", copy, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "is damaged" in proc.stderr and "--step 20" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_imported_model_trains_on_from_the_exported_weights(run, small_args):
    """model.init_from=<export>: a fresh run's step-1 loss is the exported model's loss on the first batch."""
    root, run_dir = run
    out = root / "export_import"
    assert export("--run-dir", run_dir, "--out", out).returncode == 0
    args = [*small_args, "train.steps=2", "train.eval_every=0", "checkpoint.every=0",
            f"data.cache_dir={root / 'cache'}"]
    train([*args, f"model.init_from={out}", f"run.dir={root / 'imported'}"])
    first = read_metrics(root / "imported")[0]

    cfg = load_config(str(REPO / "configs/tiny.yaml"), merge_overrides(args))
    t = cfg.train
    stream = build_train_stream(cfg.data, load_tokenizer(cfg.data.tokenizer), seq_len=t.seq_len,
                                micro_batch_size=t.micro_batch_size, rank=0, world_size=1, seed=cfg.seed)
    model = checkpoint_model(run_dir / "checkpoints" / "step_00000040")
    accum = t.batch_size // t.micro_batch_size
    with torch.no_grad():
        expected = sum(model(b[:, :-1], b[:, 1:]) / accum for b in (next(stream) for _ in range(accum)))
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected.item(), rel=1e-6)



def test_import_of_another_shape_is_refused_in_one_line(run, small_args, capsys):
    root, run_dir = run
    out = root / "export_shape"
    assert export("--run-dir", run_dir, "--out", out).returncode == 0
    code = pretrain([*small_args, "train.steps=1", "model.ffn_dim=96", f"model.init_from={out}",
                     f"run.dir={root / 'bad'}", f"data.cache_dir={root / 'cache'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape [172, 64]" in err and "is [96, 64]" in err


@pytest.mark.parametrize("damage, needle", [
    (lambda out: (out / "config.json").write_text("[]"), "config.json holds a JSON list, not an object"),
    (lambda out: (out / "model.safetensors.index.json").write_text('{"weight_map": {'),
     "model.safetensors.index.json cannot be read (JSONDecodeError"),
    (lambda out: (out / "config.json").write_text(json.dumps(
        {**json.loads((out / "config.json").read_text()), "num_attention_heads": 2, "head_dim": None})),
     "num_attention_heads=2 but this run's model.n_heads is 4; set model.n_heads=2"),
])
def test_import_of_a_broken_or_other_folder_is_refused_in_one_line(run, small_args, capsys, tmp_path, damage, needle):
    """pretrain.py's model.init_from on a damaged export: exit 2 with one line, before any step."""
    root, run_dir = run
    out = tmp_path / "export"
    assert export("--run-dir", run_dir, "--out", out, "--max-shard-size", "200KB").returncode == 0
    damage(out)
    capsys.readouterr()
    code = pretrain([*small_args, "train.steps=1", f"model.init_from={out}", f"run.dir={tmp_path / 'bad'}",
                     f"data.cache_dir={root / 'cache'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "model.init_from" in err, err
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())
