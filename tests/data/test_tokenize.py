"""Truncation and drop accounting, packing, collation and the vocabulary check."""

import pytest
import torch

from synthunlearn.config import DataSourceConfig
from synthunlearn.data import IGNORE_INDEX, build_dataset, check_vocab, collate
from synthunlearn.errors import ConfigError, DataError


def build(path, tok, max_length, packing=False):
    return build_dataset(DataSourceConfig(path=str(path)), "data.sft", tok, max_length=max_length,
                         packing=packing)


def test_truncation_counted(tok, write_jsonl):
    long = " ".join(["word"] * 100)
    ds = build(write_jsonl([{"text": long}, {"text": "short"}]), tok, max_length=16)
    assert ds.stats["truncated"] == 1 and ds.stats["dropped_empty"] == 0
    assert len(ds[0]["input_ids"]) == 16 and ds[0]["input_ids"][-1] != tok.eos_token_id
    assert ds.stats["records"] == ds.stats["examples"] == 2
    assert ds.stats["tokens"] == 16 + len(ds[1]["input_ids"])


def test_prompt_longer_than_max_length_dropped(tok, write_jsonl):
    recs = [{"prompt": " ".join(["long"] * 60), "response": "ok"}, {"prompt": "hi", "response": "ok"}]
    ds = build(write_jsonl(recs), tok, max_length=24)
    assert len(ds) == 1 and ds.stats["dropped_empty"] == 1 and ds.stats["truncated"] == 1
    assert ds.stats["label_tokens"] == sum(l != IGNORE_INDEX for l in ds[0]["labels"])


def test_all_dropped_is_an_error(tok, write_jsonl):
    path = write_jsonl([{"prompt": " ".join(["long"] * 60), "response": "ok"}] * 3)
    with pytest.raises(DataError, match=r"data\.sft: .*data\.jsonl: every one of 3 records was dropped"):
        build(path, tok, max_length=24)


def test_packing(tok, write_jsonl):
    recs = [{"text": " ".join(["w"] * (i % 7 + 1))} for i in range(40)]
    path = write_jsonl(recs)
    plain, packed = build(path, tok, 32), build(path, tok, 32, packing=True)
    assert len(packed) < len(plain) and packed.stats["rows"] == len(packed)
    assert packed.stats["examples"] == plain.stats["examples"] == 40
    assert all(len(packed[i]["input_ids"]) <= 32 for i in range(len(packed)))
    # Concatenating rows gives back the examples in order, labels aligned with them.
    flat = lambda ds, k: [t for i in range(len(ds)) for t in ds[i][k]]  # noqa: E731
    assert flat(packed, "input_ids") == flat(plain, "input_ids")
    assert flat(packed, "labels") == flat(plain, "labels")
    assert packed[0]["input_ids"].count(tok.bos_token_id) > 1


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "labels": [-100]}], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_feeds_the_tiny_model(tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    ds = build_dataset(DataSourceConfig(path="builtin:tiny/forget.jsonl", max_records=4), "data.forget",
                       tok, max_length=64, packing=False)
    batch = collate([ds[i] for i in range(4)], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_check_vocab(tok):
    class Cfg:
        vocab_size = len(tok)

    check_vocab(tok, Cfg, "model.tokenizer_path")
    Cfg.vocab_size = len(tok) + 100  # padded embedding: fine
    check_vocab(tok, Cfg, "model.tokenizer_path")
    Cfg.vocab_size = len(tok) - 1
    with pytest.raises(ConfigError, match=r"model\.tokenizer_path: the tokenizer has \d+ tokens"):
        check_vocab(tok, Cfg, "model.tokenizer_path")
