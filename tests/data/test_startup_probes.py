"""Start-up refusals before the model is built, in one line naming cause and fix: a model vocabulary smaller than
the tokenizer's, and the hub (C4 streaming, hf: tokenizers) without a network. "No network" is a hub endpoint that
refuses connections (HF_ENDPOINT=http://127.0.0.1:9): nothing here needs the network, and the probe answers at
once instead of after huggingface_hub's ~25 s of retries per file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datahelpers import hub_cache  # tests/data is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError
from lotus_dist.train.config import merge_overrides
from pretrain_runs import SMALL as SMALL_RUN, run  # tests/ likewise

REPO = Path(__file__).resolve().parents[2]
NO_HUB = "http://127.0.0.1:9"  # the discard port: connection refused
HANG_LIMIT_S = 300  # a bound for a stuck child, far above the few seconds these take
SMALL = merge_overrides(SMALL_RUN, ["train.steps=2"])  # each case is refused at start-up: 2 steps bound a miss


def one_error_line(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-3000:]
    return err


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path, capsys, tok):
    assert run([*SMALL, f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}",
                "model.vocab_size=100"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "'model.vocab_size' (100)" in err and f"({tok.vocab_size} ids)" in err and tok.path in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))
    from lotus_dist.data import check_vocab

    check_vocab(tok.vocab_size, tok)  # equal or larger is fine (a padded embedding)
    check_vocab(tok.vocab_size + 64, tok)
    with pytest.raises(DataError, match=f">= {tok.vocab_size}"):
        check_vocab(tok.vocab_size - 1, tok)


def hub_env(tmp_path: Path, offline: bool = False, hub_cache_dir: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=NO_HUB, HF_HOME=str(tmp_path / "hf_home"))  # an empty cache
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if hub_cache_dir is not None:
        env["HF_HUB_CACHE"] = str(hub_cache_dir)
    return env


def run_child(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)


def pretrain(tmp_path: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return run_child(["pretrain.py", "--config", "configs/tiny.yaml", *SMALL, f"run.dir={tmp_path / 'run'}",
                      f"data.cache_dir={tmp_path / 'cache'}", *overrides], env)


@pytest.mark.parametrize("offline, needles", [
    (False, ["there is no network", NO_HUB, "data.path=", "HF_HUB_OFFLINE=1"]),
    (True, ["cannot be opened from the Hugging Face cache (HF_HUB_OFFLINE=1)", "data.path="]),
])
def test_c4_from_the_hub_without_network_stops_at_start_up(tmp_path, offline, needles):
    proc = pretrain(tmp_path, hub_env(tmp_path, offline=offline), "data.source=c4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = one_error_line(proc.stderr)
    assert "'allenai/c4/en'" in err and all(n in err for n in needles), err
    assert "Retrying" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_hub_tokenizer_without_network_says_so_at_once(tmp_path):
    proc = pretrain(tmp_path, hub_env(tmp_path), "data.tokenizer=hf:google-t5/t5-base")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = one_error_line(proc.stderr)
    for needle in ("'data.tokenizer': no network to fetch 'hf:google-t5/t5-base'", NO_HUB, "HF_HUB_OFFLINE=1",
                   "local .model file"):
        assert needle in err, err
    assert "Retrying" not in proc.stderr + proc.stdout  # no retry loop: the probe answered


def test_a_cached_hub_tokenizer_still_loads_without_network(tmp_path):
    cache = hub_cache(tmp_path / "hub")
    code = "from lotus_dist.data import load_tokenizer; t = load_tokenizer('hf:google-t5/t5-base'); print(t.path)"
    proc = run_child(["-c", code], hub_env(tmp_path, hub_cache_dir=cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("spiece.model") and str(cache) in proc.stdout
    assert "Retrying" not in proc.stderr
