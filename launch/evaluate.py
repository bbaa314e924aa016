"""Evaluate any Hugging Face causal LM directory on a world's evaluation sets.

    python launch/evaluate.py --model DIR --eval-dir WORLD_DIR [--baseline DIR] --output FILE.json
                              [--max-new-tokens N] [--limit N] [--batch-size N] [--kl-backend auto]
                              [--plot FILE.png]

Prompts use the tokenizer's chat template, or without one the plain-text format documented in
:mod:`synthunlearn.evaluation.generate`. ``--baseline`` (a model sharing the tokenizer) enables
the KL shift. ``--limit`` keeps the first N records of every evaluation set. The JSON holds the
flat ``metrics``, per-constraint ``details``, every generation and timings; the markdown table
is printed. Metric definitions: synthunlearn/evaluation/*.py docstrings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from synthunlearn.errors import UserError


def _load(path: str, flag: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthunlearn.modeling import check_model_dir

    if not Path(path).is_dir():
        raise UserError(f"{flag} {path}: not a model directory")
    # The trainer's rule for any model it is handed: safetensors weights only (pickle-based ones
    # can run code when loaded) and no code shipped with the model.
    check_model_dir(path, flag, trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot load a causal LM and tokenizer ({error})") from None
    return model.to(device).eval(), tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--eval-dir", required=True, help="world directory (python -m synthunlearn.experiment.world)")
    parser.add_argument("--baseline", help="model directory to measure the KL shift against")
    parser.add_argument("--output", required=True, help="results JSON path")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N records of each set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="token limit for scored texts")
    parser.add_argument("--kl-backend", default="auto", choices=["auto", "torch", "triton", "cpu"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--plot", help="also write a PNG of the headline metrics")
    args = parser.parse_args(argv)

    from synthunlearn import environment
    from synthunlearn.evaluation.report import markdown_table, plot_headline, write_json
    from synthunlearn.evaluation.suite import evaluate_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    try:
        model, tokenizer = _load(args.model, "--model", device, dtype)
        baseline = None
        if args.baseline:
            baseline, baseline_tokenizer = _load(args.baseline, "--baseline", device, dtype)
            if baseline_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise UserError(f"--baseline {args.baseline}: its tokenizer differs from --model's; "
                                "the KL shift needs a shared vocabulary")
        results = evaluate_model(model, tokenizer, args.eval_dir, baseline=baseline,
                                 max_new_tokens=args.max_new_tokens, limit=args.limit,
                                 batch_size=args.batch_size, kl_backend=args.kl_backend,
                                 max_length=args.max_length)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results.update({"model": str(args.model), "baseline": args.baseline, "eval_dir": str(args.eval_dir),
                    "max_new_tokens": args.max_new_tokens, "limit": args.limit, "device": device,
                    "dtype": args.dtype, "environment": environment.describe(),
                    "wall_seconds": time.perf_counter() - started})
    write_json(args.output, results)
    if args.plot:
        plot_headline({Path(args.model).name: results["metrics"]}, args.plot)
    print(markdown_table(results["metrics"]))
    print(f"\nwrote {args.output} ({results['wall_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
