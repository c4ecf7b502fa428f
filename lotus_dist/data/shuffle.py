"""The shuffle of documents: a seeded shuffle buffer over a source (text_sources.py), epoch after epoch.

``ShuffledDocs`` runs epochs forever (reshuffled with seed+epoch). Its state stores the buffered texts and the RNG
state. This scales: the checkpoint grows with ``data.shuffle_buffer`` times the document size (about 2 MB for 1000
C4 documents), never with the data set, and resuming re-opens one shard and skips at most one shard's lines instead
of replaying the epoch. (HF's ``IterableDataset.state_dict`` restarts its shuffle buffer empty, so its shuffle is
not used.)
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from .errors import DataError
from .text_sources import LocalShardSource

log = logging.getLogger(__name__)


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
