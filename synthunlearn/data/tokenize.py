"""Formatted examples -> ``input_ids`` and ``labels``, with truncation and drop statistics.

Labels follow the Hugging Face convention: ``labels[t] = input_ids[t]`` where token ``t`` carries
loss and ``-100`` elsewhere; the model shifts them (token ``t`` is predicted from ``< t``). A token
carries loss when its first character lies inside one of the example's labelled character spans
(see :mod:`synthunlearn.data.formatting`), so a token straddling the prompt/answer boundary
belongs to the prompt. ``labels[0]`` is always ``-100``: the first token is never predicted.

Sequences longer than ``max_length`` are cut at the end (the EOS is lost) and counted as
``truncated``; examples left without any labelled token (e.g. a prompt longer than
``max_length``, or a chat without assistant turns) are dropped and counted as ``dropped_empty``.
"""

from __future__ import annotations

from synthunlearn.errors import ConfigError, DataError

IGNORE_INDEX = -100
_BATCH = 512  # texts per tokenizer call: batched calls run in the tokenizer's Rust threads


def tokenize_formatted(formatted, tokenizer, *, max_length: int, key: str):
    """Token ids and labels for :class:`~synthunlearn.data.formatting.Formatted` examples.

    Returns ``(examples, stats)``: examples are ``{"input_ids": list[int], "labels": list[int]}``;
    stats counts ``examples`` (kept), ``truncated``, ``dropped_empty``, ``tokens`` and
    ``label_tokens`` (of the kept examples, after truncation).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}: a fast (Rust) tokenizer is required to locate labelled tokens "
                          f"(character offsets); got {type(tokenizer).__name__}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples, truncated, dropped, n_tokens, n_labels = [], 0, 0, 0, 0
    for start in range(0, len(formatted), _BATCH):
        chunk = formatted[start:start + _BATCH]
        enc = tokenizer([f.text for f in chunk], add_special_tokens=False,
                        return_offsets_mapping=True, return_attention_mask=False)
        for f, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            labels = [tok if any(a <= s < b for a, b in f.spans) else IGNORE_INDEX
                      for tok, (s, _) in zip(ids, offsets)]
            ids = list(ids)
            if f.add_bos and bos is not None:
                ids.insert(0, bos)
                labels.insert(0, IGNORE_INDEX)
            if f.add_eos and eos is not None:
                ids.append(eos)
                labels.append(eos)
            if len(ids) > max_length:
                truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if labels:
                labels[0] = IGNORE_INDEX
            n_lab = sum(1 for x in labels if x != IGNORE_INDEX)
            if n_lab == 0:
                dropped += 1
                continue
            examples.append({"input_ids": ids, "labels": labels})
            n_tokens += len(ids)
            n_labels += n_lab
    stats = {"examples": len(examples), "truncated": truncated, "dropped_empty": dropped,
             "tokens": n_tokens, "label_tokens": n_labels}
    return examples, stats


def encode(tokenizer, text: str, *, add_bos: bool) -> list[int]:
    """Token ids of one text by the rule :func:`tokenize_formatted` applies to every example: the
    tokenizer's own special tokens are never added (its post-processor might add a BOS, or none),
    the BOS id is prepended explicitly when ``add_bos`` (and the tokenizer has one). Evaluation
    encodes its prompts and documents with this so that they match what training saw."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos] + ids if add_bos and bos is not None else ids


def check_vocab(tokenizer, model_config, key: str = "model.tokenizer_path") -> None:
    """ConfigError when the tokenizer can emit ids the model has no embedding row for.

    ``len(tokenizer)`` (base vocabulary + added tokens) must not exceed ``model_config.vocab_size``;
    a model with *more* rows (padded vocabulary) is fine.
    """
    n = len(tokenizer)
    rows = getattr(model_config, "vocab_size", None)
    if rows is None:
        raise ConfigError(f"{key}: the model config has no vocab_size to check the tokenizer against")
    if n > rows:
        raise ConfigError(f"{key}: the tokenizer has {n} tokens but the model's embedding has only "
                          f"{rows} rows (config.vocab_size); ids >= {rows} would index out of range. "
                          "Use the tokenizer that belongs to the model, or resize the embeddings")


def require_examples(examples, stats: dict, key: str, path) -> None:
    if not examples:
        raise DataError(f"{key}: {path}: every one of {stats['records']} records was dropped "
                        f"({stats['dropped_empty']} had no labelled tokens within max_length, "
                        f"{stats['truncated']} were truncated); raise data.max_length or check the "
                        "records' fields")
