"""C4-format text streams: read, shuffle, tokenize, pack into ``seq_len + 1`` blocks, split across ranks, resume.

Layers, each with an explicit, JSON-serialisable position so that a resumed stream yields exactly the same tokens:

- a *source* yields documents in a fixed order for one epoch:
  ``LocalShardSource`` reads a local mirror (or the embedded corpus, which is written in the same format) with its
  own robust line reader; ``HFStreamSource`` reads the hub through ``datasets`` streaming.
  Position: (epoch, shard cursor, line in shard) for local files, HF's own ``state_dict()`` for the hub.
- ``ShuffledDocs`` shuffles documents with a seeded buffer and runs epochs forever (reshuffled with seed+epoch).
  Its state stores the buffered texts and the RNG state. This scales: the checkpoint grows with
  ``data.shuffle_buffer`` times the document size (about 2 MB for 1000 C4 documents), never with the data set,
  and resuming re-opens one shard and skips at most one shard's lines instead of replaying the epoch.
  (HF's ``IterableDataset.state_dict`` restarts its shuffle buffer empty, so its shuffle is not used.)
- ``TokenStream`` tokenizes, appends EOS and cuts blocks of ``seq_len + 1`` tokens with stride ``seq_len``: the
  last token of a block is the first of the next, so every token is a target exactly once and nothing is padded
  (Megatron's GPTDataset cuts its samples the same way). The remainder carries to the next block.

Rank split (``data.split``, ``auto``: ``global`` for the embedded corpus, else ``node``): ``node`` follows ``datasets.distributed.split_dataset_by_node``: whole shards per rank
when the shard count divides by the world size, else every world_size-th line; ``global``: every rank reads the
whole stream and takes its slice of each global batch, so global batches do not depend on the world size.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .damage import BAD_KINDS, READ_ERRORS, BadInputReport, open_shard, parse_line, read_error  # noqa: F401
from .errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1
ENCODE_BATCH = 16  # documents tokenized together (sentencepiece threads); their tokens wait in the stream state
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
# Shuffle buffer + epochs


class ShuffledDocs:
    """Endless documents: a seeded shuffle buffer over a source, epoch after epoch (reshuffled with seed+epoch).

    Each epoch is drained completely before the next begins, so an epoch holds each of the rank's documents once.
    """

    def __init__(self, source, *, buffer_size: int, seed: int, tag: str = "0"):
        self.source = source
        self.buffer_size = max(1, buffer_size)  # 1: no shuffling
        self.seed, self.tag = seed, tag
        self.buffer: list[str] = []
        self.exhausted = False  # the source has no more documents this epoch; the buffer is draining
        self.docs_in_epoch = 0
        self._set_epoch(0)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # A str seed is hashed with SHA-512: the same sequence in every process, whatever PYTHONHASHSEED.
        self.rng = random.Random(f"docs-{self.seed}-{self.tag}-{epoch}")

    def next_doc(self) -> str:
        while True:
            while not self.exhausted and len(self.buffer) < self.buffer_size:
                doc = self.source.next_doc()
                if doc is None:
                    self.exhausted = True
                else:
                    self.buffer.append(doc)
            if self.buffer:
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                self.docs_in_epoch += 1
                return self.buffer.pop()
            if self.docs_in_epoch == 0:  # never loop forever over an empty epoch
                raise DataError(f"{self._where()}: no usable documents for this rank in epoch {self.epoch}")
            skipped = {k: n for k, n in self.source.report.counts.items() if n}
            log.log(logging.WARNING if skipped else logging.INFO, "%s: epoch %d done, %d documents%s", self._where(),
                    self.epoch, self.docs_in_epoch, f"; skipped so far: {skipped}" if skipped else "")
            self._set_epoch(self.epoch + 1)
            self.source.start_epoch(self.epoch)
            self.exhausted = False
            self.docs_in_epoch = 0

    def _where(self) -> str:
        src = self.source
        if isinstance(src, LocalShardSource):
            return f"{len(src.files)} shard(s) in '{Path(src.files[0]).parent}' (rank {src.rank} of {src.world_size})"
        return getattr(src, "name", "data source")

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "epoch": self.epoch,
            "source": self.source.state_dict(),
            "buffer": list(self.buffer),
            "exhausted": self.exhausted,
            "docs_in_epoch": self.docs_in_epoch,
            "rng": [version, list(internal), gauss],
            "bad_inputs": dict(self.source.report.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        self._set_epoch(int(state["epoch"]))
        self.source.load_state_dict(state["source"])
        self.buffer = list(state["buffer"])
        self.exhausted = bool(state["exhausted"])
        self.docs_in_epoch = int(state["docs_in_epoch"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.source.report.counts.update(state.get("bad_inputs", {}))


# --------------------------------------------------------------------------------------------------------------
# Tokenize + pack + rank slicing


class TokenStream:
    """``next(stream)`` -> LongTensor [micro_batch_size, seq_len + 1]; ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, docs: ShuffledDocs, tokenizer, *, seq_len: int, micro_batch_size: int, rank: int,
                 world_size: int, split: str):
        if split not in ("node", "global"):
            raise DataError(f"config key 'data.split': {split!r} is not one of node, global")
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.split = rank, world_size, split
        self.tokens: list[int] = []  # tokenized, not yet emitted; its head is the next block's first token

    def __iter__(self):
        return self

    def _next_block(self) -> list[int]:
        need = self.seq_len + 1
        while len(self.tokens) < need:
            for ids in self.tokenizer.encode_batch([self.docs.next_doc() for _ in range(ENCODE_BATCH)]):
                self.tokens.extend(ids)
                self.tokens.append(self.tokenizer.eos_id)
        block = self.tokens[:need]
        del self.tokens[: self.seq_len]  # stride seq_len: the block's last token starts the next block
        return block

    def __next__(self) -> torch.Tensor:
        if self.split == "global":
            blocks = [self._next_block() for _ in range(self.micro_batch_size * self.world_size)]
            blocks = blocks[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        else:
            blocks = [self._next_block() for _ in range(self.micro_batch_size)]
        return torch.tensor(blocks, dtype=torch.long)

    @property
    def epoch(self) -> int:
        return self.docs.epoch

    @property
    def stats(self) -> dict:
        """Skipped inputs by kind (malformed, empty, non_utf8, missing_shard, corrupt_shard)."""
        return dict(self.docs.source.report.counts)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": "text",
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "docs": self.docs.state_dict(),
            "tokens": list(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "text" or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state of kind {state.get('kind')!r} v{state.get('version')} "
                            f"cannot resume a text stream v{STATE_VERSION} (was data.source changed?)")
        if state["split"] != self.split:
            raise DataError(f"config key 'data.split': the checkpoint was written with {state['split']!r}, "
                            f"now {self.split!r}")
        if self.split == "node" and (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            # Node-split positions are per rank; with another world size the ranks read other shards.
            log.warning("data.split=node: the checkpoint was written by rank %d of %d, this is rank %d of %d; "
                        "restarting epoch %d of this rank's part (use data.split=global to resume exactly at "
                        "another world size)", state["rank"], state["world_size"], self.rank, self.world_size,
                        state["docs"]["epoch"])
            epoch = int(state["docs"]["epoch"])
            self.docs._set_epoch(epoch)
            self.docs.source.start_epoch(epoch)
            return
        # Global split: the state is the same on every rank, so any rank of any world size resumes from it.
        self.docs.load_state_dict(state["docs"])
        self.tokens = [int(t) for t in state["tokens"]]


# --------------------------------------------------------------------------------------------------------------
# Builders


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


def build_text_stream(data_cfg, tokenizer, *, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                      seed: int) -> TokenStream:
    split = resolve_split(data_cfg)
    # Global split: every rank reads the one stream of a world of size 1.
    read_rank, read_world = (rank, world_size) if split == "node" else (0, 1)
    source = text_source(data_cfg, "train", rank=read_rank, world_size=read_world, seed=seed)
    docs = ShuffledDocs(source, buffer_size=data_cfg.shuffle_buffer, seed=seed, tag=f"{read_rank}-{read_world}")
    return TokenStream(docs, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size, rank=rank,
                       world_size=world_size, split=split)


def blocks_from_tokens(tokens: list[int] | torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """[n, seq_len + 1] blocks with stride seq_len from the first n * seq_len + 1 tokens."""
    t = torch.as_tensor(tokens[: n * seq_len + 1], dtype=torch.long)
    return t.unfold(0, seq_len + 1, seq_len).contiguous()


def val_block_count(data_cfg, seq_len: int, available: int, where: str) -> int:
    n = data_cfg.val_tokens // seq_len
    if n * seq_len + 1 > available:
        fewer = (available - 1) // seq_len
        if fewer <= 0:
            raise DataError(f"{where}: the validation split holds {available} tokens, too few for one block of "
                            f"{seq_len + 1}")
        log.warning("%s: the validation split holds %d tokens, less than data.val_tokens=%d; using %d blocks",
                    where, available, data_cfg.val_tokens, fewer)
        n = fewer
    return n


def build_text_val_blocks(data_cfg, tokenizer, *, seq_len: int) -> torch.Tensor:
    """The first data.val_tokens tokens of the validation split in file order (unshuffled, every rank alike)."""
    source = text_source(data_cfg, "validation", rank=0, world_size=1, seed=0, shuffle_shards=False)
    need = (data_cfg.val_tokens // seq_len) * seq_len + 1
    parts: list[np.ndarray] = []  # int32 arrays: GaLore's 10M validation tokens as Python ints would take 350 MB
    have = 0
    while have < need:
        docs = list(itertools.islice(iter(source.next_doc, None), ENCODE_BATCH))  # until next_doc() is None
        if not docs:
            break
        for ids in tokenizer.encode_batch(docs):
            parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
            have += len(parts[-1])
    tokens = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))
    where = f"data.source={data_cfg.source} validation"
    return blocks_from_tokens(tokens, seq_len, val_block_count(data_cfg, seq_len, len(tokens), where))
