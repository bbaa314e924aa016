"""Reading files: formats, builtin paths, and errors that name file, line and config key."""

import json
import os

import pytest

from synthunlearn.config import DataSourceConfig
from synthunlearn.data import load_records, resolve_data_path
from synthunlearn.errors import DataError

RECORDS = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(5)]


def test_builtin_files_resolve_and_load():
    path = resolve_data_path("builtin:tiny/sft.jsonl", "data.sft.path")
    assert path.is_file() and path.name == "sft.jsonl"
    for name, cols in [("sft", {"messages", "prompt", "response"}), ("forget", {"question", "answer"}),
                       ("replay", {"text"})]:
        src = DataSourceConfig(path=f"builtin:tiny/{name}.jsonl", eval_path=f"builtin:tiny/{name}_eval.jsonl")
        train, held = load_records(src, f"data.{name}"), load_records(src, f"data.{name}", split="eval")
        assert set(train.column_names) == cols and len(train) > len(held) > 0
    with pytest.raises(DataError, match=r"data\.sft\.path: unknown builtin data 'builtin:tiny/nope"):
        resolve_data_path("builtin:tiny/nope.jsonl", "data.sft.path")
    with pytest.raises(DataError, match="unknown builtin"):
        resolve_data_path("builtin:../tiny_model.py", "data.sft.path")


def test_bundled_assets_small_and_reproducible(tmp_path):
    from synthunlearn.assets.tiny import make_tiny_data  # noqa: the generator script as a module

    assets = resolve_data_path("builtin:tiny/sft.jsonl").parent
    assert sum(p.stat().st_size for p in assets.iterdir() if p.is_file()) < 1_000_000
    make_tiny_data.main(tmp_path)
    for produced in tmp_path.glob("*.jsonl"):
        assert produced.read_bytes() == (assets / produced.name).read_bytes(), produced.name


def test_relative_path_and_missing(tmp_path, monkeypatch, write_jsonl):
    write_jsonl(RECORDS, "rel.jsonl")
    monkeypatch.chdir(tmp_path)
    assert len(load_records(DataSourceConfig(path="rel.jsonl"), "data.forget")) == 5
    with pytest.raises(DataError, match=r"data\.forget\.path: data file 'gone\.jsonl' not found"):
        load_records(DataSourceConfig(path="gone.jsonl"), "data.forget")
    with pytest.raises(DataError, match=r"data\.forget\.eval_path: not set"):
        load_records(DataSourceConfig(path="rel.jsonl"), "data.forget", split="eval")


def test_malformed_jsonl_line(write_jsonl):
    path = write_jsonl([RECORDS[0], RECORDS[1], '{"question": "Q?", "answer": ', RECORDS[2]])
    with pytest.raises(DataError, match=rf"data\.forget: {path}:3: invalid JSON"):
        load_records(DataSourceConfig(path=str(path)), "data.forget")
    path = write_jsonl([RECORDS[0], "[1, 2]"], "list.jsonl")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object"):
        load_records(DataSourceConfig(path=str(path)), "data.forget")


def test_empty_file(write_jsonl):
    path = write_jsonl(["", "  "])
    with pytest.raises(DataError, match=rf"{path}: no records"):
        load_records(DataSourceConfig(path=str(path)), "data.replay")


def test_max_records_and_eval_split(write_jsonl):
    train = write_jsonl(RECORDS, "train.jsonl")
    held = write_jsonl(RECORDS[:2], "held.jsonl")
    src = DataSourceConfig(path=str(train), eval_path=str(held), max_records=3)
    ds = load_records(src, "data.forget")
    assert len(ds) == 3 and ds[2] == RECORDS[2]
    assert len(load_records(src, "data.forget", split="eval")) == 2
    # A malformed line after max_records is never read.
    bad = write_jsonl(RECORDS[:3] + ["{oops"], "bad.jsonl")
    assert len(load_records(DataSourceConfig(path=str(bad), max_records=3), "data.forget")) == 3


def test_mixed_fields_in_prefix_keep_all_columns(write_jsonl):
    path = write_jsonl([{"prompt": "p", "response": "r"}, {"messages": [{"role": "user", "content": "x"}]}])
    ds = load_records(DataSourceConfig(path=str(path), max_records=2), "data.sft")
    assert set(ds.column_names) == {"prompt", "response", "messages"} and ds[0]["messages"] is None


def test_json_array_parquet_and_disk(tmp_path):
    import datasets

    array = tmp_path / "records.json"
    array.write_text(json.dumps(RECORDS, indent=1))
    assert load_records(DataSourceConfig(path=str(array)), "data.forget")[4] == RECORDS[4]
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert len(load_records(DataSourceConfig(path=str(jsonl_named_json)), "data.forget")) == 5
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"question": "a",\n "answer": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_records(DataSourceConfig(path=str(broken)), "data.forget")

    table = datasets.Dataset.from_list(RECORDS)
    table.to_parquet(str(tmp_path / "records.parquet"))
    ds = load_records(DataSourceConfig(path=str(tmp_path / "records.parquet")), "data.forget")
    assert ds[:] == table[:]
    table.save_to_disk(str(tmp_path / "saved"))
    assert load_records(DataSourceConfig(path=str(tmp_path / "saved")), "data.forget")[:] == table[:]
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    assert len(load_records(DataSourceConfig(path=str(tmp_path / "saved_dict"), format="disk"),
                           "data.forget")) == 5
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_records(DataSourceConfig(path=str(tmp_path / "no_train")), "data.forget")
    # Explicit format overrides the extension.
    os.rename(tmp_path / "records.parquet", tmp_path / "records.bin")
    with pytest.raises(DataError, match=r"data\.forget\.format: cannot tell the format"):
        load_records(DataSourceConfig(path=str(tmp_path / "records.bin")), "data.forget")
    assert len(load_records(DataSourceConfig(path=str(tmp_path / "records.bin"), format="parquet"),
                           "data.forget")) == 5
    with pytest.raises(DataError, match=r"cannot read .*records\.bin as jsonl|invalid JSON"):
        load_records(DataSourceConfig(path=str(tmp_path / "records.bin"), format="jsonl"), "data.forget")


def _replace_keeping_size_and_mtime(path, write):
    """Rewrite ``path`` with ``write(path)`` and give it back its size and modification time."""
    before = path.stat()
    write(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("name", ["data.jsonl", "records.json", "records.parquet"])
def test_replaced_file_with_the_same_size_and_mtime_is_read_again(tmp_path, name):
    """datasets' load_dataset cache keys a file by path, size and mtime: a file replaced by other
    records of the same size within the same timestamp (a regenerated data set, a copy that keeps
    times) used to come back with the old rows, while validation read the new file."""
    import datasets

    path = tmp_path / name

    def write(texts):
        def _write(p):
            records = [{"text": t} for t in texts]
            if name.endswith(".jsonl"):
                p.write_text("".join(json.dumps(r) + "\n" for r in records))
            elif name.endswith(".json"):
                p.write_text(json.dumps(records))
            else:
                datasets.Dataset.from_list(records).to_parquet(str(p))
        return _write

    write(["aaaa", "bbbb"])(path)
    os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
    assert load_records(DataSourceConfig(path=str(path)), "data.sft")["text"][:] == ["aaaa", "bbbb"]
    _replace_keeping_size_and_mtime(path, write(["cccc", "dddd"]))
    assert load_records(DataSourceConfig(path=str(path)), "data.sft")["text"][:] == ["cccc", "dddd"]


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"^data\.sft: {path}:3: not UTF-8 text \(byte 0xff"):
        load_records(DataSourceConfig(path=str(path)), "data.sft")
    array = tmp_path / "bad.json"
    array.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]\n')
    with pytest.raises(DataError, match=rf"^data\.sft: {array}:3: not UTF-8 text"):
        load_records(DataSourceConfig(path=str(array)), "data.sft")


def test_json_file_holding_one_object_says_what_a_json_file_must_hold(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{\n "text": "a"\n}\n')
    with pytest.raises(DataError) as info:
        load_records(DataSourceConfig(path=str(path)), "data.sft")
    message = str(info.value)
    assert message.startswith(f"data.sft: {path}:1: invalid JSON"), message
    assert "a .json file must hold a list of records" in message and "one JSON object per line" in message
    # Not for a .jsonl file, nor when the format is given: the hint is about the extension's guess.
    jsonl = tmp_path / "obj.jsonl"
    jsonl.write_text('{\n "text": "a"\n}\n')
    for src in (DataSourceConfig(path=str(jsonl)), DataSourceConfig(path=str(path), format="jsonl")):
        with pytest.raises(DataError, match="invalid JSON") as info:
            load_records(src, "data.sft")
        assert ".json file" not in str(info.value)


def test_empty_json_array_has_no_records(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]\n")
    with pytest.raises(DataError, match=rf"^data\.sft: {path}: no records \(empty array\)$"):
        load_records(DataSourceConfig(path=str(path)), "data.sft")


@pytest.mark.parametrize("max_records", [None, 3])
def test_records_keep_their_values_as_written(write_jsonl, max_records):
    """Values load as written: nested fields whose parts vary between records (a Json column, as
    datasets' JSON loader makes), chat turns with and without extra keys (no null keys added),
    integers beyond 64 bits (float64, as that loader read them) and line separators inside strings.
    (Before, the max_records path failed on the nested fields and the whole-file path on this mix.)"""
    path = write_jsonl([
        {"text": "a\u2028b\u0085c", "meta": {"x": 1}, "tags": [1],
         "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r", "name": "z"}]},
        {"text": "d", "meta": {"x": "s"}, "tags": ["t"], "messages": [{"role": "user", "content": "q2"}]},
        {"text": "e", "id": 123456789012345678901234567890},
    ])
    ds = load_records(DataSourceConfig(path=str(path), max_records=max_records), "data.sft")
    assert ds["text"][:] == ["a\u2028b\u0085c", "d", "e"]
    assert ds["meta"][:] == [{"x": 1}, {"x": "s"}, None] and ds["tags"][:] == [[1], ["t"], None]
    assert ds[0]["messages"][1] == {"role": "assistant", "content": "r", "name": "z"}
    assert ds[1]["messages"] == [{"role": "user", "content": "q2"}]  # no "name": None added
    assert ds["id"][:] == [None, None, 1.2345678901234568e+29]
