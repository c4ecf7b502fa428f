"""Tokenize C4-format shards into Megatron indexed datasets (.bin/.idx) for ``data.source=indexed``.

    python scripts/preprocess_c4.py --input /data/c4 --output /data/c4_t5 --tokenizer tokenizer/t5-spiece.model
    python scripts/preprocess_c4.py --input embedded --output /tmp/embedded_tok

writes ``OUTPUT/c4-train_text_document.{bin,idx}`` and ``OUTPUT/c4-validation_text_document.{bin,idx}`` (each
document's tokens followed by EOS, documents in file order) plus a ``.json`` sidecar naming the tokenizer and its
fingerprint (training on the data with another tokenizer is refused). Train with
``data.source=indexed data.path=OUTPUT/c4-train_text_document``; the validation prefix is found beside it.
Damaged shards (empty, truncated, corrupt gzip) and bad lines are skipped and counted, as in training, and named.

Shards are tokenized in parallel, one worker process per shard (C4 has 1024), into partial datasets that are merged
in shard order, so the output does not depend on the number of workers.
Needs megatron-core (pip install -e .[megatron]).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from lotus_dist.data.text_sources import find_shards  # noqa: E402
from lotus_dist.errors import exit_status  # noqa: E402
from lotus_dist.data.indexed import preprocess_split  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a C4-format mirror directory, or 'embedded'")
    p.add_argument("--output", required=True, help="directory for the .bin/.idx prefixes")
    p.add_argument("--tokenizer", default="tokenizer/embedded.model", help="sentencepiece model (data.tokenizer)")
    p.add_argument("--splits", nargs="+", default=["train", "validation"], choices=["train", "validation"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", default=None, help="where the embedded corpus is cached (data.cache_dir)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.input == "embedded":
            from lotus_dist.data.corpus import ensure_embedded_corpus

            root = ensure_embedded_corpus(args.cache_dir)
        else:
            root = Path(args.input)
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for split in args.splits:
            start = time.time()
            prefix = out / f"c4-{split}_text_document"
            meta = preprocess_split(find_shards(root, split, key="--input"), prefix, args.tokenizer, args.workers)
            bad = {k: v for k, v in meta["bad_inputs"].items() if v}
            print(f"{prefix}: {meta['docs']} documents, {meta['tokens']} tokens, {time.time() - start:.0f}s"
                  + (f", skipped {bad}" if bad else ""))
            for shard, why in meta["damaged_shards"].items():  # skipped whole or in part, as training would
                print(f"warning: damaged shard {shard}: {why}", file=sys.stderr)

    return exit_status(work)

if __name__ == "__main__":
    sys.exit(main())
