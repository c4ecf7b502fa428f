"""Checkpoint manifests: every file of a checkpoint with its size and CRC-32, proven before the checkpoint loads.

DCP keeps no checksum, so a truncated or bit-flipped shard would load silently. Each rank lists the files it wrote
(its DCP shards, its data position and RNG files; rank 0 also ``.metadata`` and ``train_state.json``) in
``manifest_rank_NNNNN.json``, with checksums it computes itself right after writing (in the background writer for
asynchronous saves), so no rank ever reads another rank's files to write a checkpoint. Verification splits the
files of all manifests round-robin over the ranks of the loading run, whatever world size wrote them.

CRC-32 (``zlib.crc32``, ~4 GB/s per core here) is ample for detecting damage and needs nothing beyond the standard
library; a 7B checkpoint on 64 ranks is ~0.7 GB per rank, a fraction of a second to check.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST = "manifest_rank_{:05d}.json"
_CHUNK = 16 << 20


class ManifestError(Exception):
    """A manifest is missing or unreadable: the checkpoint cannot be proven good."""


def digest(path: Path) -> dict:
    """``{"bytes": size, "crc32": "8 hex digits"}`` of one file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def write_manifest(directory: Path, rank: int, world_size: int, names: list[str]) -> None:
    """List ``names`` (files in ``directory`` written by this rank) with their digests; fsync'ed, written whole."""
    entries = {name: digest(directory / name) for name in sorted(set(names))}
    path = directory / MANIFEST.format(rank)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "world_size": world_size, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_manifests(directory: Path, world_size: int) -> dict[str, dict]:
    """The files of all ``world_size`` manifests of ``directory``: name -> digest. Raises ManifestError."""
    files: dict[str, dict] = {}
    for rank in range(world_size):
        name = MANIFEST.format(rank)
        try:
            data = json.loads((directory / name).read_text())
            files.update(data["files"])
        except FileNotFoundError:
            raise ManifestError(f"{name} is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{name} is unreadable ({type(e).__name__})") from None
    return files


def check_file(directory: Path, name: str, expected: dict) -> str | None:
    """None if ``name`` matches its manifest entry, else a short description of what is wrong."""
    path = directory / name
    try:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, its manifest says {expected['bytes']}"
        actual = digest(path)
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} cannot be read ({e.strerror})"
    if actual["crc32"] != expected["crc32"]:
        return f"{name} fails its checksum (crc32 {actual['crc32']}, manifest {expected['crc32']})"
    return None


__all__ = ["MANIFEST", "ManifestError", "check_file", "digest", "read_manifests", "write_manifest"]
