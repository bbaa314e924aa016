"""Micro-batch assembly: right padding to the longest example of the batch."""

from __future__ import annotations

import torch

from synthunlearn.data.tokenize import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples ``{"input_ids", "labels"}`` into ``(B, T)`` long tensors, T = longest example.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 real, 0 pad) and
    ``labels`` (``-100`` on padding). Any id works as padding since padded positions are masked
    in attention and loss. No ``position_ids``: packed rows use continuous positions.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None (give the tokenizer a pad or eos token)")
    length = max(len(ex["input_ids"]) for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"collate: example {row} has {n} input ids but {len(ex['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
