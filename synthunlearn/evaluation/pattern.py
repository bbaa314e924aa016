"""Pattern overfitting: how far a model's outputs have moved toward the synthetic Q-A template.

Four measures:

(a) **template rate** (:func:`template_rate`): the fraction of generated responses that contain a
    line beginning with a Q-A marker -- ``Question:``, ``Answer:``, ``Q:`` or ``A:``, any letter
    case, optional spaces before the colon (:data:`TEMPLATE_RE`). The synthetic data is rendered
    ``Question: {q}\\nAnswer: {a}``, so a model that has absorbed the template tends to open its
    reply with ``Answer:`` or to run on into a new ``Question:`` line. A marker inside a line (e.g.
    "Here is my answer:") does not count.

(a') **terse rate** (:func:`terse_rate`): the fraction of responses that are a bare short answer
    -- one sentence of at most :data:`TERSE_MAX_WORDS` words (``Composer.``, ``Indigo Works.``),
    the shape of every synthetic answer whatever markers surround it. On instruction prompts that
    ask for length or structure, a terse reply is the synthetic habit overriding the instruction.

(b) **KL shift** (:func:`kl_shift`): the mean, over every continuation token of the neutral
    prompts, of the forward KL divergence of the model's next-token distribution from the
    baseline's, ``KL(p_baseline(. | prefix) || p_model(. | prefix))`` in nats, both models reading
    the same reference text (teacher forcing). Computed from the final hidden states and the
    output matrices with the fused op :func:`synthunlearn.ops.linear_logprob_kl` (the model as
    policy, the baseline as reference). A model compared with itself scores 0. Token-weighted
    mean over all records; also reported per record kind and the two models' NLL on the same
    tokens.

(c) **token-frequency divergence** (:func:`token_frequency_jsd`): the Jensen-Shannon divergence,
    in bits (so within [0, 1]), between the unigram distributions of two text collections --
    typically the generated responses against the SFT reference answers. Tokens are lower-cased
    runs of letters/digits and single punctuation characters (:data:`FREQUENCY_TOKEN_RE`), so
    format marks (``:``, ``*``, ``"``) count. ``JSD(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M)``,
    ``M = (P + Q) / 2``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from synthunlearn.evaluation.generate import encode_document, encode_prompt, ensure_pad_token, format_chat
from synthunlearn.ops import linear_logprob_kl

TEMPLATE_RE = re.compile(r"^[ \t]*(?:question|answer|q|a)[ \t]*:", re.IGNORECASE | re.MULTILINE)
FREQUENCY_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def shows_template(response: str) -> bool:
    """Whether one response shows the synthetic Q-A template (definition (a))."""
    return TEMPLATE_RE.search(response) is not None


def template_rate(responses: Sequence[str]) -> float:
    """Fraction of responses showing the template; ``nan`` for no responses."""
    if not responses:
        return math.nan
    return sum(shows_template(r) for r in responses) / len(responses)


TERSE_MAX_WORDS = 4
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)")


def is_terse(response: str, max_words: int = TERSE_MAX_WORDS) -> bool:
    """Whether one response is a bare short answer (definition (a')): non-empty, at most
    ``max_words`` whitespace-separated words, and at most one sentence end."""
    text = response.strip()
    if not text:
        return False
    return len(text.split()) <= max_words and len(_SENTENCE_END_RE.findall(text)) <= 1


def terse_rate(responses: Sequence[str], max_words: int = TERSE_MAX_WORDS) -> float:
    """Fraction of responses that are bare short answers; ``nan`` for no responses."""
    if not responses:
        return math.nan
    return sum(is_terse(r, max_words) for r in responses) / len(responses)


def token_frequencies(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(FREQUENCY_TOKEN_RE.findall(text.lower()))
    return counts


def token_frequency_jsd(texts: Iterable[str], reference_texts: Iterable[str]) -> float:
    """Jensen-Shannon divergence in bits of the two unigram distributions (definition (c))."""
    p_counts, q_counts = token_frequencies(texts), token_frequencies(reference_texts)
    p_total, q_total = sum(p_counts.values()), sum(q_counts.values())
    if p_total == 0 or q_total == 0:
        return math.nan
    terms = []
    for token in set(p_counts) | set(q_counts):
        p, q = p_counts[token] / p_total, q_counts[token] / q_total
        m = (p + q) / 2
        if p:
            terms.append(0.5 * p * math.log2(p / m))
        if q:
            terms.append(0.5 * q * math.log2(q / m))
    # fsum is correctly rounded, so the result does not depend on the set's iteration order,
    # which changes with PYTHONHASHSEED from one process to the next (a plain sum moved the
    # 15th digit between two runs of the same models).
    return max(0.0, min(1.0, math.fsum(terms)))


def _is_chat(record: dict) -> bool:
    return record.get("kind") == "chat" or "messages" in record


def neutral_texts(tokenizer, record: dict):
    """(prompt text, continuation text) of a neutral record: chat records go through
    :func:`format_chat`, document records are used as raw text."""
    if _is_chat(record):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        return format_chat(tokenizer, messages, add_generation_prompt=True), record["continuation"]
    return record["prompt"], record["continuation"]


def neutral_ids(tokenizer, record: dict):
    """(prompt ids, prompt + continuation ids) of a neutral record, encoded as training encodes
    its kind: a chat rendering like a fine-tuning example, a document like a ``text`` record."""
    prompt, continuation = neutral_texts(tokenizer, record)
    encode = encode_prompt if _is_chat(record) else encode_document
    return encode(tokenizer, prompt), encode(tokenizer, prompt + continuation)


def _final_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """Final (normalised) hidden states, the input of the output projection."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]


def _head_is_linear(model, input_ids, attention_mask, hidden) -> bool:
    """Whether ``logits == hidden @ W.T`` for this model (no bias, scaling or soft-capping)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return False
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    direct = hidden.float() @ head.weight.float().T
    return torch.allclose(direct, logits, rtol=1e-3, atol=1e-3 * max(1.0, float(logits.abs().max())))


def _call_op(hidden, weight, labels, ref_hidden, ref_weight, backend):
    try:
        return linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight,
                                 kl_direction="forward", backend=backend)
    except ImportError as error:
        # Only "auto" may fall back: an explicitly requested backend that is missing is an error.
        if backend != "auto":
            raise
        warnings.warn(f"fused linear_logprob_kl backend unavailable ({error}); using backend='torch'")
        return linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight,
                                 kl_direction="forward", backend="torch")


def _direct_kl(model, baseline, ids, mask, labels):
    """KL / log-probs from the models' logits (for heads that are not a plain linear map)."""
    logp_model = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    logp_base = torch.log_softmax(baseline(input_ids=ids, attention_mask=mask).logits.float(), -1)
    valid = labels != -100
    lm, lb = logp_model[valid], logp_base[valid]
    kl = (lb.exp() * (lb - lm)).sum(-1)
    targets = labels[valid][:, None]
    return lm.gather(1, targets).squeeze(1), kl, lb.gather(1, targets).squeeze(1)


@torch.no_grad()
def kl_shift(model, baseline, tokenizer, records: Sequence[dict], *, backend: str = "auto",
             batch_size: int = 8, max_length: int = 512) -> Dict[str, object]:
    """Mean per-token KL(p_baseline || p_model) on the continuations of neutral records
    (definition (b)); both models must share ``tokenizer``'s vocabulary."""
    w_model = model.get_output_embeddings().weight
    w_base = baseline.get_output_embeddings().weight
    if w_model.shape[0] != w_base.shape[0]:
        raise ValueError(f"model and baseline vocabularies differ ({w_model.shape[0]} vs {w_base.shape[0]} "
                         "output rows); the KL shift needs a shared tokenizer")
    pad_id = ensure_pad_token(tokenizer)
    device = w_model.device
    items = []
    for record in records:
        prompt_ids, full_ids = neutral_ids(tokenizer, record)
        full_ids = full_ids[:max_length]
        if len(full_ids) > len(prompt_ids):
            items.append((full_ids, len(prompt_ids), record.get("kind", "document")))
    sums: Dict[str, List[float]] = {}
    totals = {"kl": 0.0, "nll": 0.0, "ref_nll": 0.0, "tokens": 0}
    linear_heads: Optional[bool] = None
    modes = (model.training, baseline.training)
    model.eval()
    baseline.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for row, (seq, n_prompt, _) in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                # Position p predicts token p+1; only continuation tokens are scored.
                labels[row, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            hidden = _final_hidden(model, ids, mask)
            ref_hidden = _final_hidden(baseline, ids.to(w_base.device), mask.to(w_base.device)).to(device)
            if linear_heads is None:
                linear_heads = (_head_is_linear(model, ids, mask, hidden)
                                and _head_is_linear(baseline, ids.to(w_base.device), mask.to(w_base.device),
                                                    ref_hidden.to(w_base.device)))
            valid = labels != -100
            if linear_heads:
                out = _call_op(hidden[valid], w_model, labels[valid], ref_hidden[valid],
                               w_base.to(device), backend)
                logp, kl, ref_logp = out.logp, out.kl, out.ref_logp
            else:
                logp, kl, ref_logp = _direct_kl(model, baseline, ids, mask, labels)
            kinds = [kind for row, (_, _, kind) in enumerate(batch) for _ in range(int(valid[row].sum()))]
            for kind, value in zip(kinds, kl.tolist()):
                entry = sums.setdefault(kind, [0.0, 0])
                entry[0] += value
                entry[1] += 1
            totals["kl"] += float(kl.sum())
            totals["nll"] -= float(logp.sum())
            totals["ref_nll"] -= float(ref_logp.sum())
            totals["tokens"] += int(valid.sum())
    finally:
        model.train(modes[0])
        baseline.train(modes[1])
    n = totals["tokens"]
    return {
        "kl_shift": totals["kl"] / n if n else math.nan,
        "model_nll": totals["nll"] / n if n else math.nan,
        "baseline_nll": totals["ref_nll"] / n if n else math.nan,
        "tokens": n,
        "per_kind": {kind: total / count for kind, (total, count) in sorted(sums.items())},
        "method": "fused" if linear_heads in (None, True) else "logits",
    }
