"""DeepSpeed configuration: the user's ZeRO JSON plus what the run config owns.

Ownership is split so each value has exactly one home:
- the JSON (``configs/deepspeed/zero*.json``) owns ZeRO (stage, offload, buckets), gradient
  clipping and communication settings; every value explicit, "auto" is rejected (it only works
  under the HF Trainer);
- the YAML run config owns batch sizes, the optimizer's hyper-parameters and the precision,
  which are injected here. A JSON that sets one of those to a different value is an error naming
  both places, rather than a silent winner.

The optimizer is DeepSpeed's "AdamW" with ``torch_adam: true`` (torch.optim.AdamW): no native
op build, and the same update rule on CPU and GPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from synthunlearn.config import RunConfig
from synthunlearn.errors import ConfigError


def read_deepspeed_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed-config: file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    _reject_auto(data, path, "")
    _check_types(data, path)
    if "gradient_clipping" not in data:
        raise ConfigError(f"{path}: gradient_clipping must be set explicitly (DeepSpeed >= 0.19.3 "
                          "silently defaults it to 1.0)")
    if data.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16.enabled is not supported; use model.dtype=bf16 (or fp32)")
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    zero = data.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        device = zero.get(key, {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{path}: zero_optimization.{key}.device must be none, cpu or nvme, "
                              f"got {device!r}")
    if zero.get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        raise ConfigError(f"{path}: zero_optimization.offload_param needs stage 3 (got stage {stage}); "
                          "use configs/deepspeed/zero3_offload.json")
    return data


# Sections the code reads with ``.get`` and values it compares with numbers: a wrong JSON type
# there would otherwise surface as an AttributeError/TypeError deep inside DeepSpeed (a
# traceback for what is a typo in the user's file).
_OBJECT_KEYS = ("zero_optimization", "fp16", "bf16", "optimizer", "optimizer.params", "data_types",
                "zero_optimization.offload_optimizer", "zero_optimization.offload_param")
_NUMBER_KEYS = ("gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps")


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_types(data: dict, path: Path) -> None:
    for key in _OBJECT_KEYS:
        value = _lookup(data, key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a JSON object, got {json.dumps(value)}")
    for key in _NUMBER_KEYS:
        value = _lookup(data, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{path}: {key}: expected a number, got {json.dumps(value)}")
    clip = data.get("gradient_clipping")
    if clip is not None and clip < 0:
        raise ConfigError(f"{path}: gradient_clipping: must be >= 0 (0 disables clipping), got {clip}")


def _reject_auto(node: Any, path: Path, key: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_auto(v, path, f"{key}.{k}" if key else k)
    elif node == "auto":
        raise ConfigError(f"{path}: {key}: \"auto\" is not supported; give an explicit value")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _inject(cfg: dict, dotted: str, value: Any, path: Path, owner: str) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if parts[-1] in node and node[parts[-1]] != value:
        raise ConfigError(f"{path}: {dotted}={node[parts[-1]]!r} conflicts with {owner}={value!r}; "
                          f"remove it from the DeepSpeed JSON (the run config owns it)")
    node[parts[-1]] = value


def build_policy_config(user: dict, path: str | Path, run: RunConfig, *, micro_batch_size: int,
                        world_size: int, monitor_dir: str | None) -> dict:
    path = Path(path)
    cfg = copy.deepcopy(user)
    o = run.optimisation
    gas = o.gradient_accumulation_steps
    _inject(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, path, "the primary data set's micro-batch")
    _inject(cfg, "gradient_accumulation_steps", gas, path, "optimisation.gradient_accumulation_steps")
    _inject(cfg, "train_batch_size", micro_batch_size * gas * world_size, path, "global batch")
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "AdamW") not in ("AdamW", "Adam"):
        raise ConfigError(f"{path}: optimizer.type must be AdamW (the run config owns the optimizer)")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    params.setdefault("torch_adam", True)
    for key, value in (("lr", o.lr), ("betas", list(o.betas)), ("eps", o.eps), ("weight_decay", o.weight_decay)):
        _inject(cfg, f"optimizer.params.{key}", value, path, f"optimisation.{key}")
    if "scheduler" in cfg:
        raise ConfigError(f"{path}: scheduler: remove it; optimisation.schedule/warmup_steps own the schedule")
    bf16 = run.model.dtype == "bf16"
    _inject(cfg, "bf16.enabled", bf16, path, "model.dtype")
    if bf16:
        # Accumulate bf16 gradients in fp32 across micro-batches (DeepSpeed defaults to bf16).
        _inject(cfg, "data_types.grad_accum_dtype", "fp32", path, "model.dtype=bf16")
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    if monitor_dir and (run.logging.tensorboard or run.logging.csv):
        if run.logging.tensorboard:
            cfg["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "tensorboard"}
        if run.logging.csv:
            cfg["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "csv"}
    if cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        # torch.optim.AdamW on the offloaded fp32 master weights instead of the native CPU Adam.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def build_reference_config(policy: dict, run: RunConfig) -> dict:
    """A frozen engine: ZeRO-3 when the policy is ZeRO-3 (else stage 0), no optimizer."""
    stage = 3 if zero_stage(policy) == 3 else 0
    zero: dict = {"stage": stage}
    if stage == 3:
        for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if key in policy.get("zero_optimization", {}):
                zero[key] = policy["zero_optimization"][key]
        if run.reference.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    elif run.reference.offload:
        raise ConfigError("reference.offload: parameter offload needs ZeRO-3 (use configs/deepspeed/zero3.json)")
    return {
        "train_micro_batch_size_per_gpu": policy["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": policy["gradient_accumulation_steps"],
        "train_batch_size": policy["train_batch_size"],
        "zero_optimization": zero,
        "bf16": {"enabled": policy.get("bf16", {}).get("enabled", False)},
        "gradient_clipping": policy["gradient_clipping"],
        "steps_per_print": 10**9,
    }
