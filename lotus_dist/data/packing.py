"""Packing of documents into training blocks: tokenize, append EOS, cut ``seq_len + 1`` blocks, split across
ranks, resume; and the validation blocks.

A text stream (``data.source`` embedded or c4) is three layers, each with an explicit, JSON-serialisable position so
that a resumed stream yields exactly the same tokens: a source (text_sources.py) -> ``ShuffledDocs`` (shuffle.py) ->
``TokenStream`` (here).

``TokenStream`` tokenizes, appends EOS and cuts blocks of ``seq_len + 1`` tokens with stride ``seq_len``: the last
token of a block is the first of the next, so every token is a target exactly once and nothing is padded
(Megatron's GPTDataset cuts its samples the same way). The remainder carries to the next block. With
``data.split=global`` every rank packs the whole stream and keeps its slice of each global batch.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from .errors import DataError
from .shuffle import ShuffledDocs
from .text_sources import resolve_split, text_source

log = logging.getLogger(__name__)

STATE_VERSION = 1
ENCODE_BATCH = 16  # documents tokenized together (sentencepiece threads); their tokens wait in the stream state


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
