"""Run configuration: YAML files mapped onto typed dataclasses.

A run is described by one YAML file (``configs/tiny/unlearn.yaml`` is the embedded default) plus
dotted command-line overrides such as ``objective.tau=2.5`` or ``data.forget.path=qa.jsonl``.
Every key is checked when the run starts: an unknown key, a value of the wrong type or a choice
outside its allowed set raises :class:`ConfigError` naming the dotted key and what is valid, so a
typo costs seconds instead of a night of GPU time.

Sections: ``model``, ``reference``, ``data``, ``objective``, ``optimisation``, ``checkpointing``,
``logging``. Their fields and defaults are the reference documentation (README "Configuration").
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from synthunlearn.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A local Hugging Face model directory, or "builtin:tiny-llama" for the embedded default
    # (built offline on first use; see synthunlearn/tiny_model.py).
    path: str = "builtin:tiny-llama"
    # Tokenizer directory; defaults to ``path``.
    tokenizer_path: Optional[str] = None
    # Parameter/compute dtype of the policy. bf16 keeps fp32 master weights in DeepSpeed.
    dtype: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    # Executes Python shipped with the model directory: off unless the user opts in (logged).
    trust_remote_code: bool = False


@dataclass
class ReferenceConfig:
    """The frozen reference model, created only when an objective term needs it."""

    # "engine": a frozen DeepSpeed engine run every step (ZeRO-3 when the policy is ZeRO-3).
    mode: Literal["engine"] = "engine"
    # Reference weights; defaults to the policy's initial weights (``model.path``).
    path: Optional[str] = None
    # Keep the reference's parameters in CPU memory (ZeRO-3 parameter offload).
    offload: bool = False


DataFormat = Literal["auto", "jsonl", "json", "parquet", "disk"]


@dataclass
class DataFileConfig:
    """One file of a set built from several (``DataSourceConfig.files``)."""

    path: Optional[str] = None
    format: DataFormat = "auto"
    # Passes over this file per epoch of the set: 2 = every record twice, 0.5 = a fixed half of
    # its records (the same half in every run and on every rank). This is how a mixture is
    # weighted: a set of documents (repeat 1) and instructions (repeat 3) sees each instruction
    # three times as often as each document, whatever the files' sizes.
    repeat: float = 1.0
    # Use at most this many records of the file (the first ones), before ``repeat``.
    max_records: Optional[int] = None


@dataclass
class DataSourceConfig:
    """One data set: where it lives and how much of it enters each optimizer step."""

    # Local JSONL / JSON / Parquet file, a directory written by ``Dataset.save_to_disk``, or
    # "builtin:<name>" for a file bundled in synthunlearn/assets. None disables the set.
    path: Optional[str] = None
    format: DataFormat = "auto"
    # Instead of ``path``: several files mixed into one set, each with its own record kind
    # (e.g. raw documents and chat instructions in one replay set) and weight (``repeat``).
    files: list[DataFileConfig] = field(default_factory=list)
    # Sequences of this set per optimizer step, summed over all ranks and micro-batches. Each
    # rank's micro-batch is global_batch_size / (world_size * gradient_accumulation_steps).
    global_batch_size: int = 8
    # Held-out file of the same kind, evaluated every ``logging.eval_steps``.
    eval_path: Optional[str] = None
    # Use at most this many records (None: all).
    max_records: Optional[int] = None


@dataclass
class DataConfig:
    # Sequences longer than this are truncated (counted and logged).
    max_length: int = 256
    # Concatenate examples into max_length rows (documents separated by EOS).
    packing: bool = False
    sft: DataSourceConfig = field(default_factory=DataSourceConfig)
    # Unlearning: the synthetic Q-A set whose pattern is forgotten.
    forget: DataSourceConfig = field(default_factory=DataSourceConfig)
    # Unlearning: non-synthetic data trained on with ordinary descent.
    replay: DataSourceConfig = field(default_factory=DataSourceConfig)
    # Unlearning: data on which the KL to the reference is measured; defaults to the replay files.
    kl: DataSourceConfig = field(default_factory=DataSourceConfig)


@dataclass
class ObjectiveConfig:
    """Loss terms. Formulas: synthunlearn/objectives and README "Objectives"."""

    # Forgetting term on the forget set ("none" for SFT-style runs).
    forget: Literal["none", "ga", "capped_ga", "unlikelihood", "npo", "simnpo"] = "capped_ga"
    forget_weight: float = 1.0
    # capped_ga: bound per sequence (mean token NLL of the sequence) or per token.
    granularity: Literal["sequence", "token"] = "sequence"
    # capped_ga bound, in nats per token. "relative": tau * the reference's NLL of the same
    # sequence/token (the initial NLL, since the reference is the starting policy).
    tau: float = 3.0
    tau_mode: Literal["absolute", "relative"] = "absolute"
    # npo / simnpo inverse temperature, simnpo margin.
    beta: float = 0.1
    gamma: float = 0.0
    replay_weight: float = 1.0
    kl_weight: float = 1.0
    kl_direction: Literal["forward", "reverse"] = "forward"
    # Backend of synthunlearn.ops.linear_logprob_kl.
    op_backend: Literal["auto", "torch", "triton", "cpu"] = "auto"


@dataclass
class OptimisationConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Learning rate at the end of the decay, as a fraction of ``lr``.
    min_lr_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    # Optimizer steps; when None, ``epochs`` over the primary set (sft or forget) decides. The
    # default, 100, applies only to a config that gives no ``epochs``: a config that gives
    # ``epochs`` and no ``max_steps`` trains by epochs. Given both, ``max_steps`` wins (logged).
    max_steps: Optional[int] = 100
    epochs: Optional[float] = None
    seed: int = 0
    # A step whose gradients are not finite is never applied (DeepSpeed's ZeRO optimizers discard
    # it). "skip": count it, warn, go on. "stop": checkpoint the last good state and exit.
    on_nonfinite: Literal["skip", "stop"] = "skip"


@dataclass
class CheckpointingConfig:
    # Save every N optimizer steps (0: only at the end).
    save_steps: int = 0
    # Keep the newest N complete checkpoints (0: keep all).
    keep_last: int = 2
    # Export ``final/`` as a Hugging Face model directory at the end.
    export_final: bool = True


@dataclass
class LoggingConfig:
    log_steps: int = 1
    # Evaluate held-out sets every N steps (0: only at the end).
    eval_steps: int = 0
    # Micro-batches per held-out set and evaluation (None: the whole set).
    eval_batches: Optional[int] = 8
    progress_bar: bool = True
    # DeepSpeed's monitor backends, written under <output_dir>/monitor.
    tensorboard: bool = False
    csv: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Conversion from plain YAML data, with errors that name the key
# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of " + _type_name(args[0])
        return "a list of " + ", ".join(_type_name(a) for a in args)
    if origin is list:
        (item,) = typing.get_args(tp)
        return "a list of " + ("mappings" if dataclasses.is_dataclass(item) else _type_name(item))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str, source: str):
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except _NonFiniteError:
                raise  # a number, just not a finite one: "expected float or null" would mislead
            except ConfigError:
                pass
        raise _bad_value(key, value, tp, source)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _bad_value(key, value, tp, source)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # Tuple[X, ...]: any length
            args = (args[0],) * len(value) if isinstance(value, (list, tuple)) else ()
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad_value(key, value, tp, source)
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _bad_value(key, value, tp, source)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_value(key, value, tp, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad_value(key, value, tp, source)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer literal beyond float range
                number = math.inf
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _bad_value(key, value, tp, source)
        # No setting means anything at inf or nan (YAML's .inf/.nan, "inf", 1e400). inf passes
        # validate()'s range checks (inf > 0) and nan fails them with a misleading "must be > 0",
        # or passes where there is none (objective.gamma); either then fails much later, e.g. an
        # OverflowError from int() of epochs or repeat, or trains on garbage.
        if not math.isfinite(number):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise _NonFiniteError(f"{source}: {key}: invalid value {shown}; expected a finite number "
                                  "(inf and nan are not allowed)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad_value(key, value, tp, source)
    raise TypeError(f"config field {key} has unsupported type {tp}")  # a bug, not user input


class _NonFiniteError(ConfigError):
    """A float setting given inf or nan (see ``_convert``)."""


def _bad_value(key, value, tp, source) -> ConfigError:
    return ConfigError(f"{source}: {key}: invalid value {value!r}; expected {_type_name(tp)}")


def build_dataclass(cls, data: Any, key: str, source: str):
    """A dataclass instance from plain YAML data, every value converted to its field's type; an
    unknown key or a bad value raises :class:`ConfigError` naming ``source`` and the dotted key
    (``key`` is the prefix, e.g. ``"world"``). Other modules' config sections use it too."""
    if data is None:
        data = {}
    where = key or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(f"{source}: unknown key {_join(key, str(name))!r}; valid keys"
                              f"{' under ' + key if key else ''}: {', '.join(fields)}")
    kwargs = {name: _convert(value, hints[name], _join(key, name), source)
              for name, value in data.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(config) -> dict:
    """The config as plain YAML-serialisable data (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


# ---------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (raised by :class:`UniqueKeyLoader`)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first given at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping giving the same key twice.

    Plain YAML loading keeps the last value, so a second ``data:`` section pasted further down a
    config silently replaces the first one whole. Keys merged in with ``<<: *anchor`` may still be
    overridden by the mapping's own keys, as YAML intends.
    """

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        # The keys as written. SafeLoader's flatten_mapping later splices the keys of a ``<<``
        # merge into node.value, where an own key overriding a merged one would look duplicated
        # (when another mapping merging this one is constructed first).
        node.written_keys = [key for key, _ in node.value]
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node in getattr(node, "written_keys", [key for key, _ in node.value]):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKeyError(key, line, first[key])
                    first[key] = line
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream) -> Any:
    """``yaml.safe_load`` that also refuses duplicate mapping keys (:class:`DuplicateKeyError`).

    Same steps as ``yaml.safe_load`` with :class:`UniqueKeyLoader`, a ``SafeLoader`` subclass:
    no Python objects are ever constructed.
    """
    loader = UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"objective.tau=2.5"`` -> (["objective", "tau"], 2.5). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component")
    try:
        value = safe_load_unique(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {text!r}: duplicate key {exc.key!r} in the value") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def _set_dotted(data: dict, parts: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_unique(f)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}:{exc.line}: duplicate key {exc.key!r} (first given at line "
                          f"{exc.first_line}); YAML would keep only the last value, so merge the "
                          "two into one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply dotted overrides, convert and validate."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(data, parts, value, text)
    if overrides:
        source += " (with overrides)"
    config = build_dataclass(RunConfig, data, "", source)
    given = data.get("optimisation") if isinstance(data, dict) else None
    if isinstance(given, dict) and given.get("epochs") is not None and "max_steps" not in given:
        config.optimisation.max_steps = None  # epochs given, max_steps not: the default 100 does not apply
    validate(config, source)
    return config


def validate(config: RunConfig, source: str = "config") -> None:
    """Range checks that types alone cannot express."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{source}: {key}: {what}")

    # Loading already refuses inf/nan (_convert); this covers a config built or edited in code.
    for key, value in _float_fields(config, ""):
        need(math.isfinite(value), key, f"{value!r} is not a finite number")
    o = config.optimisation
    need(o.lr > 0, "optimisation.lr", "must be > 0")
    need(o.weight_decay >= 0, "optimisation.weight_decay", "must be >= 0")
    need(all(0 <= b < 1 for b in o.betas), "optimisation.betas", "each must be in [0, 1)")
    need(o.eps > 0, "optimisation.eps", "must be > 0")
    need(o.warmup_steps >= 0, "optimisation.warmup_steps", "must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optimisation.min_lr_ratio", "must be in [0, 1]")
    need(o.gradient_accumulation_steps >= 1, "optimisation.gradient_accumulation_steps", "must be >= 1")
    need(o.max_steps is not None or o.epochs is not None, "optimisation.max_steps",
         "set max_steps or optimisation.epochs")
    need(o.max_steps is None or o.max_steps >= 0, "optimisation.max_steps", "must be >= 0")
    need(o.epochs is None or o.epochs > 0, "optimisation.epochs", "must be > 0")
    d = config.data
    need(d.max_length >= 2, "data.max_length", "must be >= 2")
    for name in ("sft", "forget", "replay", "kl"):
        src = getattr(d, name)
        need(src.global_batch_size >= 1, f"data.{name}.global_batch_size", "must be >= 1")
        need(src.max_records is None or src.max_records >= 1, f"data.{name}.max_records", "must be >= 1")
        need(not (src.path and src.files), f"data.{name}.files", "give either path or files, not both")
        need(not (src.files and src.max_records is not None), f"data.{name}.max_records",
             "with files, set max_records on each file")
        for i, f in enumerate(src.files):
            where = f"data.{name}.files[{i}]"
            need(bool(f.path), f"{where}.path", "not set")
            need(f.repeat > 0, f"{where}.repeat", "must be > 0")
            need(f.max_records is None or f.max_records >= 1, f"{where}.max_records", "must be >= 1")
    # Without a file of its own the KL set is the replay set; a set-level cap cannot apply to the
    # replay set's files (each file has its own), so it would be silently ignored.
    need(not (d.kl.max_records is not None and d.kl.path is None and not d.kl.files and d.replay.files),
         "data.kl.max_records", "the KL set falls back to data.replay.files, which take max_records per "
         "file; give data.kl.path or data.kl.files (with max_records on each file) instead")
    ob = config.objective
    need(ob.tau > 0, "objective.tau", "must be > 0")
    # A relative bound is tau x the reference's NLL; with no reference.path the reference is the
    # starting policy, so at tau <= 1 every forget unit starts at (or past) its bound: the capped
    # term's gradient is zero from the first step and the run forgets nothing.
    need(not (ob.forget == "capped_ga" and ob.tau_mode == "relative" and ob.tau <= 1
              and config.reference.path is None), "objective.tau",
         f"{ob.tau} with tau_mode relative is at most the starting NLL (the reference is the starting "
         "policy), so the bounded ascent would never move; use tau > 1")
    need(ob.beta > 0, "objective.beta", "must be > 0")
    for w in ("forget_weight", "replay_weight", "kl_weight"):
        need(getattr(ob, w) >= 0, f"objective.{w}", "must be >= 0")
    c = config.checkpointing
    need(c.save_steps >= 0, "checkpointing.save_steps", "must be >= 0")
    need(c.keep_last >= 0, "checkpointing.keep_last", "must be >= 0")
    lg = config.logging
    need(lg.log_steps >= 1, "logging.log_steps", "must be >= 1")
    need(lg.eval_steps >= 0, "logging.eval_steps", "must be >= 0")
    need(lg.eval_batches is None or lg.eval_batches >= 1, "logging.eval_batches", "must be >= 1")


def _float_fields(value, key: str):
    """``(dotted key, value)`` of every float in a config (dataclasses, lists and tuples)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _float_fields(getattr(value, f.name), _join(key, f.name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _float_fields(item, f"{key}[{i}]")
    elif isinstance(value, float):
        yield key, value
