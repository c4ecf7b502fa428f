"""Damaged data files: a corrupt deflate stream and a zero-byte shard are skipped, counted and named like other
damaged shards (training and preprocess_c4 alike); a damaged indexed dataset is one line naming the file."""

import json
import logging
import struct
from pathlib import Path

import pytest

from datahelpers import (HAVE_MEGATRON, NO_MEGATRON, data_cfg, read_all, read_train_split, real_c4_records,
                         skip_without_megatron, write_corrupt_deflate_shard, write_shard)
from lotus_dist.data import DataError, build_train_stream, check_data
from lotus_dist.data.text_sources import LocalShardSource, find_shards

RECORDS = real_c4_records()
TEXTS = [r["text"] for r in RECORDS]


@pytest.fixture
def damaged_mirror(tmp_path):
    """Good shards around a shard whose deflate stream breaks after 4 documents and two zero-byte shards."""
    write_shard(tmp_path / "c4-train.00000-of-00005.json.gz", RECORDS[:6])
    write_corrupt_deflate_shard(tmp_path / "c4-train.00001-of-00005.json.gz", RECORDS[6:20], good=4)
    (tmp_path / "c4-train.00002-of-00005.json.gz").write_bytes(b"")  # an aborted download
    (tmp_path / "c4-train.00003-of-00005.jsonl").write_bytes(b"")
    write_shard(tmp_path / "c4-train.00004-of-00005.json.gz", RECORDS[20:])
    write_shard(tmp_path / "c4-validation.00000-of-00001.json.gz", RECORDS[:3])
    return tmp_path


def test_corrupt_deflate_and_zero_byte_shards_are_skipped_counted_and_named(damaged_mirror, caplog):
    caplog.set_level(logging.WARNING)
    files, source, docs = read_train_split(damaged_mirror)
    # every document of the good shards, in order, and at most the intact head of the corrupt one
    head = docs[6 : len(docs) - len(TEXTS[20:])]
    assert docs[:6] == TEXTS[:6] and docs[len(docs) - len(TEXTS[20:]):] == TEXTS[20:]
    assert head == TEXTS[6 : 6 + len(head)] and len(head) <= 4
    assert source.report.counts["corrupt_shard"] == 3 and source.report.counts["missing_shard"] == 0
    assert f"{files[1]}:{len(head) + 1}: unreadable (corrupt compressed data: Error -3" in caplog.text
    for empty in files[2:4]:
        assert f"{empty}: empty file (0 bytes); skipped" in caplog.text
    assert set(source.report.shards) == {str(f) for f in files[1:4]}


def test_a_zero_byte_shard_among_good_ones_is_warned_about_and_counted(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    write_shard(tmp_path / "c4-train.00000-of-00003.json.gz", RECORDS[:5])
    empty = tmp_path / "c4-train.00001-of-00003.json.gz"
    empty.write_bytes(b"")
    write_shard(tmp_path / "c4-train.00002-of-00003.json.gz", RECORDS[5:10])
    source = LocalShardSource(find_shards(tmp_path, "train"), shuffle_shards=False)
    assert read_all(source) == TEXTS[:10]
    assert source.report.counts["corrupt_shard"] == 1
    assert f"{empty}: empty file (0 bytes); skipped" in caplog.text


def test_training_stream_survives_a_corrupt_deflate_stream_over_epochs(damaged_mirror, tok):
    cfg = data_cfg(source="c4", path=str(damaged_mirror), shuffle_buffer=4, prefetch=2)
    stream = build_train_stream(cfg, tok, seq_len=64, micro_batch_size=2, rank=0, world_size=1, seed=0)
    try:
        while stream.epoch < 2:  # through the damaged shards twice
            next(stream)
        assert stream.stats["corrupt_shard"] >= 6
    finally:
        stream.close()


# ---- scripts/preprocess_c4.py ----------------------------------------------------------------------------------------

needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason=NO_MEGATRON)


@needs_megatron
def test_preprocess_skips_counts_and_names_damaged_shards(damaged_mirror, tmp_path, tok, capfd):
    from script_loader import load_script

    from lotus_dist.data.indexed import read_documents

    pre = load_script("scripts/preprocess_c4.py", "preprocess_c4")
    out = tmp_path / "tok"
    assert pre.main(["--input", str(damaged_mirror), "--output", str(out), "--workers", "2", "--splits",
                     "train"]) == 0
    prefix = out / "c4-train_text_document"
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    assert meta["bad_inputs"]["corrupt_shard"] == 3
    stored = [ids.tolist() for ids in read_documents(str(prefix))]
    good = TEXTS[:6] + TEXTS[20:]
    assert len(good) <= len(stored) <= len(good) + 4
    assert stored[:6] == [tok.encode(t) + [tok.eos_id] for t in TEXTS[:6]]
    err = capfd.readouterr().err
    files = find_shards(damaged_mirror, "train")
    for f in files[1:4]:
        assert str(f) in meta["damaged_shards"] and f"warning: damaged shard {f}: " in err
    assert "corrupt compressed data" in meta["damaged_shards"][str(files[1])]


# ---- indexed datasets: truncated .bin, garbage or truncated .idx ---------------------------------------------------


@pytest.fixture(scope="module")
def indexed_prefix(tmp_path_factory):
    skip_without_megatron()
    from script_loader import load_script

    root = tmp_path_factory.mktemp("indexed_damage")
    (root / "c4").mkdir()
    write_shard(root / "c4" / "c4-train.00000-of-00001.json.gz", RECORDS)
    write_shard(root / "c4" / "c4-validation.00000-of-00001.json.gz", RECORDS[:5])
    pre = load_script("scripts/preprocess_c4.py", "preprocess_c4")
    assert pre.main(["--input", str(root / "c4"), "--output", str(root / "tok"), "--workers", "1"]) == 0
    return root / "tok" / "c4-train_text_document"


def damaged_copy(prefix: Path, tmp_path: Path, suffix: str, content) -> Path:
    """A copy of ``prefix`` (with its sidecar) whose ``suffix`` file holds ``content(original bytes)``."""
    copy = tmp_path / prefix.name
    for s in (".bin", ".idx", ".json"):
        data = Path(str(prefix) + s).read_bytes()
        Path(str(copy) + s).write_bytes(content(data) if s == suffix else data)
    return copy


DAMAGE = [
    (".bin", lambda b: b[: len(b) // 2], "is truncated: "),  # a copy cut short
    (".idx", lambda b: bytes(range(256)) * (len(b) // 256 + 1), "is not a megatron index (bad header)"),
    (".idx", lambda b: b[:40], "is truncated: 40 bytes"),
    (".idx", lambda b: b[:9] + struct.pack("<Q", 7) + b[17:], "has version 7"),
]


@pytest.mark.parametrize("suffix, damage, needle", DAMAGE)
def test_a_damaged_indexed_dataset_is_one_line_naming_the_file(indexed_prefix, tmp_path, tok, suffix, damage,
                                                               needle):
    prefix = damaged_copy(indexed_prefix, tmp_path, suffix, damage)
    cfg = data_cfg(source="indexed", path=str(prefix), cache_dir=str(tmp_path / "cache"))
    for attempt in (lambda: check_data(cfg, tok, evaluate=False),
                    lambda: build_train_stream(cfg, tok, seq_len=16, micro_batch_size=2, rank=0, world_size=1,
                                               seed=0)):
        with pytest.raises(DataError) as e:
            attempt()
        msg = str(e.value)
        assert f"'{prefix}{suffix}'" in msg and needle in msg and "preprocess_c4.py" in msg and "\n" not in msg


def test_a_truncated_validation_prefix_is_refused_at_start_up(indexed_prefix, tmp_path, tok):
    val = Path(str(indexed_prefix).replace("train", "validation"))
    train = damaged_copy(indexed_prefix, tmp_path, ".bin", lambda b: b)
    damaged_copy(val, tmp_path, ".bin", lambda b: b[:-2])  # the sibling: one token short
    cfg = data_cfg(source="indexed", path=str(train), cache_dir=str(tmp_path / "cache"))
    check_data(cfg, tok, evaluate=False)  # training alone does not read it
    with pytest.raises(DataError, match=f"'{tmp_path / val.name}.bin' is truncated"):
        check_data(cfg, tok, evaluate=True)


def test_the_good_prefix_passes(indexed_prefix, tok, tmp_path):
    check_data(data_cfg(source="indexed", path=str(indexed_prefix)), tok, evaluate=True)
    stream = build_train_stream(data_cfg(source="indexed", path=str(indexed_prefix), cache_dir=str(tmp_path),
                                         prefetch=0), tok, seq_len=16, micro_batch_size=2, rank=0, world_size=1,
                                seed=0)
    assert next(stream).shape == (2, 17)
