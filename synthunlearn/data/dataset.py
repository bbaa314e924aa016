"""``build_dataset``: a data source in the config -> a map-style data set of token ids and labels."""

from __future__ import annotations

import numpy as np

from synthunlearn.config import DataSourceConfig
from synthunlearn.data.formatting import detect_kind, format_records
from synthunlearn.data.packing import pack_examples
from synthunlearn.data.sources import load_source
from synthunlearn.data.tokenize import require_examples, tokenize_formatted


class TokenizedDataset:
    """Map-style data set: ``ds[i] -> {"input_ids": list[int], "labels": list[int]}``.

    Rows are stored as int32 arrays (compact for large sets) and returned as lists. Attributes:
    ``kind`` (record kind), ``path`` (source file), ``key`` (config key) and ``stats``:
    ``records`` (read), ``examples`` (kept after tokenisation), ``truncated``, ``dropped_empty``,
    ``tokens`` and ``label_tokens`` (over kept examples), ``rows`` (= ``len(ds)``; differs from
    ``examples`` only with packing).
    """

    def __init__(self, rows: list[dict], stats: dict, *, kind: str = "", path=None, key: str = ""):
        self._ids = [np.asarray(r["input_ids"], dtype=np.int32) for r in rows]
        self._labels = [np.asarray(r["labels"], dtype=np.int32) for r in rows]
        self.stats = stats
        self.kind, self.path, self.key = kind, path, key

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self._ids[i].tolist(), "labels": self._labels[i].tolist()}

    def __repr__(self) -> str:
        return f"TokenizedDataset({self.key}, {self.kind}, {self.stats})"


def build_dataset(src: DataSourceConfig, key: str, tokenizer, *, max_length: int, packing: bool,
                  split: str = "train") -> TokenizedDataset:
    """Load ``src`` (``split`` "train": ``src.path``, "eval": ``src.eval_path``), format, tokenise.

    ``key`` is the config key used in error messages (e.g. ``"data.forget"``). Raises
    :class:`DataError` if the file is unreadable, a record is invalid, or no example keeps a
    labelled token.
    """
    loaded = load_source(src, key, split=split)
    ds = loaded.dataset
    kind = detect_kind(ds.column_names, key, loaded.path)
    formatted = format_records(ds, kind, tokenizer, key, loaded.where)
    examples, stats = tokenize_formatted(formatted, tokenizer, max_length=max_length, key=key)
    stats = {"records": len(ds), **stats}
    require_examples(examples, stats, key, loaded.path)
    rows = pack_examples(examples, max_length) if packing else examples
    stats["rows"] = len(rows)
    return TokenizedDataset(rows, stats, kind=kind, path=loaded.path, key=key)
