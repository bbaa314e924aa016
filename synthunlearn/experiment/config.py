"""The experiment file: its keys and defaults, the arms it can name, and how it is read.

``load_experiment_config`` resolves DEFAULTS <- the YAML file (after the files it ``extends``) <-
``key.sub=value`` overrides, and checks every key, type and choice before anything is written,
so a mistake fails naming its file or key instead of hours into a run. docs/experiment.md,
"Experiment configuration keys", describes every key.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence

from synthunlearn.errors import ConfigError

# The checkout: the launchers run with cwd=REPO, and relative paths in an experiment are read from it.
REPO = Path(__file__).resolve().parents[2]
# Each unlearning arm = the unlearn phase config + these overrides (the ablations change one term).
UNLEARN_ARMS = {
    "unlearned": {},
    "ga_unbounded": {"objective.forget": "ga"},
    "no_replay": {"objective.replay_weight": 0},
    "no_kl": {"objective.kl_weight": 0},
    # Control, not an ablation of the paper's method: the unlearning phase with the ascent
    # switched off. Its difference from `unlearned` is what the ascent does; its difference from
    # `synthetic` is what the extra replay/KL steps alone do (e.g. with instructions in replay).
    "no_forget": {"objective.forget_weight": 0},
}
# Unlearning applied after SFT, to the synthetic arm's fine-tuned model: the case of a team that
# finds the pattern in a model it has already fine-tuned. Each is the named pre-SFT arm's phase
# (same objective, data, steps, rate, seed, unless data.after_sft_replay or
# phases.unlearn_after_sft says otherwise) with its starting model (and so its KL reference)
# moved from cpt/synthetic to sft/synthetic; it is evaluated as it ends, with no
# second SFT, so its contrast with `synthetic` is what the repair adds to the same fine-tuned model.
AFTER_SFT_ARMS = {"unlearned_after_sft": "unlearned", "no_forget_after_sft": "no_forget"}
ALL_ARMS = ("docs_only", "synthetic") + tuple(UNLEARN_ARMS) + tuple(AFTER_SFT_ARMS)
# The replay set of the after-SFT arms: ``corpus`` = the pre-SFT phase's replay file (documents,
# plus instructions with data.instructions_in_replay, loss on every token); ``sft`` = the SFT data
# itself (chat records, loss on the replies), tokenised at the SFT phase's data.max_length, so the
# replay keeps the fine-tuned model where SFT left it instead of pulling it back to raw text;
# ``corpus_and_sft`` = both files mixed with equal shares of the replay draws (the SFT file's
# ``repeat`` is the corpus file's size over its own), at the SFT phase's data.max_length: what SFT
# taught and what the corpus taught are both replayed, neither outweighed by its file's size.
AFTER_SFT_REPLAYS = ("corpus", "sft", "corpus_and_sft")
# The arms, run when a config names none (the control costs one more phase per seed).
DEFAULT_ARMS = ("docs_only", "synthetic", "unlearned", "ga_unbounded", "no_replay", "no_kl")
# How the synthetic Q-A pairs are rendered in continued pre-training and in the forget set.
SYNTHETIC_FORMATS = ("qa", "chat")
# Continued pre-training budget of the synthetic arm: the docs_only arm's step count, or that count
# scaled by the data sizes so the Q-A pairs come on top of the same passes over documents.
SYNTHETIC_BUDGETS = ("same_steps", "same_passes")

DEFAULTS = {
    "output_dir": "runs/demo",
    "reuse_from": None,               # a finished experiment's output_dir to take matching phases from
    "seeds": [0, 1, 2],
    "base_per_seed": False,
    "launcher": "deepspeed",          # or "python" (single process; probes only)
    "nprocs": 2,
    "deepspeed_config": "configs/deepspeed/zero2.json",
    "parallel_jobs": 1,
    "omp_threads": 1,
    "arms": list(DEFAULT_ARMS),
    "ablation_seeds": None,           # None: every seed; else a subset for the ablation arms
    "world": {},
    "model": {"vocab_size": 1024, "seed": 0, "arch": {}},
    "data": {"synthetic_copies": 2, "synthetic_format": "qa", "synthetic_budget": "same_steps",
             "instructions_in_cpt": True, "instructions_in_replay": False, "after_sft_replay": "corpus"},
    "phases": {
        "base": {"config": "configs/experiment/pretrain.yaml", "max_steps": 300, "overrides": {}},
        "cpt": {"config": "configs/experiment/pretrain.yaml", "max_steps": 100, "overrides": {}},
        "unlearn": {"config": "configs/experiment/unlearn.yaml", "max_steps": 30, "overrides": {}},
        "sft": {"config": "configs/experiment/sft.yaml", "max_steps": 40, "overrides": {}},
        # The after-SFT arms' unlearning: a null config or max_steps is the unlearn phase's, and
        # these overrides merge over the unlearn phase's (phase_spec). A fine-tuned model may
        # want a gentler step than the pre-SFT repair, e.g. `overrides: {optimisation.lr: 3e-4}`.
        # As in every phase, what the pipeline sets per arm comes on top: the model and data
        # paths, the arm's objective terms, and with data.after_sft_replay other than `corpus`
        # the SFT phase's data.max_length.
        "unlearn_after_sft": {"config": None, "max_steps": None, "overrides": {}},
    },
    "evaluation": {"if_eval": 120, "neutral_prompts": 40, "knowledge_mc": 200, "heldout_docs": 60,
                   "bare_questions": 80, "max_new_tokens": 64, "batch_size": 32, "threads": 2,
                   "device": "auto"},    # auto: the first GPU when there is one, else the CPU
}


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(cfg: dict, dotted: str, value) -> None:
    """Sets ``a.b.c``; a mapping merges into a mapping already there (as a config file's does),
    so ``evaluation={if_eval: 8}`` changes one key and keeps the other defaults."""
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
        node[keys[-1]] = deep_merge(node[keys[-1]], value)
    else:
        node[keys[-1]] = value


def _check_arch(arch) -> None:
    """``model.arch`` keys must be LlamaConfig fields (LlamaConfig itself stores any typo silently)."""
    if not isinstance(arch, dict):
        raise ConfigError("model.arch: expected a mapping of LlamaConfig fields")
    from transformers import LlamaConfig

    unknown = sorted(set(arch) - set(LlamaConfig().to_dict()))
    if unknown:
        raise ConfigError(f"model.arch: unknown LlamaConfig fields {unknown}")


def _check_sections(cfg: dict, where: str) -> None:
    """The keys of the mapping sections (``where`` names the file or the overrides in errors)."""
    for section in ("data", "evaluation", "model", "phases"):
        if section not in cfg:
            continue
        if not isinstance(cfg[section], dict):
            raise ConfigError(f"{where}: {section}: expected a mapping of {', '.join(DEFAULTS[section])}")
        unknown = sorted(set(cfg[section]) - set(DEFAULTS[section]))
        if unknown:
            raise ConfigError(f"{where}: {section}: unknown keys {unknown}; valid: {', '.join(DEFAULTS[section])}")
    for name, spec in (cfg.get("phases") or {}).items():
        unknown = sorted(set(spec) - set(DEFAULTS["phases"][name])) if isinstance(spec, dict) else None
        if unknown is None or unknown:
            raise ConfigError(f"{where}: phases.{name}: expected a mapping of {', '.join(DEFAULTS['phases'][name])}"
                              + (f"; unknown keys {unknown}" if unknown else ""))


# The type of every key of DEFAULTS outside ``world`` (WorldConfig's own), ``phases``
# (_check_phase_values) and ``model.arch`` (_check_arch), checked by the run configs' converter
# (synthunlearn.config.build_dataclass) so a mistyped value fails naming its key before anything
# is written, instead of as a TypeError hours later. Choices with their own messages
# (``launcher``, ``arms``' names, ``data.synthetic_format``...) are typed ``str`` here and checked
# against their valid values in load_experiment_config.
@dataclasses.dataclass
class _TopLevelTypes:
    output_dir: str
    reuse_from: Optional[str]
    seeds: List[int]
    base_per_seed: bool
    launcher: str
    nprocs: int
    deepspeed_config: str
    parallel_jobs: int
    omp_threads: int
    arms: List[str]
    ablation_seeds: Optional[List[int]]


@dataclasses.dataclass
class _ModelTypes:
    vocab_size: int
    seed: int


@dataclasses.dataclass
class _DataTypes:
    synthetic_copies: int
    synthetic_format: str
    synthetic_budget: str
    instructions_in_cpt: bool
    instructions_in_replay: bool
    after_sft_replay: str


@dataclasses.dataclass
class _EvaluationTypes:
    if_eval: Optional[int]            # null: the whole set
    neutral_prompts: Optional[int]
    knowledge_mc: Optional[int]
    heldout_docs: Optional[int]
    bare_questions: Optional[int]
    max_new_tokens: int
    batch_size: int
    threads: int
    device: str


# Keys that must be integers >= 1 / >= 0 (the types above only say "int"); ``evaluation`` set
# sizes may also be null (the whole set).
_POSITIVE = ("nprocs", "parallel_jobs", "omp_threads", "model.vocab_size", "evaluation.max_new_tokens",
             "evaluation.batch_size", "evaluation.threads")
_NON_NEGATIVE = ("data.synthetic_copies", "evaluation.if_eval", "evaluation.neutral_prompts",
                 "evaluation.knowledge_mc", "evaluation.heldout_docs", "evaluation.bare_questions")


def _check_types(cfg: dict) -> None:
    """Every value of a typed key (the dataclasses above) of its type and range."""
    from synthunlearn.config import build_dataclass

    source = "experiment config"
    sections = {"model": _ModelTypes, "data": _DataTypes, "evaluation": _EvaluationTypes}
    build_dataclass(_TopLevelTypes, {k: v for k, v in cfg.items() if k not in (*sections, "world", "phases")},
                    "", source)
    for name, types in sections.items():
        values = {k: v for k, v in cfg[name].items() if not (name == "model" and k == "arch")}
        build_dataclass(types, values, name, source)

    def value(dotted):
        section, _, key = dotted.rpartition(".")
        return (cfg[section] if section else cfg)[key]

    for key in _POSITIVE:
        if value(key) < 1:
            raise ConfigError(f"{source}: {key}: {value(key)!r}; expected a positive integer")
    for key in _NON_NEGATIVE:
        if value(key) is not None and value(key) < 0:
            raise ConfigError(f"{source}: {key}: {value(key)!r}; expected a non-negative integer"
                              + (" or null (the whole set)" if key.startswith("evaluation.") else ""))
    # A seed named twice is one seed (its phases are planned once) that results.json would count twice.
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ConfigError(f"{source}: seeds: {cfg['seeds']!r}; name each seed once")
    for key in ("output_dir", "deepspeed_config"):
        if not cfg[key].strip():
            raise ConfigError(f"{source}: {key}: empty; expected a path")


def _check_phase_values(phases: dict) -> None:
    """Each phase's ``max_steps`` a positive integer, ``config`` a path and ``overrides`` a mapping
    (``unlearn_after_sft`` may leave the first two null: the ``unlearn`` phase's)."""
    for name, spec in phases.items():
        inherits = name == "unlearn_after_sft"
        steps, config, overrides = spec.get("max_steps"), spec.get("config"), spec.get("overrides")
        if not (steps is None and inherits) and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"phases.{name}.max_steps: {steps!r}; expected a positive integer"
                              + (" or null (the unlearn phase's)" if inherits else ""))
        if not (config is None and inherits) and (not isinstance(config, str) or not config.strip()):
            raise ConfigError(f"phases.{name}.config: {config!r}; expected the path of a run config"
                              + (" or null (the unlearn phase's)" if inherits else ""))
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"phases.{name}.overrides: {overrides!r}; expected a mapping of run-config keys")


def read_experiment_file(path, _chain: tuple = ()) -> dict:
    """One experiment config file as a mapping, with its ``extends`` chain resolved.

    ``extends: other.yaml`` (relative to this file's folder, or absolute) reads that file first
    and merges this one over it: a mapping merges key by key, at any depth, and anything else
    (a list included: ``seeds``, ``arms``, a constraint list) replaces the inherited value, so a
    file that scales another states only what it changes. The parent may extend a file in turn;
    a cycle is an error. Each file's keys are checked as it is read, so an error names its file.
    """
    from synthunlearn.config import read_yaml

    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ConfigError(f"{path}: extends forms a cycle: {cycle}")
    data = read_yaml(path)
    unknown = sorted(set(data) - set(DEFAULTS) - {"extends"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid: extends, {', '.join(DEFAULTS)}")
    _check_sections(data, str(path))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends: expected the path of another experiment config, got {parent!r}")
    parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
    if not parent_path.is_file():
        raise ConfigError(f"{path}: extends: {parent!r}: no such file ({parent_path})")
    return deep_merge(read_experiment_file(parent_path, (*_chain, here)), data)


def load_experiment_config(path=None, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS <- YAML file (after the files it extends) <- ``key.sub=value`` overrides (values
    parsed as YAML)."""
    from synthunlearn.config import parse_override

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        cfg = deep_merge(cfg, read_experiment_file(path))
    for item in overrides:
        if "=" not in item or item.partition("=")[0].strip().split(".")[0] not in DEFAULTS:
            raise ConfigError(f"override {item!r}: expected key.sub=value with a key of {', '.join(DEFAULTS)}")
        # The run configs' parser: a value that is not valid YAML is a ConfigError naming the
        # override (exit 2 from the launcher), not a yaml traceback.
        parts, value = parse_override(item)
        _set_dotted(cfg, ".".join(parts), value)
    _check_sections(cfg, "overrides")
    _check_types(cfg)
    _check_arch(cfg["model"].get("arch") or {})
    if cfg["reuse_from"] is not None:
        source = output_path(cfg["reuse_from"])
        if not source.is_dir():
            raise ConfigError(f"reuse_from: {cfg['reuse_from']!r} is not a directory ({source})")
        if source.resolve() == output_path(cfg["output_dir"]).resolve():
            raise ConfigError(f"reuse_from: {cfg['reuse_from']!r} is output_dir itself; its phases are reused anyway")
    if cfg["data"]["synthetic_format"] not in SYNTHETIC_FORMATS:
        raise ConfigError(f"data.synthetic_format: {cfg['data']['synthetic_format']!r}; "
                          f"valid: {', '.join(SYNTHETIC_FORMATS)}")
    if cfg["data"]["synthetic_budget"] not in SYNTHETIC_BUDGETS:
        raise ConfigError(f"data.synthetic_budget: {cfg['data']['synthetic_budget']!r}; "
                          f"valid: {', '.join(SYNTHETIC_BUDGETS)}")
    if cfg["data"]["after_sft_replay"] not in AFTER_SFT_REPLAYS:
        raise ConfigError(f"data.after_sft_replay: {cfg['data']['after_sft_replay']!r}; "
                          f"valid: {', '.join(AFTER_SFT_REPLAYS)}")
    unknown_arms = sorted(set(cfg["arms"]) - set(ALL_ARMS))
    if unknown_arms:
        raise ConfigError(f"arms: unknown {unknown_arms}; valid: {', '.join(ALL_ARMS)}")
    if cfg["launcher"] not in ("deepspeed", "python"):
        raise ConfigError("launcher: must be 'deepspeed' or 'python'")
    if not cfg["seeds"]:
        raise ConfigError("seeds: at least one seed")
    _check_phase_values(cfg["phases"])
    evaluation_device(cfg)
    world_config(cfg)
    return cfg


def output_path(value) -> Path:
    """An output directory as the pipeline uses it: relative paths are relative to the checkout."""
    path = Path(value)
    return path if path.is_absolute() else REPO / path


def evaluation_device(cfg: dict) -> str:
    """The torch device of ``evaluation.device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)."""
    import torch

    spec = str(cfg["evaluation"]["device"])
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    index = spec[len("cuda:"):] if spec.startswith("cuda:") else ("0" if spec == "cuda" else None)
    if index is None or not index.isdigit():
        raise ConfigError(f"evaluation.device: {spec!r}; valid: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ConfigError(f"evaluation.device: {spec!r} but torch sees {torch.cuda.device_count()} GPUs")
    return spec


def world_config(cfg: dict):
    """The experiment's ``world`` section as a validated ``WorldConfig`` (the run configs' own
    converter: unknown knobs and mistyped values fail naming ``world.<knob>``)."""
    from synthunlearn.config import build_dataclass
    from synthunlearn.experiment.world import WorldConfig

    world = build_dataclass(WorldConfig, cfg["world"], "world", "experiment config")
    world.validate()
    return world
