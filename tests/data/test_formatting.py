"""Each record kind renders and masks as documented (labels only where the model should learn)."""

import pytest

from synthunlearn.config import DataSourceConfig
from synthunlearn.data import IGNORE_INDEX, build_dataset
from synthunlearn.errors import DataError


def build(path, tok, max_length=256, **kw):
    return build_dataset(DataSourceConfig(path=str(path), **kw), "data.x", tok,
                         max_length=max_length, packing=False)


def labelled(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def check_alignment(ex):
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert ex["labels"][0] == IGNORE_INDEX
    for i, l in zip(ex["input_ids"], ex["labels"]):
        assert l in (IGNORE_INDEX, i)


def test_qa_plain_text_labels_answer_only(tok, write_jsonl):
    ds = build(write_jsonl([{"question": "Where was Bexan Morrow born?", "answer": "Quennel."}]), tok)
    ex = ds[0]
    check_alignment(ex)
    assert ds.kind == "qa"
    # Plain "Question/Answer" text even though the tokenizer has a chat template.
    assert tok.decode(ex["input_ids"]) == \
        "<|bos|>Question: Where was Bexan Morrow born?\nAnswer: Quennel.<|eos|>"
    assert labelled(tok, ex) == " Quennel.<|eos|>"
    assert ex["labels"][-1] == tok.eos_token_id


def test_text_labels_everything_but_bos(tok, write_jsonl):
    ds = build(write_jsonl([{"text": "Sennick is a river city."}]), tok)
    ex = ds[0]
    check_alignment(ex)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][1:] == ex["input_ids"][1:]
    assert ds.stats["label_tokens"] == len(ex["input_ids"]) - 1


def test_prompt_response_uses_chat_template(tok, write_jsonl):
    ds = build(write_jsonl([{"prompt": "Add 2 and 3.", "response": "5"}]), tok)
    ex = ds[0]
    check_alignment(ex)
    assert ds.kind == "prompt_response"
    assert tok.decode(ex["input_ids"]) == "<|bos|><|user|>\nAdd 2 and 3.\n<|assistant|>\n5<|eos|>\n"
    assert labelled(tok, ex) == "5<|eos|>"


def test_chat_multi_turn_assistant_only(tok, write_jsonl):
    rec = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where was Alira born?"},
        {"role": "assistant", "content": "In Sennick."},
        {"role": "user", "content": "And when?"},
        {"role": "assistant", "content": "In 1850."},
    ]}
    ds = build(write_jsonl([rec]), tok)
    ex = ds[0]
    check_alignment(ex)
    assert labelled(tok, ex) == "In Sennick.<|eos|>In 1850.<|eos|>"
    # The tokens between the two assistant turns (user turn, headers) carry no loss.
    text_ids = ex["input_ids"]
    assert tok.convert_tokens_to_ids("<|user|>") in text_ids
    user_pos = [i for i, t in enumerate(text_ids) if t == tok.convert_tokens_to_ids("<|user|>")]
    assert all(ex["labels"][p] == IGNORE_INDEX for p in user_pos)


def test_default_format_matches_tiny_template(tok, tok_no_template, write_jsonl):
    recs = [{"messages": [{"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "- one\n- two"}]},
            {"messages": None, "prompt": "Say yes.", "response": "yes"}]
    path = write_jsonl(recs)
    a, b = build(path, tok), build(path, tok_no_template)
    assert a.kind == b.kind == "chat"
    for i in range(2):
        assert a[i] == b[i]
        check_alignment(b[i])
    assert tok_no_template.decode(b[1]["input_ids"]) == \
        "<|bos|><|user|>\nSay yes.\n<|assistant|>\nyes<|eos|>\n"
    assert labelled(tok_no_template, b[1]) == "yes<|eos|>"


def test_unknown_role(tok, tok_no_template, write_jsonl):
    path = write_jsonl([{"messages": [{"role": "user", "content": "x"},
                                      {"role": "tool", "content": "y"}]}])
    with pytest.raises(DataError, match=r"data\.jsonl:1 \(record 0\).*messages\[1\]\.role"):
        build(path, tok_no_template)
    with pytest.raises(DataError, match="chat template rejected"):
        build(path, tok)


@pytest.mark.parametrize("record,field", [
    ({"question": "Q?", "answer": None}, "'answer'"),
    ({"question": "Q?"}, "'answer'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, r"'messages\[1\]\.content'"),
    ({"messages": []}, "'messages'"),
    ({"text": None}, "'text'"),
])
def test_missing_field_named(tok, write_jsonl, record, field):
    first = {k: ("ok" if k != "messages" else [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}])
             for k in record}
    if "question" in record:
        first = {"question": "Q?", "answer": "A."}
    path = write_jsonl([first, "", record])  # a blank line: record 1 sits on line 3
    with pytest.raises(DataError, match=rf"data\.x: .*data\.jsonl:3 \(record 1\): field {field}"):
        build(path, tok)


def test_mistyped_field_named(tok, write_jsonl):
    path = write_jsonl([{"prompt": "p", "response": "r"}, {"prompt": "p", "response": 7}])
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'response' is a number"):
        build(path, tok)


def test_unknown_kind(tok, write_jsonl):
    with pytest.raises(DataError, match=r"cannot tell the record kind .*'input', 'output'"):
        build(write_jsonl([{"input": "a", "output": "b"}]), tok)


def test_non_incremental_template_rejected(tiny_dir, write_jsonl):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_dir)
    # Renders the number of turns up front: a prefix is not a prefix of the whole rendering.
    t.chat_template = ("{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}>{% endif %}")
    path = write_jsonl([{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="cannot locate assistant turn 1"):
        build(path, t)
