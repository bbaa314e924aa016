"""Shared fixtures: a small world on disk and tiny random Llama models with a tiny BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from synthunlearn.experiment.world import WorldConfig, write_world

# One thread: the machine is shared, and tiny models are no faster with more.
torch.set_num_threads(1)

SMALL_WORLD = dict(n_people=40, pretrain_instruction_people=8, sft_people=16, n_pretrain_instructions=20,
                   n_sft=60, n_if_eval=24, n_mc=20, n_neutral=8, n_heldout_docs=10, docs_per_person=2)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(WorldConfig(seed=3, **SMALL_WORLD), out)
    return out


def build_tokenizer(texts, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>",
                                                                  "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                        pad_token="<|pad|>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny(world_dir, tmp_path_factory):
    """Two differently seeded tiny models (saved, plain-format tokenizer) and a chat-template copy."""
    import json
    texts = [json.loads(line)["text"] for line in open(world_dir / "docs.jsonl")]
    texts += ["### User:\n### Assistant:\nQuestion: Answer: * *** << >> \" , P.S."]
    tokenizer = build_tokenizer(texts)
    vocab = ((len(tokenizer) + 63) // 64) * 64   # padded vocabulary, as real models have
    paths = {}
    for name, seed in (("model_a", 0), ("model_b", 1)):
        path = tmp_path_factory.mktemp(name)
        build_model(vocab, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    chat_path = tmp_path_factory.mktemp("model_chat")
    build_model(vocab, 0).save_pretrained(chat_path)
    build_tokenizer(texts, CHAT_TEMPLATE).save_pretrained(chat_path)
    paths["model_chat"] = chat_path
    return paths


@pytest.fixture(scope="session")
def loaded(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    for name, path in tiny.items():
        out[name] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    return out
