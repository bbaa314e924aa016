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
