"""The packing of documents into blocks (packing.py): format, no padding, determinism, exact resume, rank splits of
batches, validation blocks."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from datahelpers import SEQ, data_cfg, json_roundtrip, mirror_docs, stream, take
from lotus_dist.data import build_val_blocks
from lotus_dist.data.shuffle import ShuffledDocs
from lotus_dist.data.text_sources import LocalShardSource, find_shards


# ---- format and packing ----------------------------------------------------------------------------------------------


def test_embedded_stream_shapes(tok, cache_dir):
    s = stream(data_cfg(source="embedded", cache_dir=cache_dir), tok, mb=4)
    batch = next(s)
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.long
    assert 0 <= batch.min() and batch.max() < tok.vocab_size


def test_packing_has_no_padding_and_carries_the_remainder(tok, mirror):
    # shuffle_buffer=1 and one shard in file order: the stream is exactly the documents + EOS, cut with stride SEQ
    files = find_shards(mirror, "train")
    source = LocalShardSource(files[:1], shuffle_shards=False)
    expected = []
    for doc in mirror_docs(mirror)[:6]:
        expected += tok.encode(doc) + [tok.eos_id]
    # prefetch=0: the bare TokenStream, whose documents are replaced below
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=1, prefetch=0)
    s = stream(cfg, tok, mb=1)
    s.docs = ShuffledDocs(source, buffer_size=1, seed=0)
    blocks = [next(s)[0] for _ in range(len(expected) // SEQ)]
    for i in range(len(blocks) - 1):
        assert blocks[i][-1] == blocks[i + 1][0]  # stride seq_len: every token is a target exactly once
    flat = torch.cat([blocks[0]] + [b[1:] for b in blocks[1:]]).tolist()
    assert flat == expected[: len(flat)]
    assert tok.eos_id in flat


def test_stream_is_deterministic_for_a_seed(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=8)
    a, b, c = (take(stream(cfg, tok, seed=s), 5) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ---- exact resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["node", "global"])
@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(tok, mirror, split, world):
    """Stop after k batches (mid-epoch, then again past an epoch boundary), restore, and compare."""
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split=split)
    for rank in range(world):
        full = stream(cfg, tok, rank, world)
        reference = take(full, 60)  # a few epochs of the small mirror
        assert full.epoch >= 1
        for k in (3, 25):
            s = stream(cfg, tok, rank, world)
            take(s, k)
            state = json_roundtrip(s.state_dict())
            resumed = stream(cfg, tok, rank, world)
            resumed.load_state_dict(state)
            got = take(resumed, 60 - k)
            assert all(torch.equal(x, y) for x, y in zip(got, reference[k:])), (split, world, rank, k)


def test_exact_resume_embedded(tok, cache_dir):
    cfg = data_cfg(source="embedded", cache_dir=cache_dir, shuffle_buffer=50)
    s = stream(cfg, tok, 1, 2)
    take(s, 7)
    state = json_roundtrip(s.state_dict())
    reference = take(s, 10)
    resumed = stream(cfg, tok, 1, 2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 10), reference))


def test_global_state_resumes_at_another_world_size(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split="global")
    two = [stream(cfg, tok, r, 2, mb=2) for r in range(2)]
    for _ in range(4):
        for s in two:
            next(s)
    state = json_roundtrip(two[0].state_dict())
    other = json_roundtrip(two[1].state_dict())
    assert {**state, "rank": None} == {**other, "rank": None}  # the position is the same on every rank
    reference = [torch.cat([next(s) for s in two]) for _ in range(5)]
    one = stream(cfg, tok, 0, 1, mb=4)
    one.load_state_dict(state)
    assert all(torch.equal(next(one), ref) for ref in reference)


# ---- rank splits of batches ------------------------------------------------------------------------------------------


def test_node_split_token_streams_differ_per_rank(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=4)
    a, b = next(stream(cfg, tok, 0, 2)), next(stream(cfg, tok, 1, 2))
    assert not torch.equal(a, b)


def test_global_split_batches_do_not_depend_on_world_size(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split="global")
    global_batch = 4
    batches = {}
    for world in (1, 2, 4):
        streams = [stream(cfg, tok, r, world, mb=global_batch // world) for r in range(world)]
        batches[world] = [torch.cat([next(s) for s in streams]) for _ in range(6)]
    for world in (2, 4):
        assert all(torch.equal(x, y) for x, y in zip(batches[1], batches[world]))


# ---- validation blocks -----------------------------------------------------------------------------------------------


def test_val_blocks(tok, cache_dir):
    cfg = data_cfg(source="embedded", cache_dir=cache_dir, val_tokens=1000)
    blocks = build_val_blocks(cfg, tok, seq_len=SEQ)
    assert blocks.shape == (1000 // SEQ, SEQ + 1)
    assert torch.equal(blocks[:-1, -1], blocks[1:, 0])
    assert torch.equal(blocks, build_val_blocks(cfg, tok, seq_len=SEQ))  # no rank, no shuffle: always the same
    first = find_shards(Path(cache_dir) / "embedded", "validation")[0]
    with gzip.open(first, "rt") as fh:
        first_doc = json.loads(fh.readline())["text"]
    assert blocks[0].tolist() == tok.encode(first_doc)[: SEQ + 1]


def test_val_blocks_shorter_split_warns(tok, mirror, caplog):
    cfg = data_cfg(source="c4", path=str(mirror), val_tokens=10**6)
    blocks = build_val_blocks(cfg, tok, seq_len=SEQ)
    assert 0 < blocks.shape[0] < 10**6 // SEQ
    assert "less than data.val_tokens" in caplog.text
