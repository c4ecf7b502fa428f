"""Sources of documents for the text streams: one epoch of documents in a fixed order, with a JSON position.

- ``LocalShardSource`` reads local JSON-lines shards in C4's format (a local C4 mirror, or the embedded corpus,
  which is written in the same format) with its own robust line reader (damaged inputs: damage.py).
  Position: (epoch, shard cursor, line in shard).
- ``HFStreamSource`` reads the hub through ``datasets`` streaming. Position: HF's own ``state_dict()``.
- ``text_source`` picks the source of ``data.source`` (embedded or c4) for a split; ``find_shards`` lists a
  mirror's shards.

Rank split (``data.split``, ``auto``: ``global`` for the embedded corpus, else ``node``): ``node`` follows
``datasets.distributed.split_dataset_by_node``: whole shards per rank when the shard count divides by the world
size, else every world_size-th line; ``global``: every rank reads the whole stream and takes its slice of each global
batch (packing.py), so global batches do not depend on the world size.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .damage import READ_ERRORS, BadInputReport, open_shard, parse_line, read_error
from .errors import DataError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")


# --------------------------------------------------------------------------------------------------------------
# Finding shards


def _split_pattern(split: str) -> re.Pattern:
    # "train" in c4-train.00000-of-01024.json.gz; "validation" in c4-validation-sample.jsonl.gz
    return re.compile(rf"(?:^|[-_.]){split}(?:[-_.]|$)")


def find_shards(root: str | Path, split: str, key: str = "data.path", warn: bool = True) -> list[Path]:
    """Sorted ``*{split}*`` JSON-lines shards (``.json.gz``, ``.jsonl.gz``, ``.json``, ``.jsonl``) in ``root``
    or ``root/en`` (the layout of the allenai/c4 repository). ``warn``: say so when a mirror is incomplete."""
    root = Path(root).expanduser()
    what = f"option '{key}'" if key.startswith("--") else f"config key '{key}'"  # scripts name their options
    if not root.exists():
        raise DataError(f"{what}: data directory '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"{what}: '{root}' is not a directory")
    dirs = [root, root / "en"] if (root / "en").is_dir() else [root]
    pattern = _split_pattern(split)
    files = sorted(
        p
        for d in dirs
        for p in d.iterdir()
        if p.name.endswith(SHARD_SUFFIXES) and pattern.search(p.name.split(".json")[0] + ".")
    )
    if not files:
        raise DataError(f"{what}: no {split} shards (*{split}*.json[l][.gz]) in '{root}'")
    if warn:
        _warn_incomplete_mirror(files, split)
    return files


def _warn_incomplete_mirror(files: list[Path], split: str) -> None:
    """C4 names its shards '-of-01024': say so when a mirror holds only some of them."""
    totals = {int(m.group(1)) for f in files if (m := re.search(r"-of-(\d+)", f.name))}
    if len(totals) == 1:
        (total,) = totals
        if len(files) < total:
            log.warning("%s: the mirror holds %d of %d %s shards; training reads only those", files[0].parent,
                        len(files), total, split)


# --------------------------------------------------------------------------------------------------------------
# Sources: one epoch of documents in a fixed order, with a position (damaged inputs: damage.py)


class LocalShardSource:
    """Documents of local JSON-lines shards: per-epoch shuffled shard order, node split, exact position."""

    def __init__(self, files: list[Path], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_shards: bool = True, report: Optional[BadInputReport] = None):
        self.files = [str(f) for f in files]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_shards = shuffle_shards
        self.report = report or BadInputReport()
        # split_dataset_by_node's rule: whole shards when they divide evenly, else every world_size-th example.
        self.by_shard = len(self.files) % world_size == 0
        self._fh = None
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self._close()
        self.epoch = epoch
        self.cursor = 0  # index into this epoch's shard order
        self.line = 0  # lines consumed in the current shard
        self.seen = 0  # lines consumed in this epoch (example-level split)
        order = list(range(len(self.files)))
        if self.shuffle_shards:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        self.order = order[self.rank :: self.world_size] if self.by_shard else order

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open_current(self) -> bool:
        """Open the shard at the cursor and skip to ``self.line``; False when it is missing or unreadable."""
        path = self.files[self.order[self.cursor]]
        try:
            if os.path.getsize(path) == 0:  # an aborted download: no gzip header, read as an empty shard
                self.report.add("corrupt_shard", path, "empty file (0 bytes)", shard=path)
                return False
            self._fh = open_shard(path)
            for _ in range(self.line):
                if not self._fh.readline():
                    raise EOFError(f"shard has fewer than {self.line} lines")
            return True
        except FileNotFoundError:
            self.report.add("missing_shard", path, "shard does not exist", shard=path)
        except READ_ERRORS as e:
            self.report.add("corrupt_shard", f"{path}:{self.line}", f"unreadable ({read_error(e)})", shard=path)
        self._close()
        return False

    def _next_shard(self) -> None:
        self._close()
        self.cursor += 1
        self.line = 0

    def next_doc(self) -> Optional[str]:
        """The next document of this rank, or None when this epoch is over."""
        while self.cursor < len(self.order):
            if self._fh is None and not self._open_current():
                self._next_shard()
                continue
            path = self.files[self.order[self.cursor]]
            try:
                raw = self._fh.readline()
            except READ_ERRORS as e:  # a truncated or corrupt gzip stream
                self.report.add("corrupt_shard", f"{path}:{self.line + 1}",
                                f"unreadable ({read_error(e)}); rest of shard", shard=path)
                self._next_shard()
                continue
            if not raw:
                self._next_shard()
                continue
            self.line += 1
            self.seen += 1
            if not self.by_shard and (self.seen - 1) % self.world_size != self.rank:
                continue  # another rank's line: not even parsed, so each bad line is reported once
            text = parse_line(raw, f"{path}:{self.line}", self.report)
            if text is not None:
                return text
        self._close()
        return None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "line": self.line, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch(int(state["epoch"]))
        self.cursor, self.line, self.seen = int(state["cursor"]), int(state["line"]), int(state["seen"])

    def __del__(self):
        self._close()


class HFStreamSource:
    """Documents from a ``datasets`` streaming IterableDataset (the hub); position from HF's own state_dict.

    ``factory`` returns a fresh, unshuffled IterableDataset; the hub's shards are read in their own order every
    epoch and documents are shuffled by ShuffledDocs with seed+epoch.
    """

    def __init__(self, factory: Callable[[], Any], *, name: str, rank: int = 0, world_size: int = 1,
                 report: Optional[BadInputReport] = None):
        self.factory, self.name = factory, name
        self.rank, self.world_size = rank, world_size
        self.report = report or BadInputReport()
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.hf_state: Optional[dict] = None
        self._ds = None
        self._it: Optional[Iterator] = None
        self.count = 0

    def _open(self) -> None:
        from datasets.distributed import split_dataset_by_node

        ds = self.factory()
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if self.hf_state is not None:
            ds.load_state_dict(self.hf_state)
        self._ds, self._it = ds, iter(ds)

    def next_doc(self) -> Optional[str]:
        if self._it is None:
            self._open()
        while True:
            try:
                example = next(self._it)
            except StopIteration:
                return None
            except Exception as e:  # HF names the file or URL in its message
                raise DataError(f"{self.name}: reading failed after example {self.count}: {e}") from e
            self.count += 1
            text = example.get("text")
            if not isinstance(text, str) or not text.strip():
                self.report.add("empty", f"{self.name} example {self.count}", "empty or missing 'text'")
                continue
            return text

    def state_dict(self) -> dict:
        hf = self._ds.state_dict() if self._ds is not None else self.hf_state
        return {"epoch": self.epoch, "count": self.count, "hf": hf}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch(int(state["epoch"]))
        self.count = int(state["count"])
        self.hf_state = state["hf"]


# --------------------------------------------------------------------------------------------------------------
# Choosing the source of data.source


def hub_factory(name: str, config: str, split: str) -> Callable[[], Any]:
    def factory():
        from datasets import load_dataset

        return load_dataset(name, config, split=split, streaming=True)

    return factory


def text_source(data_cfg, split: str, *, rank: int, world_size: int, seed: int, shuffle_shards: bool = True):
    """The document source of ``data.source`` (embedded or c4) for ``split`` ('train' or 'validation')."""
    if data_cfg.source == "embedded":
        from .corpus import ensure_embedded_corpus

        root, key = ensure_embedded_corpus(data_cfg.cache_dir), "data.cache_dir"
    elif data_cfg.source == "c4" and data_cfg.path:
        root, key = data_cfg.path, "data.path"
    elif data_cfg.source == "c4":
        name = f"hub {data_cfg.hub_name}/{data_cfg.hub_config} {split}"
        return HFStreamSource(hub_factory(data_cfg.hub_name, data_cfg.hub_config, split), name=name, rank=rank,
                              world_size=world_size)
    else:
        raise DataError(f"config key 'data.source': {data_cfg.source!r} is not a text source")
    return LocalShardSource(find_shards(root, split, key), rank=rank, world_size=world_size, seed=seed,
                            shuffle_shards=shuffle_shards)


def resolve_split(data_cfg) -> str:
    """``data.split``, with ``auto`` resolved: ``global`` for the embedded corpus (a small local corpus every rank
    can read whole: the same batches at any world size), ``node`` for C4 (each rank reads only its part)."""
    split = getattr(data_cfg, "split", "node")
    if split == "auto":
        return "global" if data_cfg.source == "embedded" else "node"
    return split
