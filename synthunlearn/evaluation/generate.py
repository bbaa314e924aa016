"""Prompt formatting and batched greedy generation with the KV cache.

Prompt format: the tokenizer's chat template with ``add_generation_prompt=True`` when it has one;
otherwise :data:`DEFAULT_CHAT_FORMAT`, a plain-text format any tokenizer can encode::

    ### User:
    {content}

    ### Assistant:
    {content}<eos>

The data pipeline must format SFT records with :func:`format_chat` too, so that training and
evaluation see the same layout.

Decoding: greedy (``do_sample=False``) with ``use_cache=True``, prompts left-padded into batches.
A sequence stops at the model's EOS token or after ``max_new_tokens`` new tokens; the decoded
text is then cut at the first stop string (by default, in the plain-text format, the next
``"\\n### User:"`` turn marker) and special tokens are removed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

DEFAULT_CHAT_FORMAT = {"user": "### User:\n{content}\n\n", "assistant": "### Assistant:\n{content}",
                       "system": "### System:\n{content}\n\n"}
DEFAULT_STOP_STRINGS = ("\n### User:", "\n### System:")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``: the chat template if any, else the documented default.

    With ``add_generation_prompt`` the text ends where the assistant's reply begins (the last
    message must then not be the assistant's)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    parts = []
    for message in messages:
        template = DEFAULT_CHAT_FORMAT.get(message["role"])
        if template is None:
            raise ValueError(f"unsupported chat role {message['role']!r}")
        text = template.format(content=message["content"])
        if message["role"] == "assistant":
            text += (tokenizer.eos_token or "") + "\n\n"
        parts.append(text)
    if add_generation_prompt:
        parts.append(DEFAULT_CHAT_FORMAT["assistant"].format(content=""))
    return "".join(parts)


def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids of an already formatted text; the tokenizer's special tokens (BOS) are added
    unless the text already starts with the BOS string (chat templates often render it)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def ensure_pad_token(tokenizer) -> int:
    """The pad id; tokenizers without one pad with EOS (the padded positions are masked)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None):
    """(input_ids, attention_mask) with every sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                       batch_size: int = 16, stop_strings: Optional[Sequence[str]] = None,
                       max_prompt_tokens: Optional[int] = None) -> List[str]:
    """Greedy continuations of already formatted ``prompts`` (see the module docstring).

    Prompts are sorted by length before batching (less padding) and results returned in input
    order. ``max_prompt_tokens`` keeps the last tokens of over-long prompts."""
    if stop_strings is None:
        stop_strings = () if has_chat_template(tokenizer) else DEFAULT_STOP_STRINGS
    pad_id = ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    encoded = [encode_text(tokenizer, p) for p in prompts]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos_ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos_ids is None:
        eos_ids = tokenizer.eos_token_id
    results: List[Optional[str]] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    use_cache=True, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                    eos_token_id=eos_ids, num_beams=1, temperature=None, top_p=None,
                                    top_k=None)
            new_tokens = output[:, input_ids.shape[1]:]
            for row, index in enumerate(batch):
                text = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                results[index] = _cut_at_stop(text, stop_strings).strip()
    finally:
        model.train(was_training)
    return results
