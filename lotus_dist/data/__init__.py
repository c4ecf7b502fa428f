"""The data pipeline: tokenizer, training streams and validation blocks for the three ``data.source`` kinds.

    load_tokenizer(path_or_name) -> Tokenizer
    build_train_stream(data_cfg, tokenizer, *, seq_len, micro_batch_size, rank, world_size, seed,
                       pin_memory=False) -> stream
        next(stream) -> LongTensor [micro_batch_size, seq_len + 1]; stream.state_dict() / load_state_dict(d)
        With data.prefetch > 0 (default 2) the stream is a PrefetchStream (prefetch.py): a background thread keeps
        data.prefetch micro-batches ready (pinned when pin_memory and CUDA), and state_dict() is still the position
        of the batches the trainer took, so resume stays bitwise exact. close() stops the thread.
    build_val_blocks(data_cfg, tokenizer, *, seq_len) -> LongTensor [n, seq_len + 1], n = val_tokens // seq_len
"""

from __future__ import annotations

import torch

from .packing import TokenStream, build_text_stream, build_text_val_blocks
from .errors import DataError
from .prefetch import PrefetchStream
from .probe import check_vocab
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataError", "PrefetchStream", "Tokenizer", "TokenStream", "load_tokenizer", "build_train_stream",
           "build_val_blocks", "check_data", "check_vocab"]


def build_train_stream(data_cfg, tokenizer, *, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                       seed: int, pin_memory: bool = False):
    """The endless, resumable training stream of this rank (see packing.py and indexed.py for the semantics), prefetched
    by a background thread when ``data.prefetch`` > 0. ``pin_memory``: pin the batches (only done under CUDA)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    if data_cfg.source == "indexed":
        from .indexed import build_indexed_stream  # megatron-core is optional

        stream = build_indexed_stream(data_cfg, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                      rank=rank, world_size=world_size, seed=seed)
    else:
        stream = build_text_stream(data_cfg, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                   rank=rank, world_size=world_size, seed=seed)
    depth = getattr(data_cfg, "prefetch", 0)  # config objects without the key (older callers): no thread
    if depth > 0:
        return PrefetchStream(stream, depth=depth, pin_memory=pin_memory)
    return stream


def check_data(data_cfg, tokenizer, *, evaluate: bool) -> None:
    """Refuse (DataError) a data source that cannot feed the run, before the model is built: a local C4 mirror
    without train shards (or validation shards when the run evaluates), the hub without a network, an indexed
    prefix that is missing, damaged (index unreadable, data file shorter than its index) or of another tokenizer.
    Reads no documents; the streams built later check the rest."""
    splits = ("train", "validation") if evaluate else ("train",)
    if data_cfg.source == "indexed":
        from .indexed import (allow_tokenizer_change, check_tokenizer_matches, parse_blend, require_megatron,
                              validation_prefix)

        require_megatron()
        prefixes = parse_blend(data_cfg)[0]
        for prefix in prefixes + ([validation_prefix(data_cfg, prefixes)] if evaluate else []):
            check_tokenizer_matches(prefix, tokenizer, allow_change=allow_tokenizer_change(data_cfg))
    elif data_cfg.source == "c4" and data_cfg.path:
        from .text_sources import find_shards

        for split in splits:
            find_shards(data_cfg.path, split, "data.path", warn=False)  # the stream's own call warns
    elif data_cfg.source == "c4":
        from .probe import probe_hub_dataset

        probe_hub_dataset(data_cfg, splits)


def build_val_blocks(data_cfg, tokenizer, *, seq_len: int) -> torch.Tensor:
    """The first data.val_tokens tokens of the validation split, unshuffled, the same on every rank."""
    if data_cfg.source == "indexed":
        from .indexed import build_indexed_val_blocks

        return build_indexed_val_blocks(data_cfg, tokenizer, seq_len=seq_len)
    return build_text_val_blocks(data_cfg, tokenizer, seq_len=seq_len)
