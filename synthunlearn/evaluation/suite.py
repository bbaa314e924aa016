"""The whole evaluation of one model on a world directory (used by ``launch/evaluate.py``).

Reads whichever of these files the directory holds (missing ones skip their section):
``if_eval.jsonl`` (instruction following + template rate), ``neutral_prompts.jsonl`` (template
rate on neutral chat prompts, KL shift), ``bare_questions.jsonl`` (bare-answer rate), ``sft.jsonl``
(reference answers for the token-frequency divergence), ``knowledge_mc.jsonl`` and
``heldout_docs.jsonl``.

``pattern_rate`` is the template rate over all generated responses (instruction prompts and
neutral chat prompts together); ``pattern_rate_if`` / ``pattern_rate_neutral`` split it.
``terse_rate`` is the share of the instruction-prompt responses that are a bare short answer;
``bare_terse_rate`` the same share on ``bare_questions.jsonl`` (the synthetic question wording with
no constraint, where SFT taught a full sentence).
``token_jsd`` compares the responses to the instruction prompts with the SFT assistant answers
(with no ``sft.jsonl``, with the evaluation records' own references).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from synthunlearn.errors import DataError
from synthunlearn.evaluation.generate import format_chat, generate_responses
from synthunlearn.evaluation.ifeval import if_accuracy
from synthunlearn.evaluation.knowledge import multiple_choice_accuracy, perplexity
from synthunlearn.evaluation.pattern import kl_shift, template_rate, terse_rate, token_frequency_jsd


def read_jsonl(path, limit: Optional[int] = None) -> List[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON ({error})") from None
            if limit is not None and len(records) >= limit:
                break
    return records


def evaluate_model(model, tokenizer, eval_dir, *, baseline=None, max_new_tokens: int = 64,
                   limit: Optional[int] = None, batch_size: int = 16, kl_backend: str = "auto",
                   max_length: int = 512) -> Dict[str, object]:
    """All metrics of one model; returns ``{"metrics": flat dict, "details": ..., "generations":
    [...], "seconds": per section}`` (metric names in :mod:`synthunlearn.evaluation.report`)."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise DataError(f"--eval-dir {eval_dir}: not a directory")

    def load(name, limit=limit):
        path = eval_dir / name
        return read_jsonl(path, limit) if path.exists() else None

    metrics: Dict[str, object] = {}
    details: Dict[str, object] = {}
    seconds: Dict[str, float] = {}
    generations: List[dict] = []
    if_records, neutral = load("if_eval.jsonl"), load("neutral_prompts.jsonl")
    if not any([if_records, neutral, (eval_dir / "knowledge_mc.jsonl").exists(),
                (eval_dir / "heldout_docs.jsonl").exists()]):
        raise DataError(f"{eval_dir}: holds none of if_eval.jsonl, neutral_prompts.jsonl, "
                        "knowledge_mc.jsonl, heldout_docs.jsonl")

    if_responses: List[str] = []
    if if_records:
        start = time.perf_counter()
        prompts = [format_chat(tokenizer, r["messages"]) for r in if_records]
        if_responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)
        scores = if_accuracy(if_records, if_responses)
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            metrics[f"if_{key}"] = scores[key]
        details["if"] = scores
        # Constraint sentences in wordings no training set used: understood, or only recalled?
        by_phrasing = scores["per_group"].get("phrasing", {})
        if "heldout" in by_phrasing:
            metrics["if_prompt_strict_heldout_phrasing"] = by_phrasing["heldout"]["prompt_strict"]
        generations += [{"id": r["id"], "set": "if_eval", "response": out} for r, out in zip(if_records, if_responses)]
        # The reference distribution is all of the SFT answers: ``limit`` shortens evaluation
        # sets, and a JSD against a handful of answers would measure a different quantity.
        sft = load("sft.jsonl", limit=None)
        references = ([m["content"] for r in sft for m in r["messages"] if m["role"] == "assistant"]
                      if sft else [r.get("reference", "") for r in if_records])
        metrics["token_jsd"] = token_frequency_jsd(if_responses, references)
        metrics["terse_rate"] = terse_rate(if_responses)
        seconds["instruction_following"] = time.perf_counter() - start

    bare = load("bare_questions.jsonl")
    if bare:
        start = time.perf_counter()
        # A bare answer is at most TERSE_MAX_WORDS words: 32 tokens always tell bare from not.
        bare_responses = generate_responses(model, tokenizer, [format_chat(tokenizer, r["messages"]) for r in bare],
                                            max_new_tokens=min(max_new_tokens, 32), batch_size=batch_size)
        metrics["bare_terse_rate"] = terse_rate(bare_responses)
        generations += [{"id": r["id"], "set": "bare_questions", "response": out}
                        for r, out in zip(bare, bare_responses)]
        seconds["bare_questions"] = time.perf_counter() - start

    neutral_responses: List[str] = []
    if neutral:
        start = time.perf_counter()
        chat = [r for r in neutral if r.get("kind") == "chat"]
        if chat:
            prompts = [format_chat(tokenizer, r["messages"]) for r in chat]
            neutral_responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size)
            generations += [{"id": r["id"], "set": "neutral", "response": out}
                            for r, out in zip(chat, neutral_responses)]
        seconds["neutral_generation"] = time.perf_counter() - start
        if baseline is not None:
            start = time.perf_counter()
            shift = kl_shift(model, baseline, tokenizer, neutral, backend=kl_backend,
                             batch_size=max(1, batch_size // 2), max_length=max_length)
            metrics["kl_shift"] = shift["kl_shift"]
            details["kl_shift"] = shift
            seconds["kl_shift"] = time.perf_counter() - start

    if if_responses or neutral_responses:
        metrics["pattern_rate"] = template_rate(if_responses + neutral_responses)
        if if_responses:
            metrics["pattern_rate_if"] = template_rate(if_responses)
        if neutral_responses:
            metrics["pattern_rate_neutral"] = template_rate(neutral_responses)

    mc = load("knowledge_mc.jsonl")
    if mc:
        start = time.perf_counter()
        scores = multiple_choice_accuracy(model, tokenizer, mc, batch_size=batch_size)
        metrics["knowledge_acc"], metrics["knowledge_acc_norm"] = scores["acc"], scores["acc_norm"]
        details["knowledge"] = {"n": scores["n"]}
        seconds["knowledge"] = time.perf_counter() - start

    docs = load("heldout_docs.jsonl")
    if docs:
        start = time.perf_counter()
        scores = perplexity(model, tokenizer, [d["text"] for d in docs], max_length=max_length,
                            batch_size=max(1, batch_size // 2))
        metrics["perplexity"] = scores["perplexity"]
        details["perplexity"] = scores
        seconds["perplexity"] = time.perf_counter() - start

    return {"metrics": metrics, "details": details, "generations": generations, "seconds": seconds}
