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

The modules beside this one: :mod:`~synthunlearn.experiment.config` reads and checks the
experiment file and names the arms; :mod:`~synthunlearn.experiment.phases` runs one phase, or
reuses it here or from ``reuse_from``; :mod:`~synthunlearn.experiment.results` computes what is
reported and writes ``results.json``, ``results.md`` and ``results.png``. This one prepares the
world, the initial model and the data, plans the phases, evaluates each arm's last model and runs
it all in dependency order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

from synthunlearn import environment
from synthunlearn.experiment.config import (AFTER_SFT_ARMS, REPO, UNLEARN_ARMS, evaluation_device, output_path,
                                            world_config)
from synthunlearn.experiment.phases import Phase, override_args, relocate, run_phase
from synthunlearn.experiment.results import (check_predictions, evaluation_prompt_hits, paired_contrasts,
                                             phase_environments, phase_seconds, summarise, unlearning_diagnostics,
                                             write_outputs)


# ----------------------------------------------------------------------------------------------
# The world, the initial model and the data

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


def base_phase_name(cfg: dict, seed: int) -> str:
    """The pre-training phase a seed's arms start from: one shared base, or with ``base_per_seed``
    the seed's own."""
    return f"seed{seed}/base" if cfg["base_per_seed"] else "base"


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
        base_name = base_phase_name(cfg, seed)
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
    return load_config(config, override_args(dict(spec.get("overrides") or {}))).data.max_length


# ----------------------------------------------------------------------------------------------
# Evaluating an arm, and running the tasks in dependency order

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
            if relocate(str(cached.get("signature")), source, out) == signature:
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
# The run

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
            base_name = base_phase_name(cfg, seed)
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
    recorded = phase_seconds(phases)
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
        "unlearning": unlearning_diagnostics(phases),
        "environment": environment.describe(),
        "phase_environments": phase_environments(phases),
        "config": cfg,
    }
    write_outputs(results, out)
    return results
