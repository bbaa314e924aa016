"""Micro-batches that mix the objective's data sets, one sampler per set.

In unlearning a micro-batch holds rows of the forget set, the replay set and the KL set side by
side (each with its own per-rank micro-batch size), padded to one length and tagged with their
set id, so one forward pass of the policy serves every term. Each set has its own
``StatefulSampler``: different samples on every rank, deterministic from the seed, restored
exactly on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional

import torch

from synthunlearn.config import DataConfig, DataSourceConfig
from synthunlearn.data import StatefulSampler, build_dataset, collate
from synthunlearn.errors import ConfigError
from synthunlearn.objectives.objective import KL, SET_IDS


@dataclass
class DataSet:
    name: str
    source: DataSourceConfig
    train: object
    eval: Optional[object]
    micro_batch_size: int
    sampler: StatefulSampler


def source_for(data: DataConfig, name: str) -> tuple[DataSourceConfig, str]:
    """The source config of a set; the KL set falls back to the replay files."""
    src = getattr(data, name)
    if name == KL and src.path is None and not src.files:
        fallback = DataSourceConfig(path=data.replay.path, format=data.replay.format,
                                    files=data.replay.files,
                                    global_batch_size=src.global_batch_size,
                                    eval_path=src.eval_path or data.replay.eval_path,
                                    max_records=src.max_records or data.replay.max_records)
        return fallback, "data.replay"
    return src, f"data.{name}"


def micro_batch_size(global_batch: int, key: str, world_size: int, accumulation: int) -> int:
    per_step = world_size * accumulation
    if global_batch % per_step:
        raise ConfigError(f"{key}.global_batch_size={global_batch} is not divisible by world_size "
                          f"({world_size}) x optimisation.gradient_accumulation_steps ({accumulation}) "
                          f"= {per_step}; choose a multiple of {per_step}")
    return global_batch // per_step


def build_sets(names: list[str], data: DataConfig, tokenizer, *, rank: int, world_size: int,
               accumulation: int, seed: int, unpacked: Collection[str] = ()) -> dict[str, DataSet]:
    """The training (and held-out) sets of ``names``; ``data.packing`` applies to every set except
    those in ``unpacked``, whose loss treats each row as one example."""
    sets = {}
    for name in names:
        src, key = source_for(data, name)
        if src.path is None and not src.files:
            raise ConfigError(f"data.{name}.path: the objective needs the {name} set; give its file "
                              f"(path) or files (data.{name}.files)")
        mbs = micro_batch_size(getattr(data, name).global_batch_size, f"data.{name}", world_size, accumulation)
        train = build_dataset(src, key, tokenizer, max_length=data.max_length,
                              packing=data.packing and name not in unpacked)
        evaluation = None
        if src.eval_path is not None:
            evaluation = build_dataset(src, key, tokenizer, max_length=data.max_length, packing=False,
                                       split="eval")
        # Distinct seeds per set so the forget, replay and KL orders are independent.
        sampler = StatefulSampler(len(train), micro_batch_size=mbs, rank=rank, world_size=world_size,
                                  seed=seed * 1000 + SET_IDS[name])
        sets[name] = DataSet(name, src, train, evaluation, mbs, sampler)
    return sets


def concat_rows(parts: list[tuple[str, dict]], pad_token_id: int) -> dict:
    """Stacks collated batches of several sets into one, right-padded to the longest row."""
    length = max(b["input_ids"].shape[1] for _, b in parts)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    out = {
        "input_ids": torch.cat([pad(b["input_ids"], pad_token_id) for _, b in parts]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for _, b in parts]),
        "labels": torch.cat([pad(b["labels"], -100) for _, b in parts]),
        "row_set": torch.cat([torch.full((b["input_ids"].shape[0],), SET_IDS[name], dtype=torch.long)
                              for name, b in parts]),
    }
    if all("position_ids" in b for _, b in parts):
        out["position_ids"] = torch.cat([pad(b["position_ids"], 0) for _, b in parts])
    return out


def next_micro_batch(sets: dict[str, DataSet], pad_token_id: int) -> dict:
    parts = []
    for name, ds in sets.items():
        indices = next(ds.sampler)
        parts.append((name, collate([ds.train[i] for i in indices], pad_token_id)))
    return concat_rows(parts, pad_token_id)


def eval_micro_batches(ds: DataSet, *, rank: int, world_size: int, max_batches: Optional[int],
                       pad_token_id: int):
    """This rank's share of a held-out set, in fixed order; every rank yields the same count."""
    n = len(ds.eval)
    per_batch = ds.micro_batch_size
    total_batches = -(-n // (per_batch * world_size))
    if max_batches is not None:
        total_batches = min(total_batches, max_batches)
    for b in range(total_batches):
        start = (b * world_size + rank) * per_batch
        idx = [i % n for i in range(start, start + per_batch)]
        # Rows past the end wrap around; they are masked out so each example counts once.
        batch = collate([ds.eval[i] for i in idx], pad_token_id)
        overflow = torch.tensor([i >= n for i in range(start, start + per_batch)])
        batch["labels"][overflow] = -100
        batch["row_set"] = torch.full((per_batch,), SET_IDS[ds.name], dtype=torch.long)
        yield batch
