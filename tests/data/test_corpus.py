"""The embedded Shakespeare corpus in C4 format."""

import gzip
import json
from pathlib import Path

from lotus_dist.data.corpus import (
    TRAIN_SHARDS,
    VALIDATION_EVERY,
    embedded_documents,
    ensure_embedded_corpus,
    shakespeare_texts,
    split_documents,
    strip_gutenberg,
)


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_source_texts():
    files = shakespeare_texts()
    assert len(files) == 42
    assert not any(f.name.endswith("_gut_f.txt") for f in files)


def test_layout_split_and_content(cache_dir):
    root = Path(cache_dir) / "embedded"
    names = sorted(p.name for p in root.glob("*.json.gz"))
    assert names == [f"c4-train.{k:05d}-of-{TRAIN_SHARDS:05d}.json.gz" for k in range(TRAIN_SHARDS)] + [
        "c4-validation.00000-of-00001.json.gz"]
    train = [r for k in range(TRAIN_SHARDS) for r in read(root / names[k])]
    val = read(root / names[-1])
    docs = embedded_documents()
    assert [r["text"] for r in val] == docs[VALIDATION_EVERY - 1 :: VALIDATION_EVERY]
    assert len(train) + len(val) == len(docs) > 1000
    assert all(set(r) == {"text"} for r in train + val)
    sizes = sorted(len(r["text"]) for r in train)
    assert 300 <= sizes[0] and sizes[-1] <= 6000 and 2000 < sizes[len(sizes) // 2] < 5000  # a few KB each
    assert not any("Gutenberg" in r["text"] or "ELECTRONIC VERSION" in r["text"] for r in train + val)


def test_reused_when_present_and_rebuilt_when_incomplete(cache_dir):
    root = Path(cache_dir) / "embedded"
    shard = root / "c4-train.00001-of-00004.json.gz"
    before = shard.stat().st_mtime_ns
    assert ensure_embedded_corpus(cache_dir) == root
    assert shard.stat().st_mtime_ns == before
    data = shard.read_bytes()
    shard.unlink()
    ensure_embedded_corpus(cache_dir)
    assert shard.read_bytes() == data  # deterministic bytes (gzip mtime 0)
    assert not list(root.glob(".*tmp"))


def test_strip_gutenberg_boilerplate():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence blah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\n"
            "HAMLET\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT\nBY WORLD LIBRARY>>\n"
            "To be, or not to be.\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence again")
    assert strip_gutenberg(text) == "HAMLET\n\nTo be, or not to be."


def test_split_by_scene_and_chunk_long_scenes():
    scene = "\n\n".join(f"KING.\nLine {i} of a long speech that goes on." for i in range(400))
    text = f"A PLAY\n\nPERSONS.\n{'x' * 400}\n\nACT I.\n\nScene I. A hall.\n\n{scene}\n\nSCENE II. Outside.\n\n" + (
        "QUEEN.\nShort scene.\n\n" * 20)
    docs = split_documents(text)
    assert docs[0].startswith("A PLAY")
    assert docs[1].startswith("ACT I.\n\nScene I.")  # the act heading joins its first scene
    assert any(d.startswith("SCENE II.") for d in docs)
    assert all(len(d) <= 6000 for d in docs) and len(docs) > 4
