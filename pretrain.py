#!/usr/bin/env python
"""Entry point: ``python pretrain.py --config configs/tiny.yaml [section.key=value ...]`` (also under torchrun)."""

import sys

from lotus_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
