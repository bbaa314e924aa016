import json

import pytest

from synthunlearn.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny")


@pytest.fixture(scope="session")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tok_no_template(tiny_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_dir)
    t.chat_template = None
    return t


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(records_or_lines, name) -> path; strings are written verbatim as lines."""
    def write(items, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for item in items:
                f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
        return path
    return write
