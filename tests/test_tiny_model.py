"""The embedded tiny model: builds offline, loads with the Auto classes, deterministic, race-free."""

import multiprocessing
import os

import pytest
import torch
from safetensors.torch import load_file

from synthunlearn import tiny_model
from synthunlearn.errors import ConfigError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_loads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert len(tok) <= model.config.vocab_size and model.config.vocab_size % 64 == 0
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (built / "model.safetensors").is_file()
    # The tokenizer round-trips text and prepends BOS.
    text = "Question: Where was Bexan Morrow born?\nAnswer: Quennel."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Chat template: roles as markers, assistant turns end with EOS, generation prompt.
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "<|bos|><|user|>\nHi\n<|assistant|>\nHello<|eos|>\n"
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n")
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)


def test_same_seed_same_files(built, tmp_path):
    again = tiny_model.build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (built / name).read_bytes() == (again / name).read_bytes(), name
    other = tiny_model.build_tiny_model(tmp_path / "other", seed=1)
    a, b = load_file(built / "model.safetensors"), load_file(other / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_built_on_a_rank_other_than_zero(built, tmp_path, monkeypatch):
    """Inside a launched job the rank that takes the cache lock may be rank 1; transformers skips
    the weights there unless told the file is local (a cache of tokenizer and no weights once)."""
    import transformers.distributed.mixin as mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    on_rank1 = tiny_model.build_tiny_model(tmp_path / "rank1")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (built / name).read_bytes() == (on_rank1 / name).read_bytes(), name


def test_custom_corpus_and_arch(tmp_path):
    corpus = ["alpha beta gamma delta"] * 20 + ["the quick brown fox jumps"] * 20
    out = tiny_model.build_tiny_model(tmp_path / "c", corpus=corpus, vocab_size=300,
                                      num_hidden_layers=1, hidden_size=32)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (1, 32)


def _resolve_in_child(queue):
    queue.put(str(tiny_model.resolve_model_path("builtin:tiny-llama")))


def test_resolve_builtin_concurrently(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHUNLEARN_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("fork")  # the children inherit the imported libraries
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / tiny_model.TINY_MODEL_NAME)}
    # Exactly one finished model, no temporary leftovers.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == \
        [tiny_model.TINY_MODEL_NAME]
    assert (tmp_path / tiny_model.TINY_MODEL_NAME / "model.safetensors").is_file()
    # Resolving again is the fast path and returns the same directory.
    assert tiny_model.resolve_model_path("builtin:tiny-llama") == tmp_path / tiny_model.TINY_MODEL_NAME


def test_resolve_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path: .*not found"):
        tiny_model.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not found"):
        tiny_model.resolve_model_path(str(tmp_path))  # a directory without config.json
    with pytest.raises(ConfigError, match="reference.path: unknown builtin"):
        tiny_model.resolve_model_path("builtin:huge-llama", key="reference.path")
    (tmp_path / "config.json").write_text("{}")
    assert tiny_model.resolve_model_path(str(tmp_path)) == tmp_path


def test_cli(tmp_path):
    tiny_model.main(["--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "config.json").is_file()
    assert os.path.isfile(tmp_path / "cli" / "tokenizer.json")
