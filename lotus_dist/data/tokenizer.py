"""Sentencepiece tokenizers: the shipped embedded model or an existing one (T5 spiece.model, LLaMA tokenizer.model)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import sentencepiece as spm

from .errors import DataError
from .probe import hub_endpoint, hub_offline, hub_unreachable

REPO_ROOT = Path(__file__).resolve().parents[2]
# Short names the config may use instead of a path.
NAMED_MODELS = {"embedded": "tokenizer/embedded.model"}


HUB_PREFIX = "hf:"
# Where Hugging Face repositories keep their sentencepiece model: LLaMA's name, then T5's.
HUB_FILES = ("tokenizer.model", "spiece.model")


def parse_hub_name(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:<repo>[@<revision>][:<file>]`` -> (repo, revision, file)."""
    body = spec[len(HUB_PREFIX):]
    body, _, filename = body.partition(":")
    repo, _, revision = body.partition("@")
    if not repo or repo.count("/") > 1:
        raise DataError(f"config key 'data.tokenizer': '{spec}' is not hf:<repo>[@<revision>][:<file>] "
                        f"(e.g. hf:google-t5/t5-base)")
    return repo, revision or None, filename or None


def fetch_hub_model(spec: str, local_files_only: bool = False) -> Path:
    """The sentencepiece model of a hub repository, from the Hugging Face cache (downloaded into it if missing;
    ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` apply as for every Hugging Face download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    repo, revision, filename = parse_hub_name(spec)
    names = [filename] if filename else HUB_FILES
    if not local_files_only and not hub_offline() and (reason := hub_unreachable()):
        # without a network huggingface_hub retries each file for ~25 s, then blames the file: say it at once
        for name in names:
            try:  # a copy cached earlier still serves, as huggingface_hub itself would fall back to it
                return Path(hf_hub_download(repo, name, revision=revision, local_files_only=True))
            except EntryNotFoundError:
                pass
        raise DataError(f"config key 'data.tokenizer': no network to fetch '{spec}' ({hub_endpoint()}: {reason}) "
                        f"and no copy in the Hugging Face cache; fetch it once where there is network, copy the "
                        f"cache (HF_HUB_CACHE) here and set HF_HUB_OFFLINE=1, or set data.tokenizer to a local "
                        f".model file")
    problems = []
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, local_files_only=local_files_only))
        except EntryNotFoundError as e:  # not in the repository, or not cached while offline
            problems.append(f"{name}: {str(e).strip().splitlines()[0]}")
        except RepositoryNotFoundError:
            raise DataError(f"config key 'data.tokenizer': no hub repository '{repo}' (or it is private: log in "
                            f"with `hf auth login`)") from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise DataError(f"config key 'data.tokenizer': fetching {name} of '{repo}' failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    raise DataError(f"config key 'data.tokenizer': '{spec}' has no sentencepiece model in reach ("
                    + "; ".join(problems) + "); name the file as hf:<repo>:<file>, or pass a local path")


def resolve_tokenizer_path(path_or_name: str, local_files_only: bool = False) -> Path:
    """A relative path is looked up in the current directory first, then in the repository root; ``hf:<repo>``
    names a hub repository's model (see ``fetch_hub_model``)."""
    if path_or_name.startswith(HUB_PREFIX):
        return fetch_hub_model(path_or_name, local_files_only=local_files_only)
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

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the model file, 16 hex digits: tells apart two models of one vocabulary size, whose ids mean
        other tokens (recorded by scripts/preprocess_c4.py beside indexed data, and in checkpoints)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]

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


def load_tokenizer(path_or_name: str, first: bool = True, agree=None) -> Tokenizer:
    """The tokenizer a config names. Under several processes, ``first`` marks the one per machine that may
    download a hub model (local rank 0) and ``agree`` is the group's ``all_gather_object``: the others wait, then
    read the cache without touching the network, and every process raises the first one's error."""
    if agree is None or not path_or_name.startswith(HUB_PREFIX):
        return Tokenizer(resolve_tokenizer_path(path_or_name))
    problem = None
    if first:
        try:
            resolve_tokenizer_path(path_or_name)
        except DataError as e:
            problem = str(e)
    problem = next((p for p in agree(problem) if p), None)
    if problem:
        raise DataError(problem)
    return Tokenizer(resolve_tokenizer_path(path_or_name, local_files_only=not first))


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, str]:
    """The files next to a copy of the sentencepiece model (``tokenizer.model``) that make
    ``transformers.AutoTokenizer`` load it as a ``LlamaTokenizer`` encoding as we trained: no BOS or EOS added
    (training packs documents separated by EOS only). Prose encodes identically; leading spaces and runs of
    spaces may not (the Hugging Face LLaMA tokenizer splits whitespace its own way)."""
    sp = tokenizer.sp
    piece = lambda i: sp.IdToPiece(i) if i is not None and i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
               "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id())}
    special = {k: v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
              "sp_model_kwargs": {}, **special}
    return {"tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
