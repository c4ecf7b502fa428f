"""Sentencepiece tokenizers: the shipped embedded model or an existing one (T5 spiece.model, LLaMA tokenizer.model)."""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

from .errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
# Short names the config may use instead of a path.
NAMED_MODELS = {"embedded": "tokenizer/embedded.model"}


def resolve_tokenizer_path(path_or_name: str) -> Path:
    """A relative path is looked up in the current directory first, then in the repository root."""
    raw = NAMED_MODELS.get(path_or_name, path_or_name)
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, REPO_ROOT / path]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(f"'{c}'" for c in candidates)
    raise DataError(f"config key 'data.tokenizer': sentencepiece model '{path_or_name}' not found "
                    f"(looked for {looked})")


class Tokenizer:
    """A thin wrapper that fixes the interface the trainer and the data streams use."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"config key 'data.tokenizer': '{self.path}' is not a sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.GetPieceSize()
        self.eos_id: int = self.sp.eos_id()
        if self.eos_id < 0:
            # Packing separates documents with EOS; a model without one cannot mark document boundaries.
            raise DataError(f"config key 'data.tokenizer': sentencepiece model '{self.path}' defines no EOS token")
        bos = self.sp.bos_id()
        self.bos_id: int | None = bos if bos >= 0 else None  # T5's spiece.model has no BOS

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Several texts at once; sentencepiece spreads them over C++ threads (default: up to 4 cores)."""
        threads = num_threads or min(4, os.cpu_count() or 1)
        return self.sp.Encode(texts, out_type=int, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # Picklable for multiprocessing workers (preprocess_c4): reload from the path on the other side.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def load_tokenizer(path_or_name: str) -> Tokenizer:
    return Tokenizer(resolve_tokenizer_path(path_or_name))
