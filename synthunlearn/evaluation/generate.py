"""Prompt formatting and batched greedy generation with the KV cache.

Prompt format: exactly the layout fine-tuning used (:mod:`synthunlearn.data.formatting`, the one
place it is defined): the tokenizer's chat template with ``add_generation_prompt=True`` when it
has one; otherwise the default format, a plain-text layout any tokenizer can encode::

    <bos><|user|>
    {content}
    <|assistant|>
    {content}<eos>

and the BOS id is prepended only where training prepends it (the default format; a template
renders its own). A prompt is therefore token for token the prefix of a fine-tuning example.

Decoding: greedy (``do_sample=False``) with ``use_cache=True``, prompts left-padded into batches.
A sequence stops at the model's EOS token, at the layout's end-of-turn token
(:func:`end_of_turn_ids`) or after ``max_new_tokens`` new tokens; the decoded
text is then cut at the first stop string (by default, in the default format, the next user or
system turn marker, ``"\\n<|user|>"``) and special tokens are removed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from synthunlearn.data.formatting import DEFAULT_TURN, chat_gets_bos, has_chat_template, render_chat
from synthunlearn.data.tokenize import encode

# The default format's next-turn markers: a model that runs past its EOS into a new turn is cut there.
DEFAULT_STOP_STRINGS = tuple("\n" + DEFAULT_TURN.format(role=role, content="").rstrip("\n")
                             for role in ("user", "system"))


def format_chat(tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` in the fine-tuning layout (see the module docstring); encode
    it with :func:`encode_prompt`.

    With ``add_generation_prompt`` the text ends where the assistant's reply begins (the last
    message must then not be the assistant's)."""
    return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Token ids of a text made by :func:`format_chat`, as training encodes the same turns: no
    special tokens from the tokenizer, BOS prepended in the default format only."""
    return encode(tokenizer, text, add_bos=chat_gets_bos(tokenizer))


def encode_document(tokenizer, text: str) -> List[int]:
    """Token ids of a raw document, as training encodes a ``text`` record: BOS, then the text."""
    return encode(tokenizer, text, add_bos=True)


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


def reply_text(tokenizer, ids, stop_strings: Sequence[str]) -> str:
    """The reply in generated token ``ids``: cut at the first stop string, special tokens removed,
    whitespace stripped.

    Stop strings are looked for in the decoding that keeps special tokens: a turn marker such as
    ``<|user|>`` is often a special token itself, and a decoding that skips them would erase the
    marker and let the invented next turn into the reply."""
    if not stop_strings:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    text = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=False), stop_strings)
    for special in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        text = text.replace(special, "")
    return text.strip()


def end_of_turn_ids(tokenizer) -> List[int]:
    """The special tokens the fine-tuning layout puts right after an assistant reply: EOS in the
    default format, the template's own end-of-turn token otherwise (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``...). Fine-tuning labels them with the reply, so the model
    learns to emit them, and a reply ends there. A base model's ``generation_config`` often names
    another EOS (``<|endoftext|>``): without these, generation would run on into an invented next
    turn, whose text would be scored as part of the reply."""
    reply = "Done."
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": reply}])
    except Exception:  # a template that needs more than one plain exchange: fall back to EOS alone
        return []
    tail = text[text.rindex(reply) + len(reply):]
    special = set(tokenizer.all_special_ids)
    return [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]


def _stop_token_ids(model, tokenizer):
    """generation_config's EOS (or the tokenizer's) and the layout's end-of-turn tokens; the
    original value when they add nothing, so generation is unchanged where they agree."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    known = [eos] if isinstance(eos, int) else list(eos or [])
    extra = [i for i in end_of_turn_ids(tokenizer) if i not in known]
    return known + extra if extra else eos


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
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos_ids = _stop_token_ids(model, tokenizer)
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
                results[index] = reply_text(tokenizer, new_tokens[row], stop_strings)
    finally:
        model.train(was_training)
    return results
