"""Generation, multiple choice, perplexity and the KL shift on tiny random Llama models."""

import math

import pytest
import torch

from synthunlearn.data.formatting import Formatter
from synthunlearn.data.tokenize import tokenize_formatted
from synthunlearn.evaluation.generate import (DEFAULT_STOP_STRINGS, encode_document, encode_prompt,
                                              format_chat, generate_responses, reply_text)
from synthunlearn.evaluation.knowledge import multiple_choice_accuracy, perplexity
from synthunlearn.evaluation.pattern import kl_shift, neutral_ids
from synthunlearn.evaluation.suite import read_jsonl


def _manual_greedy(model, tokenizer, prompt, n):
    """Reference decoding: full forward each step, no cache, no padding; the new token ids."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def _reference_reply(tokenizer, new, stop_at_turns):
    """The reply by token: in the default format it ends before a new user/system turn, i.e. at the
    first ``<|user|>``/``<|system|>`` token id that follows a newline (both are special tokens
    of the test tokenizer, so a decode that skips special tokens cannot see them)."""
    if stop_at_turns:
        markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|system|>")} - {tokenizer.unk_token_id}
        for k, token in enumerate(new):
            if token in markers and tokenizer.decode(new[:k]).endswith("\n"):
                new = new[:k]
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _training_ids(tokenizer, messages):
    """Token ids of a chat record as the SFT data pipeline produces them."""
    formatted = Formatter("chat", tokenizer, "data.sft")({"messages": messages}, "record 0")
    examples, _ = tokenize_formatted([formatted], tokenizer, max_length=512, key="data.sft")
    return examples[0]["input_ids"]


def test_prompt_formats(loaded):
    _, plain = loaded["model_a"]
    _, chat = loaded["model_chat"]
    messages = [{"role": "user", "content": "Where was Alan born?"}]
    # Without a template: the data pipeline's default format, BOS as an id, not in the text.
    assert format_chat(plain, messages) == "<|user|>\nWhere was Alan born?\n<|assistant|>\n"
    assert encode_prompt(plain, format_chat(plain, messages))[0] == plain.bos_token_id
    assert format_chat(chat, messages) == "<|bos|><|user|>\nWhere was Alan born?\n<|assistant|>\n"
    # A rendered BOS is not doubled; a document gets the BOS id.
    assert encode_prompt(chat, format_chat(chat, messages)).count(chat.bos_token_id) == 1
    assert encode_document(plain, "hello")[0] == plain.bos_token_id
    assert DEFAULT_STOP_STRINGS == ("\n<|user|>", "\n<|system|>")


@pytest.mark.parametrize("template", ["none", "with_bos", "without_bos"])
def test_evaluation_prompt_is_the_prefix_of_the_training_example(loaded, template):
    """The prompt evaluation generates from is, token for token, what fine-tuning trained the reply
    after: for a tokenizer without a chat template (default format) and for templates that render
    a BOS or none (then neither side may add one, although the tokenizer's post-processor would)."""
    import copy
    from tests.evaluation.conftest import CHAT_TEMPLATE
    tokenizer = copy.deepcopy(loaded["model_a" if template == "none" else "model_chat"][1])
    if template == "without_bos":
        tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    user = [{"role": "user", "content": "Where was Alan born?"}]
    reply = [{"role": "assistant", "content": "In Toraval."}]
    prompt_ids = encode_prompt(tokenizer, format_chat(tokenizer, user))
    full_ids = _training_ids(tokenizer, user + reply)
    assert full_ids[:len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(full_ids[len(prompt_ids):], skip_special_tokens=True).strip() == "In Toraval."
    assert prompt_ids.count(tokenizer.bos_token_id) == (0 if template == "without_bos" else 1)


def test_reply_text_cuts_at_a_turn_marker_that_is_a_special_token(loaded):
    _, plain = loaded["model_a"]
    words = plain("Alan was born in Toraval.", add_special_tokens=False)["input_ids"]
    newline = plain("\n", add_special_tokens=False)["input_ids"]
    user = plain.convert_tokens_to_ids("<|user|>")
    invented = words + newline + [user] + newline + plain("Tell me more.", add_special_tokens=False)["input_ids"]
    assert reply_text(plain, invented, DEFAULT_STOP_STRINGS) == "Alan was born in Toraval."
    # A decode that skips special tokens loses the marker and keeps the invented turn.
    assert "Tell me more." in plain.decode(invented, skip_special_tokens=True)
    # EOS and padding after the reply are removed; without stop strings nothing is cut.
    padded = words + [plain.eos_token_id, plain.pad_token_id, plain.pad_token_id]
    assert reply_text(plain, padded, DEFAULT_STOP_STRINGS) == "Alan was born in Toraval."
    assert reply_text(plain, invented, ()) == plain.decode(invented, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["model_a", "model_chat"])
def test_batched_cached_generation_matches_manual_greedy(loaded, world_dir, name):
    model, tokenizer = loaded[name]
    records = read_jsonl(world_dir / "if_eval.jsonl", limit=5)
    prompts = [format_chat(tokenizer, r["messages"]) for r in records]
    prompts[1] = prompts[1] + " Extra words make this prompt longer than the others."   # uneven padding
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert len(batched) == len(prompts) and all(isinstance(r, str) for r in batched)
    for prompt, response in zip(prompts, batched):
        expected = _reference_reply(tokenizer, _manual_greedy(model, tokenizer, prompt, 12), name == "model_a")
        assert response == expected
    assert generate_responses(model, tokenizer, prompts[:2], max_new_tokens=12, batch_size=1) == batched[:2]


def test_stop_rules(loaded):
    import copy
    model, tokenizer = loaded["model_a"]
    prompt = format_chat(tokenizer, [{"role": "user", "content": "Tell me about Alan."}])
    short = generate_responses(model, tokenizer, [prompt], max_new_tokens=3)[0]
    assert short == _reference_reply(tokenizer, _manual_greedy(model, tokenizer, prompt, 3), True)
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
    hits_norm = 0
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
        # lm-eval's acc_norm: per character of the choice itself, the delimiter not counted.
        norm = [ll / len(choice) for ll, choice in zip(lls, record["choices"])]
        hits_norm += norm.index(max(norm)) == record["answer"]
    expected_acc = sum(p == r["answer"] for p, r in zip(scores["predictions"], records)) / 6
    assert scores["acc"] == pytest.approx(expected_acc)
    assert scores["acc_norm"] == pytest.approx(hits_norm / 6)


def test_acc_norm_divides_by_the_choice_length_without_the_delimiter(monkeypatch):
    """ll = (-2, -12) for choices "A" and "Bcdefghij": per character of the choice (lm-eval) the
    long one wins (-2/1 < -12/9); counting the delimiter's space too (-2/2 > -12/10) it would not."""
    from synthunlearn.evaluation import knowledge

    class Tok:
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": list(range(1, len(text) + 2))}

    monkeypatch.setattr(knowledge, "continuation_logprobs", lambda model, pairs, pad, bs: [(-2.0, 1), (-12.0, 1)])
    scores = knowledge.multiple_choice_accuracy(None, Tok(), [{"context": "Q", "choices": ["A", "Bcdefghij"],
                                                               "answer": 1}])
    assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)


def test_perplexity_matches_direct_nll(loaded, world_dir):
    model, tokenizer = loaded["model_a"]
    texts = [r["text"] for r in read_jsonl(world_dir / "heldout_docs.jsonl", limit=3)]
    result = perplexity(model, tokenizer, texts, batch_size=2)
    total, count = 0.0, 0
    for text in texts:
        # As training encodes a text record: the BOS id, then the text's tokens.
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
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
        prompt_ids, full_ids = neutral_ids(tokenizer, record)
        n_prompt = len(prompt_ids)
        ids = torch.tensor([full_ids])
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


def test_generation_also_stops_at_the_templates_end_of_turn_token(loaded, monkeypatch):
    """A template may end an assistant turn with its own token (<|im_end|>, <|eot_id|>) while the
    model's generation_config names another EOS (a base model's <|endoftext|>). Fine-tuning taught
    the model to emit the template's token after a reply, so generation must stop there too,
    instead of running on into an invented next turn."""
    import copy
    from tests.evaluation.conftest import CHAT_TEMPLATE
    from synthunlearn.evaluation.generate import end_of_turn_ids
    model, chat = loaded["model_chat"]
    _, plain = loaded["model_a"]
    # The default format and this template end a reply with EOS: nothing is added, eos unchanged.
    assert end_of_turn_ids(plain) == [plain.eos_token_id]
    assert end_of_turn_ids(chat) == [chat.eos_token_id]
    tokenizer = copy.deepcopy(chat)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end < model.config.vocab_size
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "<|end|>")
    assert end_of_turn_ids(tokenizer) == [end]
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["eos_token_id"])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompt = format_chat(tokenizer, [{"role": "user", "content": "Hi."}])
    generate_responses(model, tokenizer, [prompt], max_new_tokens=2)
    generate_responses(model, chat, [format_chat(chat, [{"role": "user", "content": "Hi."}])], max_new_tokens=2)
    eos = model.generation_config.eos_token_id
    assert seen == [[eos, end], eos]
