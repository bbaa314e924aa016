"""Loading Hugging Face causal LMs (ZeRO-3 aware) and exporting trained ones.

Loading: under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (via transformers'
``HfDeepSpeedConfig``), so each rank only ever holds its partition; ``device_map`` is never used
because it fights DeepSpeed's placement. Weights come only from safetensors (``use_safetensors``)
and ``trust_remote_code`` is off unless the config turns it on, which is logged.

Export: ``final/`` is a plain Hugging Face directory (config, ``model.safetensors``, tokenizer)
that ``AutoModelForCausalLM.from_pretrained`` loads. Under ZeRO-3 the full state dict is gathered
with ``engine._zero3_consolidated_16bit_state_dict()``, which every rank must call.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from synthunlearn.errors import ConfigError
from synthunlearn.tiny_model import resolve_model_path

log = logging.getLogger("synthunlearn")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    spec = model_cfg.tokenizer_path or model_cfg.path
    key = "model.tokenizer_path" if model_cfg.tokenizer_path else "model.path"
    if model_cfg.tokenizer_path and not spec.startswith("builtin:"):
        # A tokenizer directory (tokenizer.save_pretrained) has no config.json, so it is not
        # checked as a model directory.
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{key}: tokenizer directory {spec!r} not found")
    else:
        path = resolve_model_path(spec, key)
    if model_cfg.trust_remote_code:
        # Logged before the first from_pretrained: the tokenizer may ship code as well.
        log.warning("%s: trust_remote_code is ON: executing Python code shipped in %s", key, path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and labels, so EOS can stand in.
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        # Without either, the first batch cannot be padded: refuse here, before the trainer writes
        # anything, rather than with a traceback from collate once training has started.
        raise ConfigError(f"{key}: the tokenizer in {path} has neither a pad token nor an EOS token, "
                          "so batches cannot be padded; set its pad_token (or eos_token) to one of its "
                          "tokens and save it again with save_pretrained")
    return tok


SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
# Pickle-based weight files: unpickling runs arbitrary code, so they are refused, not loaded.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt.index",
                  "tf_model.h5", "flax_model.msgpack")


def check_model_dir(spec: str, key: str, *, trust_remote_code: bool):
    """``(path, hf_config)`` of a loadable model directory, checked without loading weights.

    Cheap (config.json only), so the trainer runs it before it writes anything or starts
    DeepSpeed: a wrong path, non-safetensors weights or an unreadable config fail in seconds.
    """
    from transformers import AutoConfig

    path = resolve_model_path(spec, key)
    if not any((path / name).exists() for name in SAFETENSORS):
        others = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
        if others:
            raise ConfigError(
                f"{key}: {path} holds only {', '.join(others)}, not safetensors; pickle-based weights "
                "can execute code when loaded and are refused. Convert them once, in an environment "
                "you trust, with model.save_pretrained(dir, safe_serialization=True)")
        raise ConfigError(f"{key}: {path} has no model.safetensors; only safetensors weights are loaded")
    try:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}: cannot read the model config in {path}: {exc}") from None
    return path, hf_config


def load_causal_lm(spec: str, key: str, *, dtype: str, trust_remote_code: bool, ds_config: dict | None,
                   gradient_checkpointing: bool = False):
    """Loads a causal LM; with a ZeRO-3 ``ds_config`` it is partitioned while it is built."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    path = check_model_dir(spec, key, trust_remote_code=trust_remote_code)[0]
    if trust_remote_code:
        log.warning("%s: trust_remote_code is ON: executing Python code shipped in %s", key, path)
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 (must stay alive while loading)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a causal LM from {path}: {exc}") from None
    finally:
        if zero3:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def export_hf(engine, tokenizer, out_dir: Path, *, is_main: bool, zero3: bool) -> None:
    """Writes a loadable Hugging Face directory atomically (temporary directory, then rename)."""
    from synthunlearn.distributed import barrier

    model = engine.module.model
    state_dict = None
    if zero3:
        # Keys are relative to the engine's module (PolicyWithLogProbs): strip its "model." prefix.
        full = engine._zero3_consolidated_16bit_state_dict()  # every rank must call it
        if is_main:
            state_dict = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    if is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if state_dict is None:
            state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        expected = set(model.state_dict())
        if not zero3 and set(state_dict) != expected:  # pragma: no cover - a bug, not user input
            raise RuntimeError(f"export: state dict keys differ from the model's: {set(state_dict) ^ expected}")
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    barrier()
