"""Megatron indexed datasets (``data.source=indexed``): pre-tokenized ``.bin/.idx`` prefixes, weighted blends.

Read through megatron-core's ``BlendedMegatronDatasetBuilder`` / ``GPTDataset`` / ``BlendedDataset`` (megatron-core is
the optional ``megatron`` extra). Those build a finite index of ``num_samples`` samples, so the endless stream is cut
into *rounds* of one epoch-equivalent each; round r is built with random_seed = seed + r, which reshuffles it.
The stream position is one integer, the global sample index, identical on every rank: a rank takes its
``micro_batch_size`` samples of each global batch, so ``data.split`` node and global read the same samples here and a
checkpoint resumes exactly at any world size.

megatron-core's wheel ships its C++ index helper (``helpers_cpp``) prebuilt, so this runs on CPU with nothing to
compile (see ``ensure_helpers`` for installs without it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .errors import DataError
from .packing import blocks_from_tokens, val_block_count
from .text_sources import LocalShardSource
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

INSTALL_HINT = "data.source=indexed needs megatron-core: pip install -e .[megatron]"
STATE_VERSION = 1


def require_megatron():
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant to datasets
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset  # noqa: F401
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    ensure_helpers()


def ensure_helpers() -> None:
    """GPTDataset builds its sample index with the C++ extension ``helpers_cpp``. megatron-core's wheels ship it
    prebuilt (0.16.1 for CPython 3.11 x86_64: nothing to compile, it runs on CPU); a source install without it
    gets the build command instead of megatron's own ``compile_helpers``, which calls ``sys.exit`` on failure."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        from megatron.core import datasets

        raise DataError(
            "megatron-core's C++ helper 'helpers_cpp' is not built; build it with: pip install pybind11 && "
            f"cd {Path(datasets.__file__).parent} && g++ -O3 -shared -std=c++17 -fPIC $(python -m pybind11 "
            "--includes) helpers.cpp -o helpers_cpp$(python -c \"import sysconfig; "
            "print(sysconfig.get_config_var('EXT_SUFFIX'))\")") from None


def strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def check_prefix(prefix: str, key: str) -> str:
    prefix = str(Path(strip_suffix(str(prefix))).expanduser())
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"config key '{key}': indexed dataset file '{prefix}{suffix}' does not exist")
    check_indexed_files(prefix)
    return prefix


# megatron-core's .idx layout (version 1): header, version <Q, dtype code <B, sequence count <Q, document count <Q,
# then int32 lengths and int64 pointers per sequence, int64 document indices. Its reader asserts on a bad header
# and fails later, deep in a batch, on a .bin shorter than the index says.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEAD = struct.Struct("<9sQBQQ")
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes -> bytes per token
REPROCESS = "re-run scripts/preprocess_c4.py for it"


def check_indexed_files(prefix: str) -> None:
    """Refuse, in one line naming the file, an unreadable ``.idx`` or a ``.bin`` shorter than its index (a copy
    cut short); reads the header and the last sequence's entry only, so it is instant on any size."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEAD.size)
        if len(head) < _IDX_HEAD.size or head[:9] != _IDX_MAGIC:
            raise DataError(f"indexed dataset index '{idx}' is not a megatron index (bad header); {REPROCESS}")
        _, version, code, sequences, documents = _IDX_HEAD.unpack(head)
        if version != 1 or code not in _DTYPE_SIZES:
            raise DataError(f"indexed dataset index '{idx}' has version {version}, dtype code {code}: not one "
                            f"this reader knows; {REPROCESS}")
        need = _IDX_HEAD.size + 12 * sequences + 8 * documents
        if size < need:
            raise DataError(f"indexed dataset index '{idx}' is truncated: {size} bytes, its header needs {need}; "
                            f"{REPROCESS}")
        if not sequences:
            return
        f.seek(_IDX_HEAD.size + 4 * (sequences - 1))
        (length,) = struct.unpack("<i", f.read(4))
        f.seek(_IDX_HEAD.size + 4 * sequences + 8 * (sequences - 1))
        (pointer,) = struct.unpack("<q", f.read(8))
    need = pointer + length * _DTYPE_SIZES[code]
    if bin_.stat().st_size < need:
        raise DataError(f"indexed dataset file '{bin_}' is truncated: {bin_.stat().st_size} bytes, its index "
                        f"'{idx.name}' needs {need}; {REPROCESS}")


def allow_tokenizer_change(data_cfg) -> bool:
    return bool(getattr(data_cfg, "allow_tokenizer_change", False))  # config objects without the key: refuse


def check_tokenizer_matches(prefix: str, tokenizer, allow_change: bool = False) -> None:
    """preprocess_c4 writes ``prefix.json`` naming its tokenizer: refuse ids from another vocabulary, and from
    another model of the same vocabulary (its fingerprint; sidecars written before fingerprints: size and EOS
    only) unless ``data.allow_tokenizer_change``."""
    sidecar = Path(prefix + ".json")
    if not sidecar.is_file():
        return
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"indexed dataset sidecar '{sidecar}' is unreadable ({e}); {REPROCESS}") from None
    if (meta.get("vocab_size"), meta.get("eos_id")) != (tokenizer.vocab_size, tokenizer.eos_id):
        raise DataError(f"indexed dataset '{prefix}' was tokenized with '{meta.get('tokenizer')}' (vocab "
                        f"{meta.get('vocab_size')}, eos {meta.get('eos_id')}) but config key 'data.tokenizer' is "
                        f"'{tokenizer.path}' (vocab {tokenizer.vocab_size}, eos {tokenizer.eos_id})")
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is None or recorded == tokenizer.fingerprint:
        return
    if not allow_change:
        raise DataError(f"indexed dataset '{prefix}' was tokenized with '{meta.get('tokenizer')}' (fingerprint "
                        f"{recorded}) but config key 'data.tokenizer' is '{tokenizer.path}' (fingerprint "
                        f"{tokenizer.fingerprint}), another model of the same vocabulary size whose ids mean other "
                        f"tokens; use that tokenizer, {REPROCESS}, or set data.allow_tokenizer_change=true")
    log.warning("indexed dataset '%s' was tokenized with another model (fingerprint %s, data.tokenizer has %s); "
                "training on it as data.allow_tokenizer_change=true says", prefix, recorded, tokenizer.fingerprint)


def parse_blend(data_cfg) -> tuple[list[str], Optional[list[float]]]:
    """``data.blend = [w1, prefix1, w2, prefix2, ...]`` or ``data.path = prefix`` -> (prefixes, weights)."""
    if data_cfg.blend:
        blend = list(data_cfg.blend)
        if len(blend) % 2:
            raise DataError(f"config key 'data.blend': expected [weight, prefix, weight, prefix, ...], got {blend}")
        try:
            weights = [float(w) for w in blend[0::2]]
        except (TypeError, ValueError):
            raise DataError(f"config key 'data.blend': weights must be numbers, got {blend[0::2]}") from None
        if any(w <= 0 for w in weights):
            raise DataError(f"config key 'data.blend': weights must be positive, got {weights}")
        return [check_prefix(p, "data.blend") for p in blend[1::2]], weights
    if data_cfg.path:
        return [check_prefix(data_cfg.path, "data.path")], None
    raise DataError("data.source=indexed needs 'data.path' (a .bin/.idx prefix) or 'data.blend'")


def validation_prefix(data_cfg, prefixes: list[str]) -> str:
    """``data.val_path``, else the sibling of the first prefix with 'train' replaced by 'validation' (the layout
    scripts/preprocess_c4.py writes)."""
    if getattr(data_cfg, "val_path", None):
        return check_prefix(data_cfg.val_path, "data.val_path")
    first = Path(prefixes[0])
    if "train" in first.name:
        sibling = str(first.with_name(first.name.replace("train", "validation")))
        if Path(sibling + ".bin").is_file() and Path(sibling + ".idx").is_file():
            check_indexed_files(sibling)
            return sibling
    raise DataError(f"data.source=indexed: no validation prefix; set 'data.val_path' (no '*validation*' sibling "
                    f"of '{first}')")


class _MegatronTokenizer:
    """What GPTDatasetConfig needs of a tokenizer: vocab size, EOD id, and identifiers for its cache hash."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eos_id
        self.unique_identifiers = {"class": "lotus_dist.Tokenizer", "vocab_size": tokenizer.vocab_size,
                                   "eod": tokenizer.eos_id}


def _cache_path(cache_dir: Optional[str]) -> str:
    # Megatron writes its sample/shuffle indices here. Under multi-node training rank 0 builds them and the others
    # read them, so this must be a shared filesystem there (set data.cache_dir).
    return str(Path(cache_dir or "~/.cache/lotus_dist").expanduser() / "indexed")


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16's BlendedDataset calls ``torch.distributed.get_rank()`` unguarded, which raises without a
    process group (a single-process run); answer 0 there, as the rest of megatron-core assumes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


class IndexedStream:
    """``next(stream)`` -> LongTensor [micro_batch_size, seq_len + 1] from a Megatron blend; resumable."""

    def __init__(self, prefixes: list[str], weights: Optional[list[float]], tokenizer, *, seq_len: int,
                 micro_batch_size: int, rank: int, world_size: int, seed: int, cache_dir: Optional[str] = None):
        require_megatron()
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefixes, self.weights = prefixes, weights
        self.tokenizer = _MegatronTokenizer(tokenizer)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.cache_path = _cache_path(cache_dir)
        epoch_samples = 0
        for prefix in prefixes:
            dataset = IndexedDataset(prefix)  # keep a reference: its arrays view an mmap closed on deletion
            tokens = int(dataset.sequence_lengths.sum())
            del dataset
            if tokens < seq_len + 1:
                raise DataError(f"indexed dataset '{prefix}' holds {tokens} tokens, fewer than one block of "
                                f"{seq_len + 1}")
            epoch_samples += (tokens - 1) // seq_len
        self.round_size = max(epoch_samples, micro_batch_size * world_size)
        self.sample = 0  # global samples consumed, the whole stream position
        self._datasets: dict = {}  # round -> its built dataset: the rounds of the current global batch

    def _build(self, round_: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        config = GPTDatasetConfig(
            random_seed=self.seed + round_,
            sequence_length=self.seq_len,
            blend_per_split=[(self.prefixes, self.weights), None, None],
            path_to_cache=self.cache_path,
            tokenizer=self.tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,  # a [seq, seq] mask per sample; the model is causal anyway
        )
        # Distributed-aware: under an initialised process group rank 0 builds the cache first and all ranks sync,
        # which is safe because every rank builds a round at the same global batch (_build_rounds), on the
        # training thread (PrefetchStream runs collective_work() there).
        with _rank_zero_without_process_group():
            train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [self.round_size, None, None], lambda: True,
                                                        config).build()
        return train

    def _rounds_of_next_batch(self) -> range:
        global_batch = self.micro_batch_size * self.world_size
        return range(self.sample // self.round_size, (self.sample + global_batch - 1) // self.round_size + 1)

    def _build_rounds(self) -> None:
        """Build the rounds the next *global* batch reads, on every rank alike: under a process group each build
        is collective (rank 0 first, then a barrier), so all ranks must build at the same batch, even a rank whose
        own samples all lie in the previous round."""
        needed = self._rounds_of_next_batch()
        self._datasets = {r: d for r, d in self._datasets.items() if r in needed}
        for round_ in needed:
            if round_ not in self._datasets:
                self._datasets[round_] = self._build(round_)

    def collective_work(self):
        """What must run on the training thread before the next batch (PrefetchStream's protocol): building a
        round, which synchronises the ranks; None when the next batch's rounds are built."""
        missing = any(r not in self._datasets for r in self._rounds_of_next_batch())
        return self._build_rounds if missing else None

    def _get(self, global_index: int) -> torch.Tensor:
        round_, index = divmod(global_index, self.round_size)
        item = self._datasets[round_][index]
        # add_extra_token_to_sequence: tokens = text[:-1], labels = text[1:]; rebuild the seq_len + 1 block.
        return torch.cat([item["tokens"], item["labels"][-1:]])

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self._build_rounds()  # nothing to do unless the global batch reaches a new round
        first = self.sample + self.rank * self.micro_batch_size
        batch = torch.stack([self._get(first + j) for j in range(self.micro_batch_size)])
        self.sample += self.micro_batch_size * self.world_size
        return batch

    @property
    def epoch(self) -> int:
        return self.sample // self.round_size

    @property
    def stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "indexed", "sample": self.sample, "round_size": self.round_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "indexed" or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state of kind {state.get('kind')!r} cannot resume an indexed stream "
                            f"(was data.source changed?)")
        if state["round_size"] != self.round_size:
            log.warning("indexed data changed since the checkpoint (round of %d samples, now %d): the position "
                        "is kept but the samples differ", state["round_size"], self.round_size)
        self.sample = int(state["sample"])


def build_indexed_stream(data_cfg, tokenizer, *, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                         seed: int) -> IndexedStream:
    require_megatron()
    prefixes, weights = parse_blend(data_cfg)
    for prefix in prefixes:
        check_tokenizer_matches(prefix, tokenizer, allow_change=allow_tokenizer_change(data_cfg))
    return IndexedStream(prefixes, weights, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
                         rank=rank, world_size=world_size, seed=seed, cache_dir=data_cfg.cache_dir)


def read_documents(prefix: str):
    """The token arrays (int64 copies) of an indexed dataset, in order."""
    require_megatron()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_indexed_files(prefix)
    dataset = IndexedDataset(prefix)
    for i in range(len(dataset)):
        yield np.array(dataset[i], dtype=np.int64)  # a copy: the mmap goes away with the dataset


def build_indexed_val_blocks(data_cfg, tokenizer, *, seq_len: int) -> torch.Tensor:
    require_megatron()
    prefixes, _ = parse_blend(data_cfg)
    prefix = validation_prefix(data_cfg, prefixes)
    check_tokenizer_matches(prefix, tokenizer, allow_change=allow_tokenizer_change(data_cfg))
    need = (data_cfg.val_tokens // seq_len) * seq_len + 1
    parts, have = [], 0
    for doc in read_documents(prefix):  # documents end with EOS (preprocess_c4 appends it)
        parts.append(doc)
        have += len(doc)
        if have >= need:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = val_block_count(data_cfg, seq_len, len(tokens), f"indexed validation '{prefix}'")
    return blocks_from_tokens(torch.from_numpy(tokens), seq_len, n)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing (scripts/preprocess_c4.py): C4-format shards -> one .bin/.idx prefix

_tokenizer = None  # one per worker process


def _init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(tokenizer_path)


def _tokenize_shard(job: tuple[str, str, str]) -> dict:
    """Tokenize one shard into the partial dataset ``part_prefix``; return its counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    shard, part_prefix, dtype_name = job
    dtype = np.dtype(dtype_name).type  # chosen once in the parent, so that all parts agree
    builder = IndexedDatasetBuilder(part_prefix + ".bin", dtype=dtype)
    reader = LocalShardSource([Path(shard)], shuffle_shards=False)
    docs = tokens = 0
    batch: list[str] = []

    def flush():
        nonlocal docs, tokens
        for ids in _tokenizer.encode_batch(batch, num_threads=1):  # one process per core already
            ids.append(_tokenizer.eos_id)
            builder.add_document(ids, [len(ids)])
            docs += 1
            tokens += len(ids)
        batch.clear()

    while (doc := reader.next_doc()) is not None:
        batch.append(doc)
        if len(batch) >= 256:
            flush()
    flush()
    builder.finalize(part_prefix + ".idx")
    return {"shard": shard, "docs": docs, "tokens": tokens, "bad_inputs": reader.report.counts,
            "damaged_shards": reader.report.shards}


def preprocess_split(files: list[Path], output_prefix: Path, tokenizer_path: str, workers: int,
                     quiet: bool = False) -> dict:
    """Tokenize ``files`` in parallel (one process per shard) into ``output_prefix``.{bin,idx,json}; atomic."""
    require_megatron()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = load_tokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    parts_dir = output_prefix.parent / f".{output_prefix.name}.parts.{os.getpid()}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(parts_dir / f"{k:05d}"), np.dtype(dtype).name) for k, f in enumerate(files)]
    totals = {"docs": 0, "tokens": 0, "bad_inputs": {}, "damaged_shards": {}}  # damaged: path -> why
    try:
        with mp.get_context("fork").Pool(min(workers, len(jobs)), _init_worker, (str(tokenizer.path),)) as pool, \
                tqdm(total=len(jobs), desc=output_prefix.name, unit="shard", disable=quiet) as bar:
            for result in pool.imap(_tokenize_shard, jobs):  # in shard order: deterministic output
                totals["docs"] += result["docs"]
                totals["tokens"] += result["tokens"]
                for kind, n in result["bad_inputs"].items():
                    totals["bad_inputs"][kind] = totals["bad_inputs"].get(kind, 0) + n
                totals["damaged_shards"].update(result["damaged_shards"])
                bar.update(1)
                bar.set_postfix(docs=totals["docs"], tokens=totals["tokens"])
        # Merge the parts into temporary files, then rename: a crash never leaves a half-written prefix.
        tmp = output_prefix.with_name(f".{output_prefix.name}.tmp{os.getpid()}")
        builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
        for _, part, _ in jobs:
            builder.add_index(part)
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", str(output_prefix) + ".bin")
        os.replace(str(tmp) + ".idx", str(output_prefix) + ".idx")
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    meta = {"tokenizer": str(tokenizer.path), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint, "shards": [str(f) for f in files], **totals}
    Path(str(output_prefix) + ".json").write_text(json.dumps(meta, indent=1))
    return meta
