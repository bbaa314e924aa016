"""synthesize.py without a model: prompt assembly, --template values, --documents files.
(The run with the tiny model is tests/experiment/test_pipeline.py::test_synthesize_with_tiny_model.)"""

from __future__ import annotations

import json

import pytest

from synthunlearn.errors import DataError, UserError
from synthunlearn.experiment import synthesize as S


@pytest.fixture
def prompts(monkeypatch):
    """The prompts synthesize() would send; the model's reply is one fixed pair."""
    import synthunlearn.evaluation.generate as generate

    sent = []

    def fake_generate(model, tokenizer, batch, **kwargs):
        sent.extend(batch)
        return ["Question: a?\nAnswer: b."] * len(batch)

    monkeypatch.setattr(generate, "generate_responses", fake_generate)
    monkeypatch.setattr(generate, "format_chat", lambda tokenizer, messages, **kwargs: messages[0]["content"])
    return sent


def test_document_text_is_not_read_as_placeholders(prompts):
    doc = "The loop runs for i in range({n}) where {n} is the number of layers; {document} is a word."
    records, stats = S.synthesize(None, None, [doc], template="Doc: {document}\nWrite {n} pairs.",
                                  pairs_per_document=3)
    assert prompts == [f"Doc: {doc}\nWrite 3 pairs."]
    assert records == [{"question": "a?", "answer": "b.", "document": 0}] and stats["pairs"] == 1


def test_template_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A mistyped template file: say the file is missing, not that the "template" lacks {document}.
    for typo in ("prompts/qa_tempalte.txt", "qa_tempalte.txt", "my_prompt.md"):
        with pytest.raises(UserError, match=rf"^--template {typo}: no such file \(resolved to "):
            S.load_template(typo)
    with pytest.raises(UserError, match=r"^--template: must contain the placeholder \{document\}$"):
        S.load_template("Write pairs about the text.")
    (tmp_path / "plain.txt").write_text("Write pairs.\n")
    with pytest.raises(UserError, match=r"^--template plain\.txt: the file must contain the placeholder"):
        S.load_template("plain.txt")
    (tmp_path / "good.txt").write_text("Write {n} pairs.\n{document}\n")
    assert S.load_template("good.txt") == "Write {n} pairs.\n{document}\n"
    assert S.load_template(None) == S.DEFAULT_TEMPLATE
    # A long one-line template is text, not a file name too long for the file system.
    long = "Read the document carefully. " * 12 + "{document}"
    assert S.load_template(long) == long


def test_documents_jsonl_lines_split_only_at_newlines(tmp_path):
    """U+2028, U+2029 and U+0085 may stand unescaped in JSON strings: the training loader keeps
    them, and so must --documents (str.splitlines() split the record there). CRLF ends a line."""
    from synthunlearn.config import DataSourceConfig
    from synthunlearn.data.sources import load_source

    texts = ["First document.", "Scraped text\u2028with a line separator.", "Third\u0085doc.", "Fourth\u2029one."]
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\r\n")
    assert S.read_documents(path) == texts
    assert load_source(DataSourceConfig(path=str(path)), "data.sft").dataset["text"][:] == texts


def test_documents_errors_name_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(byte 0xff\)"):
        S.read_documents(path)
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        S.read_documents(path)
    text = tmp_path / "docs.txt"
    text.write_bytes(b"One.\n\nTwo \xe9.\n")
    with pytest.raises(DataError, match=rf"^{text}:3: not UTF-8 text"):
        S.read_documents(text)
    text.write_text("One.\n\n  \nTwo\nlines.\n")
    assert S.read_documents(text) == ["One.", "Two\nlines."]
