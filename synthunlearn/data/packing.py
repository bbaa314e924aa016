"""Packing: several tokenised examples per row of at most ``max_length`` tokens.

Greedy, in data-set order, never splitting an example: an example joins the current row if it
fits, else starts a new one. Rows are therefore up to ``max_length`` long (the tail is padded by
:func:`~synthunlearn.data.collate.collate`), and every labelled token keeps its own prompt as
context, which splitting an example across rows would lose. Labels are concatenated unchanged
(each example's first token stays unlabelled).

Attention is NOT blocked between examples of a row and positions run on continuously: this is
naive packing as in GPT-style pre-training. Each example starts with BOS (when the tokenizer has
one) and complete ones end with EOS, so the model sees document boundaries, but a later example
can attend to the earlier ones in its row. Use packing for efficiency on raw text; leave it off
(the default) where exact per-example conditioning matters, e.g. evaluation (always unpacked).
"""

from __future__ import annotations


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex["input_ids"]) > max_length:
            rows.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids = ids + ex["input_ids"]
        labels = labels + ex["labels"]
    if ids:
        rows.append({"input_ids": ids, "labels": labels})
    return rows
