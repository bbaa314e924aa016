"""The paper's experiment end to end: world -> tiny model -> base -> arms -> SFT -> evaluation.

Phases (every training phase is a real launcher run, ``deepspeed --num_gpus N launch/<job>.py``,
or a plain single ``python launch/<job>.py`` when ``launcher: python`` -- for quick probes only):

==============  =================================================================================
world           :func:`synthunlearn.experiment.world.write_world` with the config's ``world`` knobs
model           :func:`synthunlearn.tiny_model.build_tiny_model` on the world's own training text
base            pre-training from random init on documents + the instruction data of the base
                (``pretrain_instructions.jsonl`` rendered through the chat template as raw text,
                so the base already follows diverse instructions, as the paper's base models did)
cpt/docs_only   continued pre-training on the same mixture (documents + instructions)
cpt/synthetic   continued pre-training on the same mixture + ``synthetic_copies`` copies of every
                synthetic Q-A pair (the flawed data), rendered by ``data.synthetic_format``:
                ``qa`` = ``Question: {q}\\nAnswer: {a}``; ``chat`` = one user turn (the question) and
                one assistant turn (the terse answer) in the chat layout SFT and evaluation use;
                same batch, lr and seed as docs_only; ``data.synthetic_budget`` = ``same_steps``
                (the Q-A pairs displace documents) or ``same_passes`` (more steps: the pairs are
                added on top of the same passes over documents and instructions)
unlearn/<arm>   from cpt/synthetic: capped ascent on the synthetic Q-A + replay on documents + KL
                to cpt/synthetic (``unlearned``), and the ablations ``ga_unbounded`` (plain
                ascent), ``no_replay``, ``no_kl``; the control ``no_forget`` (replay + KL
                alone, the same steps: what the extra training does without any ascent)
sft/<arm>       the same SFT (data, steps, seed) on every arm's model
unlearn/<arm>   (``unlearned_after_sft``, ``no_forget_after_sft``) the ``unlearned`` / ``no_forget``
                phase run on sft/synthetic instead of cpt/synthetic, KL to sft/synthetic, and
                evaluated as it ends (no second SFT): the repair of a model already fine-tuned;
                ``data.after_sft_replay`` replays the SFT data there (``sft``) or both it and
                the corpus (``corpus_and_sft``) instead of the corpus; ``phases.unlearn_after_sft``
                sets its steps or run-config overrides (the rate) apart from the pre-SFT phase's
eval/<arm>      :func:`synthunlearn.evaluation.suite.evaluate_model` on capped evaluation sets,
                of each arm's last phase
==============  =================================================================================

The base is shared by the seeds (the paper starts every arm from one pre-trained model); a seed
sets the data order and RNG of every later phase, and all arms of a seed share it. With
``base_per_seed: true`` each seed pre-trains its own base.

Resumption: a phase directory holding ``final/`` and a ``phase.json`` whose command and inputs
digest equal the ones the pipeline would run now is reused; anything else is rerun from scratch
(``--overwrite``, its old ``phase.json`` and ``eval.json`` removed first). The inputs are what the
command names only by path (:func:`inputs_digest`): the run config as the launcher resolves it,
the contents of every file and model directory it names, and the DeepSpeed JSON, so editing a run
config or the DeepSpeed JSON reruns the phases that use it. Evaluations are cached the same way
(``eval.json`` with the evaluation signature, which holds the phase's inputs digest). The world
and the initial model carry stamps too, removed before they are rewritten in place.

Branching a sweep (``reuse_from: <another output_dir>``): a phase that is not done here is taken
from the same place in that directory when its recorded command, read with that directory's path
in place of this one, and its inputs digest equal this run's. Its ``final/`` files are hard-linked
(copied across file systems) and its records copied, so a sweep of, say, the SFT budget retrains
nothing upstream of SFT. Nothing there is ever written: every later write here replaces files
(``--overwrite`` unlinks, exports and JSON writes rename), never rewrites a linked one in place.

Output: ``<output_dir>/results.json`` (``{"seeds", "wall_seconds", "compute_seconds", "arms": {arm:
{metric: {"mean", "std", "n"}}}, "per_seed": ..., "paired": {"a - b": {metric: {"mean", "se",
"ci_low", "ci_high", "n", "a_higher", "b_higher", "ties", "seeds"}}}, ...}``), ``results.md`` and ``results.png``.
``wall_seconds`` is this invocation's; ``compute_seconds`` sums the recorded wall time of every
phase and evaluation, including those a resumed invocation reused (``reused``). ``environment`` is
this invocation's commit, package versions and host (:mod:`synthunlearn.environment`); every
phase.json and eval.json records the one it ran in, and ``phase_environments`` groups them by it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from synthunlearn import environment
from synthunlearn.errors import ConfigError

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


# ----------------------------------------------------------------------------------------------
# Configuration

def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
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
        node[keys[-1]] = _merge(node[keys[-1]], value)
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
    return _merge(read_experiment_file(parent_path, (*_chain, here)), data)


def load_experiment_config(path=None, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS <- YAML file (after the files it extends) <- ``key.sub=value`` overrides (values
    parsed as YAML)."""
    from synthunlearn.config import parse_override

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        cfg = _merge(cfg, read_experiment_file(path))
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


# ----------------------------------------------------------------------------------------------
# Data and model

def _jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> List[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _chat_as_text(tokenizer, messages) -> str:
    """A chat record as raw pre-training text in exactly the layout SFT and evaluation use.

    Text records get ``<bos>`` and ``<eos>`` from the data pipeline, so the template's own leading
    BOS and the final end-of-turn EOS are removed here rather than doubled."""
    from synthunlearn.evaluation.generate import format_chat

    text = format_chat(tokenizer, messages, add_generation_prompt=False).rstrip()
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if bos and text.startswith(bos):
        text = text[len(bos):]
    if eos and text.endswith(eos):
        text = text[:-len(eos)]
    return text


def world_config(cfg: dict):
    """The experiment's ``world`` section as a validated ``WorldConfig`` (the run configs' own
    converter: unknown knobs and mistyped values fail naming ``world.<knob>``)."""
    from synthunlearn.config import build_dataclass
    from synthunlearn.experiment.world import WorldConfig

    world = build_dataclass(WorldConfig, cfg["world"], "world", "experiment config")
    world.validate()
    return world


def prepare_world(cfg: dict, out: Path, log) -> Path:
    from synthunlearn.experiment.world import WORLD_FORMAT_VERSION, write_world

    world_dir = out / "world"
    world = world_config(cfg)
    # Every knob, defaults included (a changed default changes the world), and the format version
    # (a world written by older code lacks newer files and fields).
    signature = json.dumps({"knobs": dataclasses.asdict(world), "format_version": WORLD_FORMAT_VERSION},
                           sort_keys=True)
    stamp = world_dir / "pipeline_world.json"
    if stamp.exists() and stamp.read_text() == signature:
        return world_dir
    log(f"world: writing {world_dir}")
    # The files are rewritten in place: an interrupted rewrite must not leave the old stamp
    # vouching for a mix of old and new files (going back to the old knobs would reuse it).
    stamp.unlink(missing_ok=True)
    write_world(world, world_dir)
    _write_stamp(stamp, signature)
    return world_dir


def _write_stamp(path: Path, text: str) -> None:
    """Writes a cache stamp whole or not at all (it is written last, once what it vouches for is)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_model(cfg: dict, out: Path, world_dir: Path, log) -> Path:
    """Tokenizer + random Llama built from the world's own training text (documents, synthetic
    Q-A, instruction data), so every arm shares one vocabulary."""
    from synthunlearn.tiny_model import build_tiny_model

    model_dir = out / "init_model"
    spec = cfg["model"]
    signature = json.dumps({"model": spec, "world": (world_dir / "pipeline_world.json").read_text()},
                           sort_keys=True)
    stamp = model_dir / "pipeline_model.json"
    if stamp.exists() and stamp.read_text() == signature:
        return model_dir
    log(f"model: building {model_dir}")
    stamp.unlink(missing_ok=True)   # built in place, as the world is (prepare_world)
    corpus = [r["text"] for r in _read_jsonl(world_dir / "docs.jsonl")]
    corpus += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in _read_jsonl(world_dir / "synthetic_qa.jsonl")]
    for name in ("pretrain_instructions.jsonl", "sft.jsonl"):
        corpus += [m["content"] for r in _read_jsonl(world_dir / name) for m in r["messages"]]
    build_tiny_model(model_dir, corpus=corpus, vocab_size=int(spec.get("vocab_size", 1024)),
                     seed=int(spec.get("seed", 0)), **dict(spec.get("arch") or {}))
    _write_stamp(stamp, signature)
    return model_dir


def prepare_data(cfg: dict, out: Path, world_dir: Path, model_dir: Path) -> Dict[str, Path]:
    """The training files of every phase (written once per world/model; cheap)."""
    from transformers import AutoTokenizer

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = _read_jsonl(world_dir / "docs.jsonl")
    instructions = [{"text": _chat_as_text(tokenizer, r["messages"])}
                    for r in _read_jsonl(world_dir / "pretrain_instructions.jsonl")]
    dcfg = cfg["data"]
    pairs = _read_jsonl(world_dir / "synthetic_qa.jsonl")
    if dcfg["synthetic_format"] == "chat":
        # The same uniform pairs in the dialogue layout: a large model carries a Q-A habit across
        # surface templates; a ~1 M-parameter model keys on the literal markers, so without this
        # the habit never reaches a chat reply (docs/experiment.md reports both renderings).
        turns = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                 for r in pairs]
        qa = [{"text": _chat_as_text(tokenizer, messages)} for messages in turns]
        forget = [{"messages": messages} for messages in turns]
    else:
        qa = [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in pairs]
        forget = [{"question": r["question"], "answer": r["answer"]} for r in pairs]
    cpt_docs = docs + (instructions if dcfg["instructions_in_cpt"] else [])
    files = {
        "base": (docs + instructions),
        "cpt_docs_only": cpt_docs,
        "cpt_synthetic": cpt_docs + qa * int(dcfg["synthetic_copies"]),
        "replay": docs + (instructions if dcfg["instructions_in_replay"] else []),
        "forget": forget,
        "sft": [{"messages": r["messages"]} for r in _read_jsonl(world_dir / "sft.jsonl")],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = data_dir / f"{name}.jsonl"
        _jsonl(paths[name], records)
    return paths


def prepare_eval_dir(cfg: dict, out: Path, world_dir: Path) -> Path:
    """The evaluation sets, capped to the configured sizes (the first N records of each)."""
    eval_dir = out / "eval_sets"
    eval_dir.mkdir(parents=True, exist_ok=True)
    ecfg = cfg["evaluation"]
    for name in ("if_eval", "neutral_prompts", "knowledge_mc", "heldout_docs", "bare_questions"):
        records = _read_jsonl(world_dir / f"{name}.jsonl")
        limit = ecfg.get(name)
        _jsonl(eval_dir / f"{name}.jsonl", records[:limit] if limit else records)
    shutil.copyfile(world_dir / "sft.jsonl", eval_dir / "sft.jsonl")
    return eval_dir


# ----------------------------------------------------------------------------------------------
# Running the launchers

_PORTS_HANDED_OUT: set = set()
_PORTS_LOCK = threading.Lock()


def _free_port() -> int:
    """A port that is free now for a launcher's rendezvous and that no earlier phase of this process
    was given: with ``parallel_jobs > 1`` a launcher binds its port seconds after it starts, and
    meanwhile the kernel may offer the same free port to the phase started next."""
    with _PORTS_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS_HANDED_OUT:
                _PORTS_HANDED_OUT.add(port)
                return port
    raise RuntimeError("no free local port for a launcher's rendezvous that this run has not used")


def job_env(omp_threads: int = 1) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("SYNTHUNLEARN_CACHE", str(REPO / ".cache" / "synthunlearn"))
    env.setdefault("DS_ACCELERATOR", "cpu" if not shutil.which("nvidia-smi") else "cuda")
    # Each rank gets its own thread budget; ranks x threads should not exceed the cores.
    env["OMP_NUM_THREADS"] = str(omp_threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _overrides(values: dict) -> List[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@dataclasses.dataclass
class Phase:
    """One launcher run."""

    name: str                   # e.g. "seed0/sft/synthetic"
    job: str                    # "sft" or "unlearn"
    out_dir: Path
    config: str
    max_steps: int
    seed: int
    overrides: Dict[str, object]
    deps: List[str]
    evaluated: bool = False     # an arm's last phase: its model is the one the evaluation scores

    def args(self) -> List[str]:
        return ["--config", self.config, "--output-dir", str(self.out_dir), "--max-steps", str(self.max_steps),
                "--seed", str(self.seed), *_overrides(self.overrides)]


def _interpreter() -> str:
    """This interpreter as an absolute path. ``sys.executable`` is relative when the interpreter
    was found through a relative PATH entry (``PATH=.venv/bin:$PATH python ...``); phases run with
    ``cwd=REPO`` and their reuse stamp records the command, so a relative path would fail from
    another directory and make the same interpreter look new, rerunning (and overwriting) every
    finished phase. Made absolute, not resolved: a virtualenv's python is a symlink whose target
    runs outside the environment."""
    return os.path.abspath(sys.executable)


def launcher_command(cfg: dict, phase: Phase) -> List[str]:
    script = str(REPO / "launch" / f"{phase.job}.py")
    if cfg["launcher"] == "python":
        return [_interpreter(), script, *phase.args()]
    found = shutil.which("deepspeed", path=str(Path(_interpreter()).parent))
    deepspeed = os.path.abspath(found) if found else "deepspeed"
    return [deepspeed, "--num_gpus", str(cfg["nprocs"]), "--master_port", "{port}", script,
            "--deepspeed-config", str(REPO / cfg["deepspeed_config"]), *phase.args()]


def _launcher_args(phase: Phase, command: Sequence[str]) -> List[str]:
    """What the phase's launcher script is given: the arguments after it in ``command``, or, with
    no command, the phase's own (all the ``python`` launcher gives it)."""
    if not command:
        return phase.args()
    command = [str(c) for c in command]
    return command[command.index(str(REPO / "launch" / f"{phase.job}.py")) + 1:]


def _input_path(spec: str) -> Path:
    """A path as the launchers read it: they run with ``cwd=REPO``, so a relative one is relative
    to the checkout, whatever directory the pipeline was started from."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else REPO / path


def _hash_contents(digest, path: Path) -> None:
    """A file's bytes, or a directory's (a model's ``final/``, a ``save_to_disk`` data set):
    every file under it with its relative name, so no weight shard or tokenizer file is left out."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        one = hashlib.sha1()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                one.update(block)
        name = "" if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{one.hexdigest()}\n".encode())


def _is_path_key(name: str) -> bool:
    return name == "path" or name.endswith("_path")


def inputs_digest(phase: Phase, command: Sequence[str] = ()) -> str:
    """Digest of everything the phase's launcher runs with beyond its command line.

    The command alone is not enough: the run config and DeepSpeed JSON are named by path and
    edited in place, data files are rewritten in place when the experiment's data knobs change,
    and an upstream phase that reran leaves its ``final/`` at the same path. So the digest holds

    - the run config as the launcher resolves it (``synthunlearn.cli.parse_args`` on the
      launcher's arguments, then ``load_config``: the file, the overrides, ``--max-steps`` and
      ``--seed``, and every default), so an edit of the file reruns the phases that use it;
    - the contents of every file or directory that resolved config names (``model.path``,
      ``data.<set>.path`` / ``eval_path`` / ``files[i].path``, ...), in place of its path, so the
      digest is the same wherever the run directory is (``reuse_from`` compares it across two);
      a ``builtin:`` asset counts by its name (it ships with the code);
    - the DeepSpeed JSON the launcher is given (``--deepspeed-config``, else its default).

    Relative paths are read from the checkout, as the launchers (run with ``cwd=REPO``) read them;
    a named file that does not exist is a :class:`ConfigError`, never silently left out.
    ``command`` is the phase's launcher command; without it, the phase's own arguments."""
    import hashlib

    from synthunlearn.cli import parse_args
    from synthunlearn.config import load_config, to_dict
    from synthunlearn.tiny_model import BUILTIN_PREFIX

    args = parse_args(phase.job, _launcher_args(phase, command))
    resolved = to_dict(load_config(_input_path(args.config), args.overrides))
    named = []

    def take_paths(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            dotted = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else key
            if isinstance(node, dict) and _is_path_key(key) and isinstance(value, str) \
                    and not value.startswith(BUILTIN_PREFIX):
                named.append((dotted, value))
                node[key] = "<contents below>"
            else:
                take_paths(value, dotted)

    take_paths(resolved, "")
    digest = hashlib.sha1(json.dumps(resolved, sort_keys=True).encode())
    for key, spec in named:
        path = _input_path(spec)
        if not path.exists():
            raise ConfigError(f"{phase.name}: {key}: {spec!r} does not exist ({path})")
        digest.update(f"\n{key}\n".encode())
        _hash_contents(digest, path)
    deepspeed = _input_path(args.deepspeed_config)
    try:
        settings = json.loads(deepspeed.read_text())
    except OSError as error:
        raise ConfigError(f"{phase.name}: deepspeed_config: cannot read {deepspeed} ({error.strerror})") from None
    except ValueError as error:
        raise ConfigError(f"{phase.name}: deepspeed_config: {deepspeed}: not valid JSON ({error})") from None
    # Parsed and re-dumped: reformatting the file changes nothing the launcher sees.
    digest.update(b"\ndeepspeed\n" + json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def phase_done(phase: Phase, command: List[str]) -> bool:
    stamp = phase.out_dir / "phase.json"
    if not (phase.out_dir / "final" / "config.json").exists() or not stamp.exists():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    return recorded.get("command") == command and recorded.get("inputs") == inputs_digest(phase, command)


def _relocate(text: str, source: Path, out: Path) -> str:
    """``text`` (a command element or a signature) with the source directory's path read as ours."""
    src, dst = str(source), str(out)
    return dst if text == src else text.replace(src + os.sep, dst + os.sep)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:   # another file system, or links not allowed there
        shutil.copy2(src, dst)


def adopt_phase(phase: Phase, command: List[str], out: Path, source: Path) -> bool:
    """Takes ``phase`` from the experiment in ``source`` when that one ran exactly this command on
    these inputs (module docstring, "Branching a sweep"); returns whether it did.

    Only ``final/`` is linked: it is replaced as a whole whenever a phase reruns (the launchers
    export to ``final.tmp`` and rename; ``--overwrite`` deletes it), so the source's files are
    never written through a link. The records beside it are copied."""
    src_dir = source / phase.out_dir.relative_to(out)
    stamp = src_dir / "phase.json"
    if not (src_dir / "final" / "config.json").exists() or not stamp.exists():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    if [_relocate(str(c), source, out) for c in recorded.get("command") or []] != command:
        return False
    if recorded.get("inputs") != inputs_digest(phase, command):
        return False
    if phase.out_dir.exists():
        shutil.rmtree(phase.out_dir)
    phase.out_dir.mkdir(parents=True)
    shutil.copytree(src_dir / "final", phase.out_dir / "final", copy_function=_link_or_copy)
    for name in ("run_config.json", "metrics.jsonl"):
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, phase.out_dir / name)
    src_log = src_dir.parent / f"{src_dir.name}.log"
    if src_log.is_file():
        shutil.copy2(src_log, phase.out_dir.parent / src_log.name)
    (phase.out_dir / "phase.json").write_text(json.dumps(
        {"command": command, "inputs": recorded["inputs"], "seconds": recorded.get("seconds", 0.0),
         "reused_from": str(src_dir), "environment": recorded.get("environment")}, indent=1))
    return True


def run_phase(cfg: dict, phase: Phase, log) -> float:
    """Runs one phase (or reuses it, here or from ``reuse_from``); returns its wall seconds (0 when reused)."""
    command = launcher_command(cfg, phase)
    if phase_done(phase, command):
        log(f"{phase.name}: reused ({phase.out_dir}/final)")
        return 0.0
    if cfg.get("reuse_from") is not None:
        out, source = output_path(cfg["output_dir"]), output_path(cfg["reuse_from"])
        if adopt_phase(phase, command, out, source):
            log(f"{phase.name}: reused from {source / phase.out_dir.relative_to(out)}")
            return 0.0
    phase.out_dir.mkdir(parents=True, exist_ok=True)
    # The old records go before the launcher replaces final/: --overwrite leaves them, and an
    # interruption after the new final/ is exported but before phase.json is rewritten would
    # leave the old stamp vouching for the new model (and the old evaluation scoring it), so
    # going back to the old settings would reuse a model they did not train.
    for record in ("phase.json", "eval.json"):
        (phase.out_dir / record).unlink(missing_ok=True)
    concrete = [c.replace("{port}", str(_free_port())) for c in command] + ["--overwrite"]
    log(f"{phase.name}: {phase.job} {phase.max_steps} steps")
    # What trains this phase (commit, package versions, host), read as the launcher starts and
    # kept in phase.json: a reused phase keeps its own, so a results.json assembled from several
    # invocations still says where each model came from.
    trained_on = environment.describe()
    # Read before the launcher starts: a run config edited while the phase trains must not be
    # recorded as what it trained with.
    inputs = inputs_digest(phase, command)
    start = time.perf_counter()
    # The log lives beside the phase directory: --overwrite empties the directory itself.
    log_path = phase.out_dir.parent / f"{phase.out_dir.name}.log"
    with open(log_path, "w") as handle:
        proc = subprocess.run(concrete, cwd=REPO, env=job_env(int(cfg["omp_threads"])), stdout=handle,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not (phase.out_dir / "final" / "config.json").exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{phase.name}: {' '.join(concrete)} exited {proc.returncode}\n{tail}")
    (phase.out_dir / "phase.json").write_text(json.dumps({"command": command, "inputs": inputs,
                                                          "seconds": seconds, "environment": trained_on},
                                                         indent=1))
    log(f"{phase.name}: done in {seconds:.0f} s")
    return seconds


# ----------------------------------------------------------------------------------------------
# The plan

def phase_spec(cfg: dict, kind: str) -> dict:
    """``phases.<kind>`` with ``unlearn_after_sft`` resolved: its null ``config`` / ``max_steps``
    are the ``unlearn`` phase's and its ``overrides`` merge over the ``unlearn`` phase's, so an
    experiment that leaves it unset plans exactly the phases (and digests) it planned before."""
    spec = cfg["phases"][kind]
    if kind != "unlearn_after_sft":
        return spec
    base = cfg["phases"]["unlearn"]
    return {"config": spec.get("config") or base["config"],
            "max_steps": spec.get("max_steps") or base["max_steps"],
            "overrides": {**(base.get("overrides") or {}), **(spec.get("overrides") or {})}}


def evaluated_phase_name(seed: int, arm: str) -> str:
    """The phase whose model an arm's evaluation scores (its ``eval.json`` is in that phase's
    directory): the arm's SFT, or for the after-SFT arms their unlearning, which ends the arm.
    The one rule: plan_phases names the evaluated phases by it, and pooling finds their
    evaluations by it."""
    return f"seed{seed}/unlearn/{arm}" if arm in AFTER_SFT_ARMS else f"seed{seed}/sft/{arm}"


def plan_phases(cfg: dict, out: Path, model_dir: Path, data: Dict[str, Path]) -> List[Phase]:
    ph = cfg["phases"]
    arms = list(cfg["arms"])
    phases: List[Phase] = []

    def phase(name, job, kind, out_dir, seed, overrides, deps, steps=None, evaluated=False):
        spec = phase_spec(cfg, kind)
        merged = dict(spec.get("overrides") or {})
        merged.update(overrides)
        phases.append(Phase(name, job, out_dir, str(REPO / spec["config"]) if not Path(spec["config"]).is_absolute()
                            else spec["config"], int(steps or spec["max_steps"]), seed, merged, deps, evaluated))

    cpt_steps = {"docs_only": int(ph["cpt"]["max_steps"]), "synthetic": int(ph["cpt"]["max_steps"])}
    if cfg["data"]["synthetic_budget"] == "same_passes":
        # The Q-A pairs are *added* to the documents and instructions (as the paper adds synthetic
        # data to its corpus): the synthetic arm takes proportionally more steps, so both arms see
        # every document and instruction equally often in expectation.
        sizes = {arm: len(_read_jsonl(data[f"cpt_{arm}"])) for arm in cpt_steps}
        cpt_steps["synthetic"] = max(1, round(cpt_steps["docs_only"] * sizes["synthetic"] / sizes["docs_only"]))

    after_sft_replay = _after_sft_replay(cfg, data)
    ablation_seeds = cfg["ablation_seeds"]
    for seed in cfg["seeds"]:
        base_name = f"seed{seed}/base" if cfg["base_per_seed"] else "base"
        base_dir = out / base_name
        if not any(p.name == base_name for p in phases):
            phase(base_name, "sft", "base", base_dir, seed if cfg["base_per_seed"] else 0,
                  {"model.path": str(model_dir), "data.sft.path": str(data["base"])}, [])
        need_synthetic = any(a != "docs_only" for a in arms)
        for arm in ("docs_only", "synthetic"):
            if arm == "docs_only" and "docs_only" not in arms or arm == "synthetic" and not need_synthetic:
                continue
            phase(f"seed{seed}/cpt/{arm}", "sft", "cpt", out / f"seed{seed}" / "cpt" / arm, seed,
                  {"model.path": str(base_dir / "final"), "data.sft.path": str(data[f"cpt_{arm}"])}, [base_name],
                  steps=cpt_steps[arm])
        def unlearn(arm, extra, start, evaluated=False, kind="unlearn"):
            name = evaluated_phase_name(seed, arm) if evaluated else f"seed{seed}/unlearn/{arm}"
            phase(name, "unlearn", kind, out / name, seed,
                  {"model.path": str(out / start / "final"), "data.forget.path": str(data["forget"]),
                   "data.replay.path": str(data["replay"]), **extra}, [start], evaluated=evaluated)

        for arm, extra in UNLEARN_ARMS.items():
            if arm not in arms or (arm != "unlearned" and ablation_seeds is not None and seed not in ablation_seeds):
                continue
            unlearn(arm, extra, f"seed{seed}/cpt/synthetic")
        # The after-SFT arms need the synthetic arm's SFT model even when `synthetic` is not named.
        sft_arms = [a for a in arms if a not in AFTER_SFT_ARMS]
        after_sft = [a for a in AFTER_SFT_ARMS if a in arms
                     and not (ablation_seeds is not None and seed not in ablation_seeds)]
        if after_sft and "synthetic" not in sft_arms:
            sft_arms.append("synthetic")
        for arm in sft_arms:
            source = (f"seed{seed}/cpt/{arm}" if arm in ("docs_only", "synthetic") else f"seed{seed}/unlearn/{arm}")
            if not any(p.name == source for p in phases):
                continue
            name = evaluated_phase_name(seed, arm)
            phase(name, "sft", "sft", out / name, seed,
                  {"model.path": str(out / source / "final"), "data.sft.path": str(data["sft"])}, [source],
                  evaluated=True)
        for arm in after_sft:
            unlearn(arm, {**UNLEARN_ARMS[AFTER_SFT_ARMS[arm]], **after_sft_replay}, f"seed{seed}/sft/synthetic",
                    evaluated=True, kind="unlearn_after_sft")
    return phases


def _after_sft_replay(cfg: dict, data: Dict[str, Path]) -> Dict[str, object]:
    """The run-config overrides that give the after-SFT arms their replay set (AFTER_SFT_REPLAYS);
    every other phase keeps its files. The KL set follows the replay set (``data.kl`` is unset)."""
    choice = cfg["data"]["after_sft_replay"]
    if choice == "corpus":
        return {}
    if choice == "sft":
        replay = {"data.replay.path": str(data["sft"])}
    else:
        # Half the draws each: the SFT file repeats as often as the corpus outnumbers it.
        repeat = len(_read_jsonl(data["replay"])) / len(_read_jsonl(data["sft"]))
        replay = {"data.replay.path": None, "data.replay.files": [
            {"path": str(data["replay"])}, {"path": str(data["sft"]), "repeat": round(repeat, 6)}]}
    return {"data.max_length": _sft_max_length(cfg), **replay}


def _sft_max_length(cfg: dict) -> int:
    """``data.max_length`` of the SFT phase, read as its launcher reads it: its run config (with the
    run-config defaults) under ``phases.sft.overrides``."""
    from synthunlearn.config import load_config

    spec = cfg["phases"]["sft"]
    config = Path(spec["config"]) if Path(spec["config"]).is_absolute() else REPO / spec["config"]
    return load_config(config, _overrides(dict(spec.get("overrides") or {}))).data.max_length


def _eval_signature(cfg: dict, model_dir: Path, baseline_dir: Path) -> str:
    stamp = json.loads((model_dir.parent / "phase.json").read_text())
    return json.dumps({"evaluation": cfg["evaluation"], "model_command": stamp["command"],
                       "model_inputs": stamp.get("inputs"),
                       "baseline": str(baseline_dir), "world": cfg["world"]}, sort_keys=True)


_EVAL_LOCK = threading.Lock()


def evaluate_phase(cfg: dict, phase: Phase, eval_dir: Path, baseline_dir: Path, log) -> dict:
    """Evaluates an SFT output (cached in ``<phase>/eval.json``); returns the flat metrics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthunlearn.evaluation.report import write_json
    from synthunlearn.evaluation.suite import evaluate_model

    path = phase.out_dir / "eval.json"
    signature = _eval_signature(cfg, phase.out_dir / "final", baseline_dir)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("signature") == signature:
            return cached["metrics"]
    if cfg.get("reuse_from") is not None:
        # The same model (its phase was taken from there: same command, same inputs) evaluated
        # on the same sets against the same baseline there: take that evaluation too.
        out, source = output_path(cfg["output_dir"]), output_path(cfg["reuse_from"])
        src_eval = source / phase.out_dir.relative_to(out) / "eval.json"
        if src_eval.is_file():
            cached = json.loads(src_eval.read_text())
            if _relocate(str(cached.get("signature")), source, out) == signature:
                cached["signature"] = signature
                write_json(path, cached)
                log(f"{phase.name}: evaluation reused from {src_eval}")
                return cached["metrics"]
    ecfg = cfg["evaluation"]
    evaluated_on = environment.describe()
    with _EVAL_LOCK:  # one evaluation at a time; it shares the cores with a running launcher
        torch.set_num_threads(int(ecfg.get("threads", 1)))
        device = evaluation_device(cfg)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(phase.out_dir / "final", use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(phase.out_dir / "final")
        baseline = AutoModelForCausalLM.from_pretrained(baseline_dir, use_safetensors=True).to(device).eval()
        results = evaluate_model(model, tokenizer, eval_dir, baseline=baseline,
                                 max_new_tokens=int(ecfg["max_new_tokens"]), batch_size=int(ecfg["batch_size"]),
                                 kl_backend="auto", max_length=256)
        seconds = time.perf_counter() - start
    results["signature"] = signature
    results["wall_seconds"] = seconds
    results["environment"] = evaluated_on
    write_json(path, results)
    log(f"{phase.name}: evaluated in {seconds:.0f} s: "
        + ", ".join(f"{k}={results['metrics'][k]:.3f}" for k in ("if_prompt_strict", "knowledge_acc", "pattern_rate")
                    if isinstance(results["metrics"].get(k), float)))
    return results["metrics"]


class _Scheduler:
    """Runs tasks whose dependencies are done, at most ``parallel`` at once (threads; a training
    task waits on its launcher subprocess, so the threads only wait)."""

    def __init__(self, parallel: int, log):
        self.parallel = max(1, parallel)
        self.log = log

    def run(self, tasks: Dict[str, tuple]) -> None:
        # tasks: name -> (deps, callable)
        done, failed, running = set(), [], {}
        lock = threading.Condition()

        def worker(name, fn):
            try:
                fn()
                ok = True
            except BaseException as error:  # reported below, after the running tasks finish
                failed.append((name, error))
                ok = False
            with lock:
                running.pop(name, None)
                if ok:
                    done.add(name)
                lock.notify_all()

        pending = dict(tasks)
        with lock:
            while pending or running:
                if failed and not running:
                    break
                ready = [n for n, (deps, _) in pending.items() if all(d in done for d in deps)] if not failed else []
                while ready and len(running) < self.parallel:
                    name = ready.pop(0)
                    _, fn = pending.pop(name)
                    thread = threading.Thread(target=worker, args=(name, fn), daemon=True)
                    running[name] = thread
                    thread.start()
                if not running and pending and not failed:
                    raise RuntimeError(f"unsatisfiable dependencies: {sorted(pending)}")
                lock.wait(timeout=1.0)
        if failed:
            name, error = failed[0]
            raise RuntimeError(f"{name} failed: {error}") from error


# ----------------------------------------------------------------------------------------------
# Results

def summarise(cfg: dict, per_seed: Dict[str, Dict[int, dict]]) -> Dict[str, dict]:
    from synthunlearn.evaluation.report import aggregate_seeds

    arms = {}
    for arm in cfg["arms"]:
        runs = per_seed.get(arm) or {}
        if runs:
            arms[arm] = aggregate_seeds([runs[s] for s in sorted(runs)])
    return arms


def check_predictions(arms: Dict[str, dict]) -> Dict[str, object]:
    """The paper's predictions, tested on the seed means (a report, never used to tune metrics)."""
    def mean(arm, metric):
        value = arms.get(arm, {}).get(metric, {}).get("mean")
        return value if isinstance(value, (int, float)) else None

    out: Dict[str, object] = {}
    a_if, b_if = (mean(a, "if_prompt_strict") for a in ("docs_only", "synthetic"))
    a_k, b_k = (mean(a, "knowledge_acc") for a in ("docs_only", "synthetic"))
    # The pattern itself: bare answers to bare synthetic-wording questions, a shape SFT never taught.
    a_t, b_t = (mean(a, "bare_terse_rate") for a in ("docs_only", "synthetic"))
    if None not in (a_if, b_if):
        out["if_gap_docs_minus_synthetic"] = a_if - b_if
        out["synthetic_worse_by_10_points"] = a_if - b_if >= 0.10
    if None not in (a_k, b_k):
        out["synthetic_knowledge_at_least_docs"] = b_k >= a_k
    if None not in (a_t, b_t):
        out["pattern_gap_synthetic_minus_docs"] = b_t - a_t
        out["synthetic_shows_pattern_by_10_points"] = b_t - a_t >= 0.10
    # What the repair gives back, against the same `synthetic` SFT model: unlearning before SFT
    # (then the same SFT) and, the same phase, after it (evaluated as it ends).
    for arm in ("unlearned", "unlearned_after_sft"):
        c_if, c_k, c_t = (mean(arm, m) for m in ("if_prompt_strict", "knowledge_acc", "bare_terse_rate"))
        if None not in (a_if, b_if, c_if) and a_if - b_if > 0:
            out[f"{arm}_recovered_share"] = (c_if - b_if) / (a_if - b_if)
            out[f"{arm}_recovers_half"] = (c_if - b_if) >= 0.5 * (a_if - b_if)
        if None not in (b_k, c_k):
            out[f"{arm}_knowledge_within_3_points"] = abs(c_k - b_k) <= 0.03
        if None not in (a_t, b_t, c_t) and b_t - a_t > 0:
            out[f"{arm}_pattern_removed_share"] = (b_t - c_t) / (b_t - a_t)
            out[f"{arm}_removes_half_the_pattern"] = (b_t - c_t) >= 0.5 * (b_t - a_t)
    c_k = mean("unlearned", "knowledge_acc")
    g_k, g_p, b_p = mean("ga_unbounded", "knowledge_acc"), mean("ga_unbounded", "perplexity"), mean("synthetic", "perplexity")
    if None not in (g_k, b_k):
        out["ga_unbounded_knowledge_drop"] = b_k - g_k
    if None not in (g_p, b_p):
        out["ga_unbounded_perplexity_ratio"] = g_p / b_p
    if None not in (g_k, c_k):
        # Same data, budget and replay/KL terms; only the bound differs: the knowledge it saves.
        out["ga_unbounded_knowledge_below_unlearned"] = c_k - g_k
    return out


# Paired per-seed contrasts (a - b, same seeds): the paper's claims as differences the seeds can
# settle. The IF drop is docs_only - synthetic; every unlearning arm is set against synthetic
# (what it gives back) and `unlearned` against the control (what the ascent itself does) and
# against plain ascent (what the bound saves).
IF_METRICS = ("if_prompt_strict", "if_prompt_strict_heldout_phrasing")
PAIRED_CONTRASTS = (
    ("docs_only", "synthetic", IF_METRICS),
    ("synthetic", "docs_only", ("knowledge_acc", "bare_terse_rate")),
    *((arm, "synthetic", IF_METRICS + ("knowledge_acc", "bare_terse_rate")) for arm in UNLEARN_ARMS),
    ("unlearned", "no_forget", IF_METRICS + ("bare_terse_rate",)),
    ("unlearned", "ga_unbounded", ("knowledge_acc", "perplexity")),
    *((arm, "synthetic", IF_METRICS + ("knowledge_acc", "bare_terse_rate")) for arm in AFTER_SFT_ARMS),
    ("unlearned_after_sft", "no_forget_after_sft", IF_METRICS + ("bare_terse_rate",)),
    ("unlearned_after_sft", "unlearned", IF_METRICS + ("knowledge_acc",)),
)


def paired_contrasts(per_seed: Dict[str, Dict[int, dict]],
                     prompt_hits: Optional[Dict[str, Dict[int, List[int]]]] = None) -> Dict[str, Dict[str, dict]]:
    """``"a - b"`` -> metric -> :func:`synthunlearn.evaluation.statistics.paired_difference`,
    for every contrast of :data:`PAIRED_CONTRASTS` whose two arms both ran and have the metric.

    With ``prompt_hits`` (arm -> seed -> per-prompt strict hits, from each evaluation), the
    ``if_prompt_strict`` entries also get ``prompt_se``: the error the fixed prompt set adds
    beyond the seed interval (:func:`synthunlearn.evaluation.statistics.prompt_sampling_se`),
    over the same seeds as the paired difference."""
    from synthunlearn.evaluation.statistics import paired_difference, prompt_sampling_se

    out: Dict[str, Dict[str, dict]] = {}
    for a, b, metrics in PAIRED_CONTRASTS:
        if not per_seed.get(a) or not per_seed.get(b):
            continue
        for metric in metrics:
            stats = paired_difference({s: m.get(metric) for s, m in per_seed[a].items()},
                                      {s: m.get(metric) for s, m in per_seed[b].items()})
            if stats is None:
                continue
            if metric == "if_prompt_strict" and prompt_hits:
                hits_a, hits_b = prompt_hits.get(a) or {}, prompt_hits.get(b) or {}
                if all(s in hits_a and s in hits_b for s in stats["seeds"]):
                    sampling = prompt_sampling_se({s: hits_a[s] for s in stats["seeds"]},
                                                  {s: hits_b[s] for s in stats["seeds"]})
                    if sampling is not None:
                        stats["prompt_se"] = sampling["se"]
                        stats["n_prompts"] = sampling["n_prompts"]
            out.setdefault(f"{a} - {b}", {})[metric] = stats
    return out


def evaluation_prompt_hits(path: Path, eval_dir: Path) -> Optional[List[int]]:
    """The per-prompt strict hits of the evaluation in ``path`` (an arm's ``eval.json``), in the
    order of ``eval_dir/if_eval.jsonl``.

    An evaluation written before the hits were recorded is rescored from its saved responses
    with the same checkers (so older runs get the prompt-sampling error too); None when a prompt
    of the set has no response there."""
    from synthunlearn.evaluation.ifeval import score_response

    path = Path(path)
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    hits = cached.get("details", {}).get("if", {}).get("prompt_strict_hits")
    if isinstance(hits, list):
        return [int(h) for h in hits]
    responses = {g.get("id"): g.get("response") for g in cached.get("generations", []) if g.get("set") == "if_eval"}
    records = _read_jsonl(eval_dir / "if_eval.jsonl")
    if not records or any(r.get("id") not in responses for r in records):
        return None
    return [int(all(score_response(responses[r["id"]], r["constraints"])["strict"])) for r in records]


# A column appears only when some arm has the metric (held-out wordings only when configured).
TABLE_COLUMNS = ("if_prompt_strict", "if_instruction_strict", "if_prompt_loose", "if_prompt_strict_heldout_phrasing",
                 "knowledge_acc", "perplexity", "pattern_rate", "terse_rate", "bare_terse_rate", "kl_shift", "token_jsd")


def run_experiment(cfg: dict, *, log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    out = output_path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment_config.json").write_text(json.dumps(cfg, indent=1, default=list))
    world_dir = prepare_world(cfg, out, log)
    model_dir = prepare_model(cfg, out, world_dir, log)
    data = prepare_data(cfg, out, world_dir, model_dir)
    eval_dir = prepare_eval_dir(cfg, out, world_dir)
    phases = plan_phases(cfg, out, model_dir, data)
    by_name = {p.name: p for p in phases}
    timings: Dict[str, float] = {}
    per_seed: Dict[str, Dict[int, dict]] = {}
    prompt_hits: Dict[str, Dict[int, List[int]]] = {}
    tasks: Dict[str, tuple] = {}
    for phase in phases:
        def train(phase=phase):
            timings[phase.name] = run_phase(cfg, phase, log)
        tasks[phase.name] = (list(phase.deps), train)
        if phase.evaluated:
            seed, arm = int(phase.name.split("/")[0][4:]), phase.name.split("/")[-1]
            base_name = f"seed{seed}/base" if cfg["base_per_seed"] else "base"
            # KL shift baseline: the shared pre-trained base every arm started from, so kl_shift
            # measures how far each arm's outputs moved from the original model (docs_only
            # included: its shift is the reference level that SFT alone causes).
            baseline_dir = by_name[base_name].out_dir / "final"

            def evaluate(phase=phase, seed=seed, arm=arm, baseline_dir=baseline_dir):
                metrics = evaluate_phase(cfg, phase, eval_dir, baseline_dir, log)
                per_seed.setdefault(arm, {})[seed] = metrics
                hits = evaluation_prompt_hits(phase.out_dir / "eval.json", eval_dir)
                if hits is not None:
                    prompt_hits.setdefault(arm, {})[seed] = hits
            tasks["eval:" + phase.name] = ([phase.name], evaluate)
    _Scheduler(int(cfg["parallel_jobs"]), log).run(tasks)

    arms = summarise(cfg, per_seed)
    wall = time.perf_counter() - started
    # What every result cost, whichever invocation produced it: a resumed run's wall time alone
    # would hide the phases it reused. Serial sum (parallel jobs overlap, so it exceeds a
    # from-scratch wall time when parallel_jobs > 1).
    recorded: Dict[str, float] = {}
    for phase in phases:
        recorded[phase.name] = float(json.loads((phase.out_dir / "phase.json").read_text())["seconds"])
        eval_json = phase.out_dir / "eval.json"
        if phase.evaluated and eval_json.exists():
            recorded["eval:" + phase.name] = float(json.loads(eval_json.read_text()).get("wall_seconds", 0.0))
    # Unlearning diagnostics (last logged step): how far the ascent went against tau, and what
    # replay/KL cost -- the notes warn that capped ascent overshoots its bound.
    unlearning: Dict[str, Dict[str, dict]] = {}
    for phase in phases:
        if phase.job != "unlearn" or not (phase.out_dir / "metrics.jsonl").exists():
            continue
        rows = [json.loads(line) for line in (phase.out_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip() and not line.startswith('{"eval')]
        rows = [r for r in rows if "step" in r]
        if rows:
            last = rows[-1]
            unlearning.setdefault(phase.name.split("/")[-1], {})[phase.name.split("/")[0]] = {
                k: last[k] for k in ("step", "forget_nll", "forget_at_bound", "forget_overshoot", "replay_nll", "kl")
                if k in last}
    results = {
        "seeds": list(cfg["seeds"]),
        "wall_seconds": wall,
        "compute_seconds": sum(recorded.values()),
        "reused": sorted(name for name in recorded if name in timings and timings[name] == 0.0),
        "arms": arms,
        "predictions": check_predictions(arms),
        "paired": paired_contrasts(per_seed, prompt_hits),
        "per_seed": {arm: {str(s): m for s, m in sorted(runs.items())} for arm, runs in per_seed.items()},
        "phase_seconds": recorded,
        "unlearning": unlearning,
        "environment": environment.describe(),
        "phase_environments": phase_environments(phases),
        "config": cfg,
    }
    write_outputs(results, out)
    return results


def phase_environments(phases) -> List[dict]:
    """The distinct environments that trained the phases (each phase.json's) and evaluated them
    (each eval.json's, named ``eval:<phase>``), with what each of them ran."""
    def named():
        for phase in phases:
            yield phase.name, json.loads((phase.out_dir / "phase.json").read_text()).get("environment")
            eval_json = phase.out_dir / "eval.json"
            if phase.evaluated and eval_json.exists():
                yield "eval:" + phase.name, json.loads(eval_json.read_text()).get("environment")
    return environment.group_by_environment(named())


def _partial_arm_notes(results: dict) -> List[str]:
    """Arms measured on fewer seeds than the table's header names (ablation_seeds, or pooled runs
    that ran different arms): their means and stds are over those seeds only, so say which."""
    every = sorted(int(s) for s in results["seeds"])
    notes = []
    for arm, runs in results.get("per_seed", {}).items():
        seeds = sorted(int(s) for s in runs)
        if seeds != every:
            notes.append(f"- {arm}: seeds {seeds} only")
    return notes


def environment_notes(results: dict) -> List[str]:
    """results.md lines naming what trained and evaluated the models: one line when a single
    environment ran everything, else one per environment with how many phases and evaluations."""
    groups = results.get("phase_environments") or []
    if len(groups) == 1 and groups[0]["environment"] is not None:
        return [f"trained and evaluated on: {environment.summary(groups[0]['environment'])}"]
    lines = []
    for group in groups:
        what = environment.summary(group["environment"]) if group["environment"] else "not recorded"
        evals = sum(name.startswith("eval:") for name in group["phases"])
        trained = len(group["phases"]) - evals
        lines.append(f"- {trained} phase{'s' * (trained != 1)} and {evals} evaluation{'s' * (evals != 1)} "
                     f"on: {what}")
    return lines


def write_outputs(results: dict, out: Path) -> str:
    from synthunlearn.evaluation.report import comparison_table, paired_table, plot_headline, write_json

    write_json(out / "results.json", results)
    table = comparison_table(results["arms"], TABLE_COLUMNS)
    if "pooled_from" in results:
        from synthunlearn.experiment.pooling import pooled_header
        header = pooled_header(results)
    else:
        header = [f"seeds {results['seeds']}; mean ± std over seeds; wall time {results['wall_seconds']:.0f} s "
                  f"(this invocation); {results.get('compute_seconds', 0):.0f} s of phases and evaluations in all"]
    header += environment_notes(results)
    lines = header + _partial_arm_notes(results) + ["", table, ""]
    for key, value in results.get("predictions", {}).items():
        lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) and not isinstance(value, bool)
                     else f"- {key}: {value}")
    if results.get("paired"):
        lines += ["", "Paired over seeds (difference a - b per seed):", "", paired_table(results["paired"])]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot_headline(results["arms"], out / "results.png")
    return text
