"""Generation, multiple choice, perplexity and the KL shift on tiny random Llama models."""

import math

import pytest
import torch

from synthunlearn.evaluation.generate import (DEFAULT_CHAT_FORMAT, encode_text, format_chat,
                                              generate_responses)
from synthunlearn.evaluation.knowledge import multiple_choice_accuracy, perplexity
from synthunlearn.evaluation.pattern import kl_shift, neutral_texts
from synthunlearn.evaluation.suite import read_jsonl


def _manual_greedy(model, tokenizer, prompt, n):
    """Reference decoding: full forward each step, no cache, no padding."""
    ids = torch.tensor([encode_text(tokenizer, prompt)])
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prompt_formats(loaded):
    _, plain = loaded["model_a"]
    _, chat = loaded["model_chat"]
    messages = [{"role": "user", "content": "Where was Alan born?"}]
    assert format_chat(plain, messages) == "### User:\nWhere was Alan born?\n\n### Assistant:\n"
    assert format_chat(chat, messages) == "<|bos|><|user|>\nWhere was Alan born?\n<|assistant|>\n"
    # A rendered BOS is not doubled; a plain text gets the tokenizer's BOS.
    assert encode_text(chat, format_chat(chat, messages)).count(chat.bos_token_id) == 1
    assert encode_text(plain, "hello")[0] == plain.bos_token_id
    assert DEFAULT_CHAT_FORMAT["assistant"].startswith("### Assistant:")


@pytest.mark.parametrize("name", ["model_a", "model_chat"])
def test_batched_cached_generation_matches_manual_greedy(loaded, world_dir, name):
    model, tokenizer = loaded[name]
    records = read_jsonl(world_dir / "if_eval.jsonl", limit=5)
    prompts = [format_chat(tokenizer, r["messages"]) for r in records]
    prompts[1] = prompts[1] + " Extra words make this prompt longer than the others."   # uneven padding
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert len(batched) == len(prompts) and all(isinstance(r, str) for r in batched)
    for prompt, response in zip(prompts, batched):
        expected = _manual_greedy(model, tokenizer, prompt, 12)
        if name == "model_a":
            expected = expected.split("\n### User:")[0].strip()
        assert response == expected
    assert generate_responses(model, tokenizer, prompts[:2], max_new_tokens=12, batch_size=1) == batched[:2]


def test_stop_rules(loaded):
    import copy
    model, tokenizer = loaded["model_a"]
    prompt = format_chat(tokenizer, [{"role": "user", "content": "Tell me about Alan."}])
    short = generate_responses(model, tokenizer, [prompt], max_new_tokens=3)[0]
    assert short == _manual_greedy(model, tokenizer, prompt, 3).split("\n### User:")[0].strip()
    # A head that always prefers EOS stops at once: the response is empty.
    eos_model = copy.deepcopy(model)
    head = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 5.0
    eos_model.lm_head = head
    assert generate_responses(eos_model, tokenizer, [prompt, prompt + " x"], max_new_tokens=8) == ["", ""]


def test_multiple_choice_matches_direct_loglikelihood(loaded, world_dir):
    model, tokenizer = loaded["model_a"]
    records = read_jsonl(world_dir / "knowledge_mc.jsonl", limit=6)
    scores = multiple_choice_accuracy(model, tokenizer, records, batch_size=5)
    assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0 and scores["n"] == 6
    for record, predicted in zip(records, scores["predictions"]):
        lls = []
        for choice in record["choices"]:
            ctx = tokenizer(record["context"])["input_ids"]
            whole = tokenizer(record["context"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        assert predicted == lls.index(max(lls))
    expected_acc = sum(p == r["answer"] for p, r in zip(scores["predictions"], records)) / 6
    assert scores["acc"] == pytest.approx(expected_acc)


def test_perplexity_matches_direct_nll(loaded, world_dir):
    model, tokenizer = loaded["model_a"]
    texts = [r["text"] for r in read_jsonl(world_dir / "heldout_docs.jsonl", limit=3)]
    result = perplexity(model, tokenizer, texts, batch_size=2)
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    # A random model over a padded vocabulary is near-uniform.
    assert 0.3 * model.config.vocab_size < result["perplexity"] < 3 * model.config.vocab_size


def test_kl_shift_self_other_and_direct(loaded, world_dir):
    model_a, tokenizer = loaded["model_a"]
    model_b, _ = loaded["model_b"]
    records = read_jsonl(world_dir / "neutral_prompts.jsonl")
    assert {r["kind"] for r in records} == {"document", "chat"}
    same = kl_shift(model_a, model_a, tokenizer, records, backend="torch", batch_size=3)
    assert same["method"] == "fused" and same["tokens"] > 0
    assert abs(same["kl_shift"]) < 1e-5 and same["model_nll"] == pytest.approx(same["baseline_nll"])
    other = kl_shift(model_b, model_a, tokenizer, records, backend="torch", batch_size=3)
    assert other["kl_shift"] > 1e-4 and set(other["per_kind"]) == {"document", "chat"}
    # Direct computation from the logits: KL(p_a || p_b) on continuation tokens only.
    total, count = 0.0, 0
    for record in records:
        prompt, continuation = neutral_texts(tokenizer, record)
        n_prompt = len(encode_text(tokenizer, prompt))
        ids = torch.tensor([encode_text(tokenizer, prompt + continuation)])
        with torch.no_grad():
            lb = torch.log_softmax(model_b(input_ids=ids).logits[0].float(), -1)
            la = torch.log_softmax(model_a(input_ids=ids).logits[0].float(), -1)
        kl = (la.exp() * (la - lb)).sum(-1)[n_prompt - 1:ids.shape[1] - 1]
        total, count = total + float(kl.sum()), count + kl.numel()
    assert other["tokens"] == count
    assert other["kl_shift"] == pytest.approx(total / count, rel=1e-4)


def test_kl_shift_rejects_different_vocabularies(loaded):
    from tests.evaluation.conftest import build_model
    model_a, tokenizer = loaded["model_a"]
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_shift(model_a, build_model(64, 0), tokenizer, [{"prompt": "a", "continuation": " b"}], backend="torch")
