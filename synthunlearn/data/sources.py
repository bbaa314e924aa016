"""Locating and reading data files into ``datasets.Dataset`` tables, with errors that say where.

Accepted sources (``DataSourceConfig.path`` / ``eval_path``):

- ``builtin:<relative path>``: a file bundled in ``synthunlearn/assets``, e.g.
  ``builtin:tiny/sft.jsonl``.
- a local path (relative paths resolve against the current directory) to
  - JSON Lines (``.jsonl``; format ``jsonl``): one JSON object per line, blank lines allowed;
  - JSON (``.json``; format ``json``): one top-level array of objects (a ``.json`` file whose
    first non-blank character is not ``[`` is read as JSON Lines, as many such files are);
  - Parquet (``.parquet``; format ``parquet``);
  - a directory written by ``Dataset.save_to_disk`` (format ``disk``); a saved ``DatasetDict``
    must contain a ``train`` split, which is used for both train and eval paths.

``format: auto`` picks by the above: directory -> disk, else by extension.

JSON/JSONL files are checked line by line before ``datasets`` sees them, so a broken file fails
with ``<file>:<line>: ...`` instead of an Arrow stack trace: every line must be UTF-8 and a JSON
object, and a field must hold the same JSON type (string, number, boolean, array, object) in every
record, null allowed. Field *contents* are checked later by the formatter, which names the record.
The table is built from the records that check parsed, so it always holds the file's current
content (``load_dataset``'s cache keys a file by path, size and modification time, and would serve
the rows of a replaced file of the same size and time); Parquet is read directly for the same
reason. Only ``save_to_disk`` directories go through ``datasets``' own loader.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from synthunlearn.config import DataSourceConfig
from synthunlearn.errors import DataError
from synthunlearn.tiny_model import ASSETS_DIR, BUILTIN_PREFIX  # one home for "builtin:" assets
_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def resolve_data_path(spec: str, key: str = "data") -> Path:
    """The existing file or directory that ``spec`` names; :class:`DataError` naming ``key`` if none.

    ``builtin:tiny/sft.jsonl`` -> ``<package>/assets/tiny/sft.jsonl``; anything else is a local
    path, relative to the current directory.
    """
    if spec.startswith(BUILTIN_PREFIX):
        rel = spec[len(BUILTIN_PREFIX):]
        path = (ASSETS_DIR / rel).resolve()
        if ASSETS_DIR.resolve() not in path.parents or not path.exists():
            available = sorted(str(p.relative_to(ASSETS_DIR)) for p in ASSETS_DIR.rglob("*.jsonl"))
            raise DataError(f"{key}: unknown builtin data {spec!r}; available: "
                            + ", ".join(BUILTIN_PREFIX + a for a in available))
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{key}: data file {spec!r} not found (resolved to {path.absolute()})")
    return path


@dataclass
class LoadedRecords:
    """A loaded table plus what is needed to point at one of its records in an error message."""

    dataset: "datasets.Dataset"  # noqa: F821
    path: Path
    key: str
    # For JSON Lines: the 1-based line number of each record, so errors can say ``file:line``.
    line_numbers: Optional[list[int]] = None

    def where(self, index: int) -> str:
        """``<file>:<line> (record <index>)`` or ``<file> (record <index>)``; index is 0-based."""
        if self.line_numbers is not None and index < len(self.line_numbers):
            return f"{self.path}:{self.line_numbers[index]} (record {index})"
        return f"{self.path} (record {index})"


def detect_format(path: Path, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "disk"
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{key}: cannot tell the format of {path} from its extension; use .jsonl, "
                        f".json, .parquet or a save_to_disk directory, or set {key}.format")
    if kind == "json" and _first_char(path) != "[":
        kind = "jsonl"
    return kind


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _check_records(records, path: Path, key: str, line_numbers: Optional[list[int]]):
    """Each record an object; each field one JSON type throughout (null allowed)."""
    seen: dict[str, tuple[str, str]] = {}  # field -> (type, where first seen)
    for i, rec in enumerate(records):
        where = f"{path}:{line_numbers[i]}" if line_numbers else f"{path} (record {i})"
        if not isinstance(rec, dict):
            raise DataError(f"{key}: {where}: expected a JSON object per record, got {_json_type(rec)}")
        for field, value in rec.items():
            t = _json_type(value)
            if t == "null":
                continue
            if field not in seen:
                seen[field] = (t, where)
            elif seen[field][0] != t:
                raise DataError(f"{key}: {where}: field {field!r} is a {t}, but it is a "
                                f"{seen[field][0]} at {seen[field][1]}; use one type per field")


def _parse_int(text: str):
    # Arrow columns hold 64-bit integers; datasets' JSON reader turned larger ones into float64,
    # which is kept here so such a file loads as it did (and the table can be built at all).
    value = int(text)
    return value if -2**63 <= value < 2**63 else float(text)


def _validate_jsonl(path: Path, key: str, limit: Optional[int],
                    hint: str = "") -> tuple[list[dict], list[int]]:
    """Parse every line (or the first ``limit`` records): the records and their 1-based line numbers.

    ``hint`` is appended to a JSON syntax error (why the file was read as JSON Lines).
    """
    records, lines = [], []
    # Binary, decoded line by line: a decoding error then happens inside the try below and can
    # name its line (the text-mode file iterator decodes whole blocks, outside any line). Lines
    # split at b"\n" only, as JSON Lines does; "\r" before it is JSON whitespace.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                records.append(json.loads(line, parse_int=_parse_int))
            except UnicodeDecodeError as exc:
                raise DataError(f"{key}: {path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                                f"at byte {exc.start + 1} of the line); save the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{key}: {path}:{lineno}: invalid JSON: {exc.msg} "
                                f"(column {exc.colno}){hint}") from None
            except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
                raise DataError(f"{key}: {path}:{lineno}: invalid JSON: {exc}") from None
            lines.append(lineno)
            if limit is not None and len(records) >= limit:
                break
    _check_records(records, path, key, lines)
    return records, lines


def _validate_json(path: Path, key: str) -> list:
    """The records of a ``.json`` file holding one top-level array, checked like JSON Lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{key}: {path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        "save the file as UTF-8") from None
    del data
    try:
        records = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise DataError(f"{key}: {path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
        raise DataError(f"{key}: {path}: invalid JSON: {exc}") from None
    if not isinstance(records, list):
        raise DataError(f"{key}: {path}: expected a top-level JSON array of records")
    _check_records(records, path, key, None)
    return records


def load_source(src: DataSourceConfig, key: str, *, split: str = "train") -> LoadedRecords:
    """Like :func:`load_records`, also returning what error messages need (file, line numbers)."""
    import datasets

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    spec, spec_key = (src.path, f"{key}.path") if split == "train" else (src.eval_path, f"{key}.eval_path")
    if not spec:
        raise DataError(f"{spec_key}: not set")
    path = resolve_data_path(spec, spec_key)
    fmt = detect_format(path, src.format, f"{key}.format")
    try:
        with _quiet_datasets():
            ds, line_numbers = _read(datasets, path, fmt, src, key, spec_key)
    except DataError:
        raise
    except Exception as exc:  # Arrow / datasets errors: still a bad file, say which
        raise DataError(f"{key}: cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    if src.max_records is not None and len(ds) > src.max_records:
        ds = ds.select(range(src.max_records))
    if len(ds) == 0:
        raise DataError(f"{key}: {path}: no records")
    return LoadedRecords(ds, path, key, line_numbers)


@contextlib.contextmanager
def _quiet_datasets():
    """No "Generating train split" bars from every rank; the caller logs the data statistics."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read(datasets, path: Path, fmt: str, src: DataSourceConfig, key: str, spec_key: str):
    """The table for one resolved file in one format, and JSONL line numbers (else None)."""
    line_numbers = None
    if fmt == "jsonl":
        if path.is_dir():
            raise DataError(f"{spec_key}: {path} is a directory, not a JSON Lines file")
        hint = ""
        if src.format == "auto" and path.suffix.lower() == ".json":
            hint = ("; this .json file does not start with '[', so it was read as JSON Lines: a .json "
                    "file must hold a list of records ([{...}, ...]) or one JSON object per line")
        # The table is built from the records validation parsed: the file is read once, and the
        # rows are what was validated (see the module docstring on load_dataset's cache).
        records, line_numbers = _validate_jsonl(path, key, src.max_records, hint)
        if not records:
            raise DataError(f"{key}: {path}: no records (empty file)")
        ds = _table_from_records(records)
    elif fmt == "json":
        records = _validate_json(path, key)
        if not records:
            raise DataError(f"{key}: {path}: no records (empty array)")
        ds = _table_from_records(records)
    elif fmt == "parquet":
        # Read directly, not through load_dataset's path/size/mtime-keyed cache (see the module
        # docstring). The features stored in the file's metadata are restored by Dataset itself.
        import pyarrow.parquet as pq

        ds = datasets.Dataset(pq.read_table(str(path)))
    elif fmt == "disk":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{spec_key}: {path} holds a DatasetDict without a 'train' split "
                                f"(splits: {', '.join(ds)})")
            ds = ds["train"]
    else:  # pragma: no cover - config validation restricts the choices
        raise DataError(f"{key}.format: unsupported format {fmt!r}")
    return ds, line_numbers


def _table_from_records(records: list[dict]):
    """``Dataset`` with the union of the records' fields (missing -> null), like the JSON loader.

    (``Dataset.from_list`` would take the columns from the first record only.) A nested field
    whose parts differ in type or keys between records (``{"x": 1}`` / ``{"x": "s"}``, chat turns
    with and without ``name``) becomes a ``Json`` column holding each record's value as written,
    as ``load_dataset("json")`` does, instead of failing in Arrow or gaining null keys.
    """
    import datasets

    columns: dict[str, list] = {}
    for rec in records:
        for field in rec:
            columns.setdefault(field, [])
    for rec in records:
        for field, values in columns.items():
            values.append(rec.get(field))
    return datasets.Dataset.from_dict(columns, on_mixed_types="use_json")


def load_records(src: DataSourceConfig, key: str, *, split: str = "train"):
    """Read the data set ``src`` (config key ``key``, e.g. ``"data.forget"``) as a ``datasets.Dataset``.

    ``split="train"`` reads ``src.path``, ``split="eval"`` reads ``src.eval_path``. At most
    ``src.max_records`` records (the first ones). Raises :class:`DataError` naming the file (and the
    line, for JSON Lines) on unreadable, malformed or empty input.
    """
    return load_source(src, key, split=split).dataset
