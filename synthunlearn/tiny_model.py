"""The embedded tiny model ``builtin:tiny-llama``: built offline, deterministically, in seconds.

``model.path: builtin:tiny-llama`` (the default) resolves to a Hugging Face model directory that
this module creates on first use under ``$SYNTHUNLEARN_CACHE/tiny-llama-v1`` (default cache:
``~/.cache/synthunlearn``). The directory holds:

- a byte-level BPE tokenizer trained with the ``tokenizers`` library on the bundled text
  (synthunlearn/assets/tiny/*.jsonl), wrapped as ``PreTrainedTokenizerFast``:
  special tokens ``<|bos|>`` (bos), ``<|eos|>`` (eos), ``<|pad|>`` (pad) and the chat role
  markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``; ``tokenizer(text)`` prepends
  ``<|bos|>`` (like Llama); the chat template (:data:`CHAT_TEMPLATE`) renders

      <|bos|><|user|>\\n{content}\\n<|assistant|>\\n{content}<|eos|>\\n

  i.e. each turn is ``<|role|>\\n{content}\\n`` and an assistant turn ends with ``<|eos|>`` so the
  model learns to stop; ``add_generation_prompt`` appends ``<|assistant|>\\n``.
- a randomly initialised ``LlamaForCausalLM`` (defaults in :data:`DEFAULT_ARCH`: hidden 64,
  2 layers, 4 heads, 2 key/value heads, intermediate 176, 512 positions, *untied* lm_head so the
  fused log-prob kernels see a separate output matrix), weights drawn from a fixed seed, saved as
  ``model.safetensors``. The embedding has ``len(tokenizer)`` rounded up to a multiple of 64 rows,
  as real models pad their vocabulary; the extra rows are never produced by the tokenizer.

The same inputs give byte-identical files. Several processes (ranks) may call
:func:`resolve_model_path` at once: an ``fcntl`` lock serialises the build, which happens in a
temporary directory renamed into place, so nobody ever sees a half-written model.

Bump ``TINY_MODEL_NAME`` whenever the bundled data or the architecture changes, so stale caches
are not reused.

CLI: ``python -m synthunlearn.tiny_model --out DIR`` builds the model into DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from synthunlearn.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
TINY_MODEL_SPEC = "builtin:tiny-llama"
TINY_MODEL_NAME = "tiny-llama-v1"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD) + ROLE_TOKENS

# Jinja chat template. Only the three roles that have marker tokens are accepted; anything else
# is an error rather than a silently odd rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 2048
DEFAULT_ARCH = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    initializer_range=0.02,
)
# Marker written last into a finished build; its presence means "complete".
BUILD_INFO = "synthunlearn_build.json"


def cache_root() -> Path:
    return Path(os.environ.get("SYNTHUNLEARN_CACHE") or Path.home() / ".cache" / "synthunlearn")


def bundled_corpus() -> list[str]:
    """Every string value in the bundled ``assets/tiny/*.jsonl`` files, in a fixed order."""
    texts: list[str] = []

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for path in sorted((ASSETS_DIR / "tiny").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    collect(json.loads(line))
    return texts


def train_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Byte-level BPE (GPT-2 style pre-tokenisation) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    # tokenizer(text) starts with <|bos|> like Llama tokenizers; chat rendering already contains
    # it, so apply_chat_template tokenises without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=DEFAULT_ARCH["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    corpus: Optional[Iterable[str]] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    **arch,
) -> Path:
    """Train the tokenizer on ``corpus`` (default: the bundled text), build a random Llama, save both.

    ``vocab_size`` is the BPE target (the result may be smaller on a small corpus); ``arch``
    overrides entries of :data:`DEFAULT_ARCH` (any ``LlamaConfig`` field). Writes into ``out_dir``
    (created; existing files overwritten) and returns it. Deterministic for equal arguments.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = bundled_corpus() if corpus is None else list(corpus)
    if not texts:
        raise ConfigError("build_tiny_model: the tokenizer corpus is empty")
    tokenizer = train_tokenizer(texts, vocab_size)

    params = {**DEFAULT_ARCH, **arch}
    n_tokens = len(tokenizer)
    config = LlamaConfig(
        vocab_size=(n_tokens + 63) // 64 * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **params,
    )
    # Seeded on a forked RNG so building never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # A local file, not a distributed checkpoint: transformers writes weights only on global rank 0
    # of an initialised process group, and the rank that wins the cache lock may be any rank.
    model.should_save_on_this_rank = lambda is_main_process: True
    with _quiet_transformers():  # no per-rank "Writing model shards" bars on first use
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"name": TINY_MODEL_NAME, "seed": seed, "bpe_vocab_size": vocab_size,
            "tokens": n_tokens, "corpus_strings": len(texts), "arch": params}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ensure_builtin_tiny() -> Path:
    root = cache_root()
    final = root / TINY_MODEL_NAME
    if (final / BUILD_INFO).is_file():  # fast path: finished builds are never modified
        return final
    with _file_lock(root / f"{TINY_MODEL_NAME}.lock"):
        if (final / BUILD_INFO).is_file():  # another process built it while we waited
            return final
        if final.exists():  # leftover of an interrupted, pre-rename state: not ours to trust
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.", dir=root))
        try:
            build_tiny_model(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_model_path(spec: str, key: str = "model.path") -> Path:
    """A model directory for ``spec``: ``builtin:tiny-llama`` (built on first use) or a local path.

    A local path must be an existing directory containing ``config.json``; otherwise
    :class:`ConfigError` naming ``key``. (Hub ids are not fetched: runs are offline.)
    """
    if spec.startswith(BUILTIN_PREFIX):
        if spec != TINY_MODEL_SPEC:
            raise ConfigError(f"{key}: unknown builtin model {spec!r}; available: {TINY_MODEL_SPEC}")
        return _ensure_builtin_tiny()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}: model directory {spec!r} not found")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {spec!r} is not a model directory (no config.json) - not found")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny Llama + tokenizer.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out, seed=args.seed, vocab_size=args.vocab_size)
    print(out)


if __name__ == "__main__":
    main()
