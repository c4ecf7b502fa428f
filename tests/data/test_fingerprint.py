"""The tokenizer's fingerprint (sha256 of its model file): recorded beside indexed data by preprocess_c4, and
another model of the same vocabulary size and EOS is refused unless data.allow_tokenizer_change=true."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from datahelpers import data_cfg, real_c4_records, skip_without_megatron, write_shard
from tokenizer_copies import swapped_model  # tests/ is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError, build_train_stream, build_val_blocks, check_data, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_fingerprint_is_the_model_files_sha256_and_ignores_the_path(tok, tmp_path):
    data = Path(tok.path).read_bytes()
    assert tok.fingerprint == hashlib.sha256(data).hexdigest()[:16]
    copy = tmp_path / "copy.model"
    shutil.copy(tok.path, copy)
    assert load_tokenizer(str(copy)).fingerprint == tok.fingerprint
    other = load_tokenizer(str(swapped_model(tmp_path / "swapped.model")))
    assert (other.vocab_size, other.eos_id) == (tok.vocab_size, tok.eos_id)
    assert other.fingerprint != tok.fingerprint


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    skip_without_megatron()
    from script_loader import load_script

    root = tmp_path_factory.mktemp("fingerprint")
    (root / "c4").mkdir()
    records = real_c4_records()
    write_shard(root / "c4" / "c4-train.00000-of-00001.json.gz", records)
    write_shard(root / "c4" / "c4-validation.00000-of-00001.json.gz", records[:5])
    pre = load_script("scripts/preprocess_c4.py", "preprocess_c4")
    assert pre.main(["--input", str(root / "c4"), "--output", str(root / "tok"), "--workers", "1"]) == 0
    return root / "tok" / "c4-train_text_document"


def test_preprocess_records_the_fingerprint(prefix, tok):
    for p in (prefix, Path(str(prefix).replace("train", "validation"))):
        assert json.loads(Path(str(p) + ".json").read_text())["tokenizer_fingerprint"] == tok.fingerprint


def test_another_model_of_the_same_size_is_refused_unless_allowed(prefix, tok, tmp_path, caplog):
    other = load_tokenizer(str(swapped_model(tmp_path / "swapped.model")))
    cfg = data_cfg(source="indexed", path=str(prefix), cache_dir=str(tmp_path / "cache"), prefetch=0)
    for attempt in (lambda: check_data(cfg, other, evaluate=True),
                    lambda: build_train_stream(cfg, other, seq_len=16, micro_batch_size=2, rank=0, world_size=1,
                                               seed=0),
                    lambda: build_val_blocks(cfg, other, seq_len=16)):
        with pytest.raises(DataError) as e:
            attempt()
        msg = str(e.value)
        assert other.fingerprint in msg and tok.fingerprint in msg and "\n" not in msg
        assert "data.allow_tokenizer_change=true" in msg and str(prefix.parent) in msg
    cfg.allow_tokenizer_change = True
    caplog.set_level(logging.WARNING)
    check_data(cfg, other, evaluate=True)
    assert next(build_train_stream(cfg, other, seq_len=16, micro_batch_size=2, rank=0, world_size=1,
                                   seed=0)).shape == (2, 17)
    assert "data.allow_tokenizer_change=true" in caplog.text and other.fingerprint in caplog.text
    check_data(data_cfg(source="indexed", path=str(prefix)), tok, evaluate=True)  # its own tokenizer passes


def test_data_without_a_recorded_fingerprint_keeps_the_size_and_eos_checks(prefix, tok, tmp_path):
    old = tmp_path / prefix.name  # a dataset preprocessed before fingerprints were recorded
    for s in (".bin", ".idx"):
        shutil.copy(str(prefix) + s, str(old) + s)
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    del meta["tokenizer_fingerprint"]
    Path(str(old) + ".json").write_text(json.dumps(meta))
    other = load_tokenizer(str(swapped_model(tmp_path / "swapped.model")))
    check_data(data_cfg(source="indexed", path=str(old)), other, evaluate=False)  # same size and EOS: accepted
    meta["vocab_size"] = 300
    Path(str(old) + ".json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocab 300"):
        check_data(data_cfg(source="indexed", path=str(old), allow_tokenizer_change=True), tok, evaluate=False)


def test_the_config_key_is_a_bool(tmp_path):
    from lotus_dist.train.config import ConfigError, load_config

    assert load_config(None, ["data.allow_tokenizer_change=true"]).data.allow_tokenizer_change is True
    assert load_config(None, []).data.allow_tokenizer_change is False
    with pytest.raises(ConfigError, match="data.allow_tokenizer_change': expected true/false"):
        load_config(None, ["data.allow_tokenizer_change=maybe"])
