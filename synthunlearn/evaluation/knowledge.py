"""Knowledge: multiple-choice accuracy by log-likelihood, and perplexity on held-out documents.

Multiple choice (as lm-eval scores MMLU-style tasks): for a record with ``context`` (or, without
one, ``question``), ``choices`` and the correct index ``answer``, each choice is scored as the
continuation ``" " + choice`` of the context:

    ll(c) = sum over the continuation's tokens t of log p(t | context, earlier continuation tokens)

Tokens are split as lm-eval does: ``encode(context + " " + choice)`` and the continuation is
everything after the first ``len(encode(context))`` tokens, so merges across the boundary do not
drop characters. ``acc`` is the fraction of records whose highest ``ll`` is the answer;
``acc_norm`` uses ``ll(c) / len(c)`` (log-likelihood per character of the choice, without the
delimiter: lm-eval's length normalisation), which removes the bias toward short choices. Ties go
to the lowest index.

Perplexity: each document is encoded on its own as training encodes a ``text`` record (the BOS
id, then the text's tokens; see :func:`synthunlearn.data.tokenize.encode`), truncated to
``max_length`` tokens, and every token after the first is predicted from its prefix. ``perplexity = exp(sum NLL / number of predicted tokens)`` over all documents
(token-weighted, not a mean of per-document perplexities); ``nll_per_token`` is the exponent.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from synthunlearn.evaluation.generate import encode_document, ensure_pad_token


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[Tuple[List[int], List[int]]], pad_id: int,
                          batch_size: int = 16) -> List[Tuple[float, int]]:
    """(sum log-prob, token count) of each continuation given its context (token ids)."""
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: List[Tuple[float, int]] = [(0.0, 0)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            sequences = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
            width = max(len(s) for s in sequences)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(sequences):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, index in enumerate(batch):
                n_context, n_cont = len(pairs[index][0]), len(pairs[index][1])
                if n_cont == 0:
                    continue
                # Position p predicts token p+1: the continuation starts at n_context.
                row_logits = logits[row, n_context - 1:n_context - 1 + n_cont].float()
                targets = ids[row, n_context:n_context + n_cont].to(row_logits.device)
                logp = torch.log_softmax(row_logits, dim=-1).gather(1, targets[:, None]).sum()
                results[index] = (float(logp), n_cont)
    finally:
        model.train(was_training)
    return results


def _split_context_continuation(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    # lm-eval moves trailing spaces of the context into the continuation.
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer(stripped)["input_ids"]
    whole_ids = tokenizer(stripped + continuation)["input_ids"]
    return context_ids, whole_ids[len(context_ids):]


def multiple_choice_accuracy(model, tokenizer, records: Sequence[dict], batch_size: int = 16,
                             delimiter: str = " ") -> Dict[str, float]:
    """``acc``, ``acc_norm`` (definitions in the module docstring) and ``n``."""
    pad_id = ensure_pad_token(tokenizer)
    requests, spans = [], []
    for record in records:
        context = record.get("context") or record["question"]
        first = len(requests)
        for choice in record["choices"]:
            requests.append(_split_context_continuation(tokenizer, context, delimiter + choice))
        spans.append((first, len(requests)))
    scores = continuation_logprobs(model, requests, pad_id, batch_size)
    hits = hits_norm = 0
    per_record = []
    for record, (first, last) in zip(records, spans):
        lls = [scores[i][0] for i in range(first, last)]
        norm = [ll / max(len(c), 1) for ll, c in zip(lls, record["choices"])]
        pred, pred_norm = lls.index(max(lls)), norm.index(max(norm))
        hits += pred == record["answer"]
        hits_norm += pred_norm == record["answer"]
        per_record.append(pred)
    n = len(records)
    return {"acc": hits / n if n else math.nan, "acc_norm": hits_norm / n if n else math.nan, "n": n,
            "predictions": per_record}


def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 512,
               batch_size: int = 8) -> Dict[str, float]:
    """Token-weighted perplexity over ``texts`` (definition in the module docstring)."""
    pad_id = ensure_pad_token(tokenizer)
    pairs = []
    for text in texts:
        ids = encode_document(tokenizer, text)[:max_length]
        if len(ids) >= 2:
            pairs.append((ids[:1], ids[1:]))
    scores = continuation_logprobs(model, pairs, pad_id, batch_size)
    total_logp = sum(s for s, _ in scores)
    total_tokens = sum(n for _, n in scores)
    if total_tokens == 0:
        return {"perplexity": math.nan, "nll_per_token": math.nan, "tokens": 0}
    nll = -total_logp / total_tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": total_tokens}
