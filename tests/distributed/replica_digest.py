"""``pretrain.py`` that, at the end, writes a digest of this rank's local parameter shards to
``$DIGEST_OUT/rank<r>.json`` ({FQN: sha256 of the shard's bytes}): HSDP replicas must hold bit-identical shards.
Launched by the tests as ``pretrain_launch.launch(..., entry=DIGEST_SCRIPT)``."""

import hashlib
import json
import os
import sys
from pathlib import Path

from lotus_dist.train.cli import main
from lotus_dist.train.trainer import Trainer

DIGESTS: dict = {}

if __name__ == "__main__":
    train_step = Trainer.train_step

    def recorded(self, *args, **kwargs):
        out = train_step(self, *args, **kwargs)
        for name, p in self.model.named_parameters():
            local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
            DIGESTS[name] = hashlib.sha256(local.cpu().contiguous().numpy().tobytes()).hexdigest()
        return out

    Trainer.train_step = recorded
    code = main()
    out = Path(os.environ["DIGEST_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(DIGESTS))
    sys.exit(code)
