"""Bad inputs are counted and reported with file and line, or fail with a one-line cause; nothing hangs."""

import gzip
import logging
import random

import pytest

from datahelpers import data_cfg, read_all, read_train_split, write_shard  # tests/data is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError, build_train_stream, build_val_blocks, load_tokenizer
from lotus_dist.data.text_sources import LocalShardSource, find_shards

GOOD = [{"text": f"good document number {i} with a few words"} for i in range(4)]


@pytest.fixture
def bad_mirror(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00003.json.gz", GOOD[:2], raw_lines=[
        b'{"text": "cut off in the mid\n',  # line 3: malformed JSON
        b'{"text": "   "}\n',  # line 4: empty document
        b'{"text": "caf\xe9 latin-1"}\n',  # line 5: not UTF-8
        b'{"url": "no text field"}\n',  # line 6: no text
        b"\n",  # a blank line is no document and no error
        b'{"text": "after the bad lines"}\n',
    ])
    write_shard(tmp_path / "c4-train.00001-of-00003.json", GOOD[2:])  # plain JSON lines, not gzipped
    return tmp_path


def test_bad_lines_are_skipped_counted_and_named(bad_mirror, caplog):
    caplog.set_level(logging.WARNING)
    files, source, docs = read_train_split(bad_mirror)
    assert docs == [r["text"] for r in GOOD[:2]] + ["after the bad lines"] + [r["text"] for r in GOOD[2:]]
    assert source.report.counts == {"malformed": 2, "empty": 1, "non_utf8": 1, "missing_shard": 0,
                                    "corrupt_shard": 0}
    shard = str(files[0])
    for line, why in [(3, "malformed JSON"), (4, "empty document"), (5, "not valid UTF-8"), (6, "no 'text'")]:
        assert f"{shard}:{line}: {why}" in caplog.text


def test_missing_and_truncated_shards(bad_mirror, caplog):
    caplog.set_level(logging.WARNING)
    files = find_shards(bad_mirror, "train")
    gone = bad_mirror / "c4-train.00002-of-00003.json.gz"  # listed, then removed before it is read
    truncated = bad_mirror / "c4-train.00003-of-00004.json.gz"
    rng = random.Random(0)
    lines = b"".join(b'{"text": "complete line %d %s"}\n' % (i, rng.randbytes(20).hex().encode())
                     for i in range(3000))
    truncated.write_bytes(gzip.compress(lines)[:-100])  # large enough that the first lines decompress
    source = LocalShardSource(files + [gone, truncated], shuffle_shards=False)
    docs = read_all(source)
    assert "complete line 0 " in docs[5]
    assert source.report.counts["missing_shard"] == 1
    assert source.report.counts["corrupt_shard"] == 1
    assert f"{gone}: shard does not exist" in caplog.text
    assert str(truncated) in caplog.text


def test_stream_reports_stats_and_keeps_them_in_its_state(bad_mirror, tok):
    cfg = data_cfg(source="c4", path=str(bad_mirror), shuffle_buffer=2)
    s = build_train_stream(cfg, tok, seq_len=8, micro_batch_size=2, rank=0, world_size=1, seed=0)
    for _ in range(20):
        next(s)
    assert s.stats["malformed"] >= 2 and s.stats["non_utf8"] >= 1
    assert s.state_dict()["docs"]["bad_inputs"] == s.stats


def test_missing_data_directory_is_one_line_naming_the_path(tmp_path, tok):
    missing = tmp_path / "nope"
    cfg = data_cfg(source="c4", path=str(missing))
    with pytest.raises(DataError) as err:
        build_train_stream(cfg, tok, seq_len=8, micro_batch_size=1, rank=0, world_size=1, seed=0)
    assert str(missing) in str(err.value) and "data.path" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        build_val_blocks(cfg, tok, seq_len=8)


def test_directory_without_shards(tmp_path, tok):
    (tmp_path / "readme.txt").write_text("no shards here")
    with pytest.raises(DataError, match="no train shards"):
        build_train_stream(data_cfg(source="c4", path=str(tmp_path)), tok, seq_len=8, micro_batch_size=1, rank=0,
                           world_size=1, seed=0)


def test_incomplete_mirror_is_reported(tmp_path, caplog):
    write_shard(tmp_path / "c4-train.00000-of-01024.json.gz", GOOD)
    find_shards(tmp_path, "train")
    assert "holds 1 of 1024 train shards" in caplog.text


def test_missing_tokenizer_names_path_and_key(tmp_path):
    with pytest.raises(DataError) as err:
        load_tokenizer(str(tmp_path / "missing.model"))
    msg = str(err.value)
    assert "data.tokenizer" in msg and "missing.model" in msg and "\n" not in msg


def test_bad_source_state_is_refused(bad_mirror, tok):
    cfg = data_cfg(source="c4", path=str(bad_mirror))
    s = build_train_stream(cfg, tok, seq_len=8, micro_batch_size=1, rank=0, world_size=1, seed=0)
    with pytest.raises(DataError, match="cannot resume"):
        s.load_state_dict({"version": 1, "kind": "indexed", "sample": 3})
