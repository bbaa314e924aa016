#!/usr/bin/env python
"""Unlearning of the synthetic-data pattern: forgetting term (capped ascent by default) on the
forget set + replay NLL + per-token KL to the frozen reference.

    deepspeed --num_gpus N launch/unlearn.py [--config configs/tiny/unlearn.yaml] [--output-dir DIR]
        [--deepspeed-config configs/deepspeed/zero2.json] [--max-steps N] [key.sub=value ...]

See synthunlearn/cli.py for every option; also runs under torchrun, srun or plain python.
"""
import sys

from synthunlearn.cli import main

if __name__ == "__main__":
    sys.exit(main("unlearn"))
