"""Damaged inputs of the text readers: what counts as unreadable, how a skipped input is counted and said.

A local shard may be missing, empty (0 bytes), truncated, or hold a corrupt deflate stream; a line may be malformed
JSON, not UTF-8, or an empty document. Each is skipped, counted by kind and logged with file and line (the first
``MAX_WARNINGS_PER_KIND`` of each kind), in training (text_sources.py) and in scripts/preprocess_c4.py alike.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from typing import Optional

log = logging.getLogger("lotus_dist.data.text_sources")  # the readers' logger (they live there)

MAX_WARNINGS_PER_KIND = 10  # per reader; C4 is large and one bad shard must not flood the log
BAD_KINDS = ("malformed", "empty", "non_utf8", "missing_shard", "corrupt_shard")
# What reading a damaged shard raises: gzip's BadGzipFile is an OSError, a truncated stream an EOFError, but a
# corrupt deflate block inside the stream is zlib.error, which derives from neither.
READ_ERRORS = (OSError, EOFError, zlib.error)


class BadInputReport:
    """Counts skipped inputs by kind and logs the first few of each kind with file and line. ``shards``: the
    damaged or missing shards by path, with why (bounded by the shard count), for summaries that name them."""

    def __init__(self, counts: Optional[dict] = None):
        self.counts = {kind: 0 for kind in BAD_KINDS}
        self.counts.update(counts or {})
        self._logged = {kind: 0 for kind in BAD_KINDS}
        self.shards: dict[str, str] = {}

    def add(self, kind: str, where: str, why: str, shard: Optional[str] = None) -> None:
        self.counts[kind] += 1
        self._logged[kind] += 1
        if shard is not None:
            self.shards[shard] = why
        if self._logged[kind] <= MAX_WARNINGS_PER_KIND:
            log.warning("%s: %s; skipped", where, why)
        elif self._logged[kind] == MAX_WARNINGS_PER_KIND + 1:
            log.warning("further '%s' inputs are skipped without a warning (counted in the stream's stats)", kind)


def open_shard(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_error(e: BaseException) -> str:
    """One line for a read failure: zlib's bare 'Error -3 while decompressing data: ...' says nothing of gzip."""
    kind = "corrupt compressed data" if isinstance(e, zlib.error) else type(e).__name__
    return f"{kind}: {e}"


def parse_line(raw: bytes, where: str, report: BadInputReport) -> Optional[str]:
    """The document text of one JSON line, or None (counted and warned) when the line is unusable."""
    raw = raw.strip()
    if not raw:
        return None  # a blank line (e.g. a trailing newline) is no document
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.add("non_utf8", where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        report.add("malformed", where, f"malformed JSON ({e.msg} at column {e.colno})")
        return None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        report.add("malformed", where, "no 'text' string field")
        return None
    if not text.strip():
        report.add("empty", where, "empty document")
        return None
    return text
