"""``build_dataset``: a data source in the config -> a map-style data set of token ids and labels."""

from __future__ import annotations

import math

import numpy as np

from synthunlearn.config import DataSourceConfig
from synthunlearn.errors import DataError
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
    ``examples`` with packing and with ``repeat``), and for a set of several files ``files``: the
    same per file plus its ``path``, ``kind``, ``repeat`` and ``repeated_examples``. A set of
    several files has a list of paths as ``path`` and its kinds joined by ``+`` as ``kind``.
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
    """Load ``src`` (``split`` "train": ``src.path`` or ``src.files``, "eval": ``src.eval_path``),
    format, tokenise.

    With ``files`` every file is read, its record kind detected and its records formatted on its
    own (so one set may mix documents, chat and Q-A records); each file's examples are then
    repeated ``repeat`` times (see :func:`repeat_examples`) and the files concatenated in order,
    before packing. The sampler shuffles the whole set, so the mixture is uniform over an epoch.

    ``key`` is the config key used in error messages (e.g. ``"data.forget"``). Raises
    :class:`DataError` if a file is unreadable, a record is invalid, or no example keeps a
    labelled token.
    """
    if split == "train" and src.files:
        parts = [(DataSourceConfig(path=f.path, format=f.format, max_records=f.max_records),
                  f"{key}.files[{i}]", f.repeat) for i, f in enumerate(src.files)]
    else:
        parts = [(src, key, 1.0)]
    examples, per_file, paths = [], [], []
    for part_src, part_key, repeat in parts:
        loaded = load_source(part_src, part_key, split=split)
        ds = loaded.dataset
        kind = detect_kind(ds.column_names, part_key, loaded.path)
        formatted = format_records(ds, kind, tokenizer, part_key, loaded.where)
        part, stats = tokenize_formatted(formatted, tokenizer, max_length=max_length, key=part_key)
        stats = {"records": len(ds), **stats}
        require_examples(part, stats, part_key, loaded.path)
        part = repeat_examples(part, repeat, part_key)
        per_file.append({"path": str(loaded.path), "kind": kind, "repeat": repeat, **stats,
                         "repeated_examples": len(part)})
        examples += part
        paths.append(loaded.path)
    stats = {name: sum(f[name] for f in per_file) for name in per_file[0]
             if name not in ("path", "kind", "repeat", "repeated_examples")}
    rows = pack_examples(examples, max_length) if packing else examples
    stats["rows"] = len(rows)
    if len(per_file) > 1:
        stats["files"] = per_file
    kinds = [f["kind"] for f in per_file]
    kind = kinds[0] if len(set(kinds)) == 1 else "+".join(kinds)
    path = paths[0] if len(paths) == 1 else paths
    return TokenizedDataset(rows, stats, kind=kind, path=path, key=key)


def repeat_examples(examples: list, repeat: float, key: str) -> list:
    """``examples`` ``int(repeat)`` times in order, then a fixed pseudo-random share of them for the
    fraction of ``repeat`` (``round(fraction * n)`` examples, kept in file order). The share is
    drawn from a generator with a constant seed, so it is the same on every rank, in every run and
    on resume; the training seed only changes the order, through the sampler."""
    # Config loading refuses these; a DataFileConfig built in code reaches here unchecked, and
    # int(inf) would raise OverflowError (nan: ValueError) instead of naming the setting.
    if not math.isfinite(repeat) or repeat <= 0:
        raise DataError(f"{key}.repeat={repeat}: must be a finite number > 0")
    whole, fraction = int(repeat), repeat - int(repeat)
    out = examples * whole
    extra = round(fraction * len(examples))
    if extra:
        chosen = np.sort(np.random.default_rng(0).choice(len(examples), size=extra, replace=False))
        out += [examples[i] for i in chosen]
    if not out:
        raise DataError(f"{key}.repeat={repeat}: keeps none of the file's {len(examples)} examples; "
                        "raise it")
    return out
