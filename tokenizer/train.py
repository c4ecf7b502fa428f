"""Train a sentencepiece model on N documents of the embedded corpus or a C4-format mirror directory.

    python tokenizer/train.py --source embedded --vocab-size 8000 --model-type bpe --output tokenizer/embedded.model
    python tokenizer/train.py --source /data/c4 --num-docs 200000 --vocab-size 32000 --output c4_32k.model

Documents are read in file order from the train split (``*train*.json[l][.gz]`` shards) through the same robust
reader as training. Sentencepiece sees one line of text per sentence (its limit is a few KB per sentence).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import sentencepiece as spm  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lotus_dist.data.text_sources import LocalShardSource, find_shards  # noqa: E402
from lotus_dist.data.corpus import ensure_embedded_corpus  # noqa: E402
from lotus_dist.data.errors import DataError  # noqa: E402

MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length default; longer lines are cut


def iter_documents(source: str, num_docs: int | None, cache_dir: str | None = None):
    root = ensure_embedded_corpus(cache_dir) if source == "embedded" else Path(source)
    files = find_shards(root, "train", key="--source")
    reader = LocalShardSource(files, shuffle_shards=False)
    count = 0
    while num_docs is None or count < num_docs:
        doc = reader.next_doc()
        if doc is None:
            break
        count += 1
        yield doc


def iter_sentences(docs, progress):
    for doc in docs:
        progress.update(1)
        for line in doc.split("\n"):
            line = line.strip()
            if line:
                yield line.encode("utf-8")[:MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")


def train(source: str, output: str | Path, *, vocab_size: int = 32000, num_docs: int | None = None,
          model_type: str = "bpe", character_coverage: float = 0.9995, cache_dir: str | None = None,
          threads: int | None = None, quiet: bool = False) -> Path:
    output = Path(output)
    model = io.BytesIO()
    with tqdm(total=num_docs, desc="documents", unit="doc", disable=quiet) as progress:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter_sentences(iter_documents(source, num_docs, cache_dir), progress),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            # LLaMA's conventions: unk 0, bos 1, eos 2, no pad; digits split; unknown characters as bytes;
            # no normalisation, so that newlines and runs of spaces survive (as byte pieces) and decode(encode(x)) == x.
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=threads or min(8, os.cpu_count() or 1),
            minloglevel=2 if quiet else 0,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="embedded", help="'embedded' or a C4-format mirror directory")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--num-docs", type=int, default=None, help="documents to read (default: all)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--cache-dir", default=None, help="where the embedded corpus is cached (data.cache_dir)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    start = time.time()
    try:
        out = train(args.source, args.output, vocab_size=args.vocab_size, num_docs=args.num_docs,
                    model_type=args.model_type, character_coverage=args.character_coverage, cache_dir=args.cache_dir,
                    threads=args.threads)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=str(out))
    print(f"wrote {out}: vocab {sp.GetPieceSize()}, eos {sp.eos_id()}, {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
