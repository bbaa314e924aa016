"""Sets built from several files (``data.<set>.files``): mixed record kinds, ``repeat`` weights,
the KL set's fallback, and config errors that name the entry."""

import pytest

from synthunlearn.config import DataConfig, DataFileConfig, DataSourceConfig, load_config
from synthunlearn.data import build_dataset
from synthunlearn.errors import ConfigError, DataError
from synthunlearn.training.batches import source_for

DOCS = [{"text": f"Document {i} about the river town of Vell."} for i in range(7)]
CHAT = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
        for i in range(5)]
QA = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(3)]


def build(src, tok, key="data.replay", packing=False):
    return build_dataset(src, key, tok, max_length=64, packing=packing)


def rows(ds):
    return [(tuple(ds[i]["input_ids"]), tuple(ds[i]["labels"])) for i in range(len(ds))]


@pytest.fixture
def files(write_jsonl):
    return write_jsonl(DOCS, "docs.jsonl"), write_jsonl(CHAT, "chat.jsonl"), write_jsonl(QA, "qa.jsonl")


def test_each_file_keeps_its_own_kind_and_formatting(tok, files):
    docs, chat, qa = files
    mixed = build(DataSourceConfig(files=[DataFileConfig(path=str(p)) for p in files]), tok)
    alone = [build(DataSourceConfig(path=str(p)), tok) for p in files]
    # The files in order, each example exactly as the file alone would give it: documents with
    # loss on every token, chat with loss on the assistant turn, Q-A with loss on the answer.
    assert rows(mixed) == rows(alone[0]) + rows(alone[1]) + rows(alone[2])
    assert mixed.kind == "text+chat+qa" and mixed.path == [docs, chat, qa]
    assert [f["kind"] for f in mixed.stats["files"]] == ["text", "chat", "qa"]
    assert mixed.stats["records"] == mixed.stats["examples"] == mixed.stats["rows"] == 15
    assert mixed.stats["label_tokens"] == sum(a.stats["label_tokens"] for a in alone)


def test_repeat_weights_the_mixture(tok, files):
    docs, chat, _ = files
    src = DataSourceConfig(files=[DataFileConfig(path=str(docs), repeat=0.5),
                                  DataFileConfig(path=str(chat), repeat=2.6)])
    ds = build(src, tok)
    doc_rows = rows(build(DataSourceConfig(path=str(docs)), tok))
    chat_rows = rows(build(DataSourceConfig(path=str(chat)), tok))
    got = rows(ds)
    # 0.5 x 7 documents -> round(3.5) = 4 distinct ones, in file order; 2.6 x 5 chats -> every
    # chat twice, then round(0.6 * 5) = 3 distinct chats once more.
    assert [f["repeated_examples"] for f in ds.stats["files"]] == [4, 13] and len(ds) == 17
    first = got[:4]
    assert len(set(first)) == 4 and all(r in doc_rows for r in first)
    assert [doc_rows.index(r) for r in first] == sorted(doc_rows.index(r) for r in first)
    assert got[4:14] == chat_rows * 2
    assert len(set(got[14:])) == 3 and all(r in chat_rows for r in got[14:])
    # The fractional share is fixed: the same in every build (every rank, every resume).
    assert rows(build(src, tok)) == got


def test_max_records_per_file_and_packing(tok, files):
    docs, chat, _ = files
    src = DataSourceConfig(files=[DataFileConfig(path=str(docs), max_records=2, repeat=3),
                                  DataFileConfig(path=str(chat))])
    plain, packed = build(src, tok), build(src, tok, packing=True)
    assert plain.stats["records"] == 7 and len(plain) == 2 * 3 + 5
    assert len(packed) < len(plain) and packed.stats["rows"] == len(packed)
    tokens = lambda ds: sum(len(ds[i]["input_ids"]) for i in range(len(ds)))  # noqa: E731
    assert tokens(packed) == tokens(plain)


def test_a_bad_file_is_named_by_its_entry(tok, files, write_jsonl, tmp_path):
    docs, _, _ = files
    broken = write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}, "{oops"], "broken.jsonl")
    src = DataSourceConfig(files=[DataFileConfig(path=str(docs)), DataFileConfig(path=str(broken))])
    with pytest.raises(DataError, match=r"data\.replay\.files\[1\]: .*broken\.jsonl:2"):
        build(src, tok)
    missing = DataSourceConfig(files=[DataFileConfig(path=str(docs)),
                                      DataFileConfig(path=str(tmp_path / "no.jsonl"))])
    with pytest.raises(DataError, match=r"data\.replay\.files\[1\]\.path: data file .*no\.jsonl.* not found"):
        build(missing, tok)
    tiny = DataSourceConfig(files=[DataFileConfig(path=str(docs), repeat=0.01)])
    with pytest.raises(DataError, match=r"data\.replay\.files\[0\]\.repeat=0\.01: keeps none of the file's 7"):
        build(tiny, tok)


def test_kl_set_falls_back_to_the_replay_files(files):
    docs, chat, _ = files
    data = DataConfig(replay=DataSourceConfig(files=[DataFileConfig(path=str(docs)),
                                                     DataFileConfig(path=str(chat), repeat=2)]))
    src, key = source_for(data, "kl")
    assert key == "data.replay" and [(f.path, f.repeat) for f in src.files] == [(str(docs), 1.0), (str(chat), 2.0)]


@pytest.mark.parametrize("override, fragments", [
    ("data.replay.files=[{path: a.jsonl, weight: 2}]", ("'data.replay.files[0].weight'", "repeat")),
    ("data.replay.files=[{path: a.jsonl, repeat: 0}]", ("data.replay.files[0].repeat", "> 0")),
    ("data.replay.files=[{path: a.jsonl}, {repeat: 2}]", ("data.replay.files[1].path", "not set")),
    ("data.replay.files=a.jsonl", ("data.replay.files", "a list of mappings")),
    ("data.replay.files=[{path: a.jsonl, repeat: lots}]", ("data.replay.files[0].repeat", "'lots'", "float")),
    # inf passed "> 0" and raised OverflowError in repeat_examples; 1e400 is inf as a float.
    ("data.replay.files=[{path: a.jsonl, repeat: .inf}]", ("data.replay.files[0].repeat", "finite number")),
    ("data.replay.files=[{path: a.jsonl, repeat: 1e400}]", ("data.replay.files[0].repeat", "finite number")),
    ("data.replay.files=[{path: a.jsonl, repeat: .nan}]", ("data.replay.files[0].repeat", "finite number")),
    ("data.replay.max_records=3", ("data.replay.max_records", "on each file")),
    # The KL set without a file of its own is the replay files: a set-level cap would be ignored.
    ("data.kl.max_records=3", ("data.kl.max_records", "data.replay.files", "data.kl.path")),
])
def test_config_errors_name_the_entry(override, fragments):
    overrides = ["data.replay.path=null", "data.replay.files=[{path: a.jsonl}]", override]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("repeat", [float("inf"), float("nan"), -1.5])
def test_repeat_built_in_code_is_checked_too(repeat):
    """A DataFileConfig made in Python skips config loading: the repeat still fails as a DataError
    naming the entry, not as OverflowError/ValueError from int()."""
    from synthunlearn.data.dataset import repeat_examples

    with pytest.raises(DataError, match=r"^data\.replay\.files\[0\]\.repeat=.*: must be a finite number > 0"):
        repeat_examples([{"input_ids": [1], "labels": [1]}] * 4, repeat, "data.replay.files[0]")


def test_path_and_files_together_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.replay\.files: give either path or files, not both"):
        load_config(None, ["data.replay.path=x.jsonl", "data.replay.files=[{path: a.jsonl}]"])


def test_kl_max_records_applies_when_the_kl_set_falls_back_to_a_replay_path():
    config = load_config(None, ["data.kl.max_records=3"])
    src, key = source_for(config.data, "kl")
    assert key == "data.replay" and src.max_records == 3


def test_packing_spares_the_sets_whose_loss_is_per_row(tok, files):
    """A per-sequence forgetting loss bounds each Q-A pair on its own: with data.packing the trainer
    keeps the forget set one example per row and packs the others."""
    from synthunlearn.training.batches import build_sets
    docs, _, qa = files
    data = DataConfig(max_length=64, packing=True,
                      forget=DataSourceConfig(path=str(qa), global_batch_size=1),
                      replay=DataSourceConfig(path=str(docs), global_batch_size=1))
    sets = build_sets(["forget", "replay"], data, tok, rank=0, world_size=1, accumulation=1, seed=0,
                      unpacked=["forget"])
    assert len(sets["forget"].train) == len(QA)
    assert len(sets["replay"].train) < len(DOCS)
    packed = build_sets(["forget"], data, tok, rank=0, world_size=1, accumulation=1, seed=0)
    assert len(packed["forget"].train) < len(QA)
