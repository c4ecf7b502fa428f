"""Builders of small C4-format mirrors and configs for the data tests."""

import gzip
import importlib.util
import json
import zlib
from pathlib import Path

import pytest

from lotus_dist.train.config import DataConfig

REPO = Path(__file__).resolve().parents[2]
SHARED_C4 = REPO.parent / "shared" / "data" / "c4"
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def synthetic_text(i: int, n_words: int) -> str:
    return f"doc {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n_words))


def write_shard(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    """A C4-format shard: one JSON object a line (gzip when the name ends with .gz), then ``raw_lines`` as is."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"".join(raw_lines)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def make_mirror(root: Path, n_train_shards: int = 4, docs_per_shard: int = 6, n_val: int = 5) -> Path:
    """A small synthetic mirror in both schemas: C4's {text,url,timestamp} and Dolma's {text,id,added,...}."""
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_train_shards):
        records = []
        for _ in range(docs_per_shard):
            text = synthetic_text(k, 20 + (k * 13) % 60)
            if k % 2:
                records.append({"text": text, "url": f"https://example.com/{k}", "timestamp": "2019-04-25T10:18:53Z"})
            else:
                records.append({"text": text, "id": f"id-{k}", "added": "2023-04-01", "source": "c4", "tokens": 3})
            k += 1
        write_shard(root / f"c4-train.{s:05d}-of-{n_train_shards:05d}.json.gz", records)
    val = [{"text": synthetic_text(1000 + i, 80), "url": "u", "timestamp": "t"} for i in range(n_val)]
    write_shard(root / "c4-validation.00000-of-00001.json.gz", val)
    return root


def mirror_docs(root: Path, split: str = "train") -> list[str]:
    docs = []
    for f in sorted(root.glob(f"*{split}*")):
        with gzip.open(f, "rt") as fh:
            docs.extend(json.loads(line)["text"] for line in fh if line.strip())
    return docs


def data_cfg(**kw) -> DataConfig:
    cfg = DataConfig()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


SEQ = 16  # the sequence length of the text stream tests


def stream(cfg, tok, rank=0, world=1, mb=2, seed=0):
    """The training stream of ``cfg`` for one rank, cut in blocks of SEQ + 1 tokens."""
    from lotus_dist.data import build_train_stream

    return build_train_stream(cfg, tok, seq_len=SEQ, micro_batch_size=mb, rank=rank, world_size=world, seed=seed)


def take(s, n):
    return [next(s) for _ in range(n)]


def json_roundtrip(state):
    return json.loads(json.dumps(state))  # the state must be JSON, not pickled objects


def real_c4_records() -> list[dict]:
    """The real C4 documents of ../shared/data/c4 (30), else synthetic ones of C4's schema."""
    files = sorted(SHARED_C4.glob("c4-sample.*.json.gz")) if SHARED_C4.is_dir() else []
    records = [json.loads(line) for f in files for line in gzip.open(f, "rt") if line.strip()]
    return records or [{"text": synthetic_text(i, 200), "url": "u", "timestamp": "t"} for i in range(30)]


def write_corrupt_deflate_shard(path: Path, records: list, good: int) -> Path:
    """A gzip shard whose deflate stream is intact for ``good`` records, then a block with the invalid type 3:
    reading past them raises zlib.error (not OSError), as a bit flip in a downloaded shard does."""
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip framing
    head = c.compress(b"".join(lines[:good])) + c.flush(zlib.Z_FULL_FLUSH)  # byte-aligned: the next block starts here
    tail = c.compress(b"".join(lines[good:])) + c.flush()
    path.write_bytes(head + b"\x06" + tail[1:])  # block header: BFINAL=0, BTYPE=11 (reserved)
    return path


def hub_cache(root: Path, repo: str = "google-t5/t5-base", filename: str = "spiece.model") -> Path:
    """``models--org--name/{refs/main, snapshots/<commit>/<file>}``: what one download leaves in HF_HUB_CACHE."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    (entry / "snapshots" / commit).mkdir(parents=True)
    (entry / "snapshots" / commit / filename).write_bytes((REPO / "tokenizer" / "embedded.model").read_bytes())
    return root


def read_all(source) -> list:
    """Every document of a source, in order."""
    docs = []
    while (doc := source.next_doc()) is not None:
        docs.append(doc)
    return docs


def read_train_split(root: Path):
    """(files, source, docs): a mirror's train shards read in file order by one source, to the end."""
    from lotus_dist.data.text_sources import LocalShardSource, find_shards

    files = find_shards(root, "train")
    source = LocalShardSource(files, shuffle_shards=False)
    return files, source, read_all(source)


HAVE_MEGATRON = (importlib.util.find_spec("megatron") is not None
                 and importlib.util.find_spec("megatron.core") is not None)
NO_MEGATRON = "megatron-core is not installed (pip install -e .[megatron])"


def skip_without_megatron() -> None:
    """In a fixture of indexed data: skip its tests where the megatron-core extra is missing."""
    if not HAVE_MEGATRON:
        pytest.skip(NO_MEGATRON)
