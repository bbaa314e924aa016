#!/usr/bin/env python
"""Supervised fine-tuning: token-mean NLL on response tokens.

    deepspeed --num_gpus N launch/sft.py [--config configs/tiny/sft.yaml] [--output-dir DIR]
        [--deepspeed-config configs/deepspeed/zero2.json] [--max-steps N] [key.sub=value ...]

See synthunlearn/cli.py for every option; also runs under torchrun, srun or plain python.
"""
import sys

from synthunlearn.cli import main

if __name__ == "__main__":
    sys.exit(main("sft"))
