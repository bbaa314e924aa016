"""The experiment's configuration, training files and phase plan, without training anything."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from synthunlearn.errors import ConfigError
from synthunlearn.experiment.pipeline import (REPO, evaluation_device, launcher_command, load_experiment_config,
                                              plan_phases, prepare_data, prepare_model, prepare_world)

SMALL_WORLD = ("world={n_people: 30, pretrain_instruction_people: 8, sft_people: 10, docs_per_person: 2, n_orgs: 5, "
               "n_cities: 6, n_pretrain_instructions: 20, n_sft: 20, n_if_eval: 6, n_mc: 8, n_heldout_docs: 4, "
               "n_neutral: 4}")
SMALL_MODEL = ("model={vocab_size: 400, seed: 0, arch: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
               "num_key_value_heads: 1, intermediate_size: 64, max_position_embeddings: 256}}")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """World + tokenizer built once; each test writes its own data files from them."""
    out = tmp_path_factory.mktemp("plan")
    cfg = load_experiment_config(None, [f"output_dir={out}", SMALL_WORLD, SMALL_MODEL])
    world_dir = prepare_world(cfg, out, lambda _: None)
    model_dir = prepare_model(cfg, out, world_dir, lambda _: None)
    return out, world_dir, model_dir


def _data(prepared, tmp_path, *overrides):
    out, world_dir, model_dir = prepared
    cfg = load_experiment_config(None, [f"output_dir={tmp_path}", SMALL_WORLD, SMALL_MODEL, *overrides])
    return cfg, prepare_data(cfg, tmp_path, world_dir, model_dir), model_dir


@pytest.mark.parametrize("override,message", [
    ("data.synthetic_fromat=chat", "data: unknown keys ['synthetic_fromat']"),
    ("data.synthetic_format=markdown", "data.synthetic_format: 'markdown'; valid: qa, chat"),
    ("data.synthetic_budget=more", "data.synthetic_budget: 'more'; valid: same_steps, same_passes"),
    ("data.after_sft_replay=docs", "data.after_sft_replay: 'docs'; valid: corpus, sft, corpus_and_sft"),
    ("evaluation.if_evals=3", "evaluation: unknown keys ['if_evals']"),
    ("phases.cptt.max_steps=3", "phases: unknown keys ['cptt']"),
    ("phases.cpt.max_step=3", "phases.cpt: expected a mapping of config, max_steps, overrides; unknown keys ['max_step']"),
    ("phases.sft=30", "phases.sft: expected a mapping of config, max_steps, overrides"),
    ("phases.sft.max_steps=0", "phases.sft.max_steps: 0; expected a positive integer"),
    ("phases.cpt.max_steps=null", "phases.cpt.max_steps: None; expected a positive integer"),
    ("phases.unlearn_after_sft.max_steps=2.5", "phases.unlearn_after_sft.max_steps: 2.5; expected a positive "
                                                "integer or null (the unlearn phase's)"),
    ("phases.unlearn.config=null", "phases.unlearn.config: None; expected the path of a run config"),
    ("phases.unlearn_after_sft.overrides=[3]", "phases.unlearn_after_sft.overrides: [3]; expected a mapping"),
    ("model.vocab=512", "model: unknown keys ['vocab']"),
    ("model.arch={hiden_size: 64}", "model.arch: unknown LlamaConfig fields ['hiden_size']"),
    ("world.n_peeple=300", "unknown key 'world.n_peeple'; valid keys under world: seed, n_people"),
    ("world.n_people=4", "world.n_people: must"),
    ("world.n_people=[3]", "world.n_people: invalid value [3]; expected int"),
    ("world.test_constraints=min_words", "world.test_constraints: invalid value 'min_words'; expected a list of str"),
    ("evaluation.device=gpu", "evaluation.device: 'gpu'; valid: auto, cpu, cuda, cuda:N"),
    ("evaluation.device=cuda:99", "evaluation.device: 'cuda:99' but torch sees"),
    ("reuse_from=runs/no-such-experiment", "reuse_from: 'runs/no-such-experiment' is not a directory"),
    # Values that are not valid YAML, and mistyped values, fail before anything is written.
    ("seeds=[0", "override 'seeds=[0': value is not valid YAML"),
    ("phases.sft.max_steps=[1", "override 'phases.sft.max_steps=[1': value is not valid YAML"),
    ("seeds=3", "seeds: invalid value 3; expected a list of int"),
    ("seeds=[a]", "seeds[0]: invalid value 'a'; expected int"),
    ("seeds=[0, 1, 0]", "seeds: [0, 1, 0]; name each seed once"),
    ("ablation_seeds=1", "ablation_seeds: invalid value 1; expected a list of int or null"),
    ("arms=synthetic", "arms: invalid value 'synthetic'; expected a list of str"),
    ("nprocs=two", "nprocs: invalid value 'two'; expected int"),
    ("nprocs=0", "nprocs: 0; expected a positive integer"),
    ("parallel_jobs=x", "parallel_jobs: invalid value 'x'; expected int"),
    ("omp_threads=1.5", "omp_threads: invalid value 1.5; expected int"),
    ("base_per_seed=1", "base_per_seed: invalid value 1; expected bool"),
    ("output_dir.x=1", "output_dir: invalid value {'x': 1}; expected str"),
    ("deepspeed_config=null", "deepspeed_config: invalid value None; expected str"),
    ("model.vocab_size=big", "model.vocab_size: invalid value 'big'; expected int"),
    ("model.vocab_size=0", "model.vocab_size: 0; expected a positive integer"),
    ("data.synthetic_copies=-1", "data.synthetic_copies: -1; expected a non-negative integer"),
    ("data.instructions_in_cpt=maybe", "data.instructions_in_cpt: invalid value 'maybe'; expected bool"),
    ("evaluation.if_eval=abc", "evaluation.if_eval: invalid value 'abc'; expected int or null"),
    ("evaluation.if_eval=-8", "evaluation.if_eval: -8; expected a non-negative integer or null (the whole set)"),
    ("evaluation.batch_size=0", "evaluation.batch_size: 0; expected a positive integer"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_experiment_config(None, [override])
    assert message in str(error.value)


def test_every_experiment_key_has_a_checked_type():
    """A key added to DEFAULTS gets a type in pipeline.py (or its section's own check): every
    scalar key and every key of data, evaluation and model (arch aside) is typed, and the
    defaults themselves pass."""
    import dataclasses

    from synthunlearn.experiment.pipeline import (DEFAULTS, _DataTypes, _EvaluationTypes, _ModelTypes,
                                                  _TopLevelTypes)

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    assert names(_TopLevelTypes) == set(DEFAULTS) - {"world", "model", "data", "phases", "evaluation"}
    assert names(_ModelTypes) == set(DEFAULTS["model"]) - {"arch"}
    assert names(_DataTypes) == set(DEFAULTS["data"])
    assert names(_EvaluationTypes) == set(DEFAULTS["evaluation"])
    cfg = load_experiment_config(None, ["evaluation.if_eval=null", "data.synthetic_copies=0"])
    assert cfg["evaluation"]["if_eval"] is None and cfg["data"]["synthetic_copies"] == 0


def test_experiment_launcher_reports_a_bad_override_as_an_error_line(capsys):
    """An override that is not valid YAML is a user error: one ``error:`` line naming it and
    exit status 2, as for every other bad key, not a yaml traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_experiment", REPO / "launch" / "experiment.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["seeds=[0", "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("error: override 'seeds=[0': value is not valid YAML")
    assert launcher.main(["nprocs=two", "--print-config"]) == 2
    assert capsys.readouterr().err == "error: experiment config: nprocs: invalid value 'two'; expected int\n"


def test_reuse_from_must_be_another_directory(tmp_path):
    with pytest.raises(ConfigError, match="reuse_from: .* is output_dir itself"):
        load_experiment_config(None, [f"output_dir={tmp_path}", f"reuse_from={tmp_path}/."])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_each_file_over_the_one_it_names(tmp_path):
    """A chain of three files, each naming its parent relative to its own folder: mappings merge
    at every depth, lists replace, and command-line overrides still come last."""
    _write(tmp_path / "base" / "grand.yaml",
           "seeds: [0, 1, 2, 3]\narms: [docs_only, synthetic, unlearned]\n"
           "world: {n_people: 400, test_constraints: [min_words, quoted]}\n"
           "phases:\n  base: {max_steps: 480, overrides: {data.max_length: 128}}\n"
           "  unlearn: {max_steps: 60, overrides: {data.max_length: 128, optimisation.lr: 1.0e-3}}\n")
    _write(tmp_path / "parent.yaml", "extends: base/grand.yaml\nseeds: [5]\nworld: {n_people: 500}\n"
                                     "phases: {base: {max_steps: 1344}}\n")
    child = _write(tmp_path / "sub" / "child.yaml",
                   "extends: ../parent.yaml\nworld: {test_constraints: [bullet_list]}\n"
                   "phases: {unlearn: {overrides: {optimisation.lr: 5.0e-4}}}\n")
    cfg = load_experiment_config(child, ["phases.base.max_steps=7"])
    assert cfg["seeds"] == [5] and cfg["arms"] == ["docs_only", "synthetic", "unlearned"]
    assert cfg["world"]["n_people"] == 500 and cfg["world"]["test_constraints"] == ["bullet_list"]
    assert cfg["phases"]["base"] == {"config": "configs/experiment/pretrain.yaml", "max_steps": 7,
                                     "overrides": {"data.max_length": 128}}
    assert cfg["phases"]["unlearn"]["overrides"] == {"data.max_length": 128, "optimisation.lr": 5.0e-4}
    assert cfg["phases"]["unlearn"]["max_steps"] == 60
    assert "extends" not in cfg


@pytest.mark.parametrize("files,message", [
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "a.yaml: extends forms a cycle: "),
    ({"a.yaml": "extends: a.yaml\n"}, "a.yaml: extends forms a cycle: "),
    ({"a.yaml": "extends: nope.yaml\n"}, "a.yaml: extends: 'nope.yaml': no such file"),
    ({"a.yaml": "extends: [b.yaml]\n"}, "a.yaml: extends: expected the path of another experiment config"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "seeds: [0]\nsteps: 3\n"}, "b.yaml: unknown keys ['steps']"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "data: {synthetic_fromat: chat}\n"},
     "b.yaml: data: unknown keys ['synthetic_fromat']"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "phases: {cpt: {max_step: 3}}\n"},
     "b.yaml: phases.cpt: expected a mapping of config, max_steps, overrides; unknown keys ['max_step']"),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "seeds: [0\narms: []\n"}, "b.yaml:2: invalid YAML"),
])
def test_extends_errors_name_the_file(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError) as error:
        load_experiment_config(tmp_path / "a.yaml", [])
    assert message in str(error.value)


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_experiment", REPO / "launch" / "experiment.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    config = REPO / "configs" / "experiment" / "demo_30m.yaml"
    out = tmp_path / "never-written"
    assert launcher.main(["--config", str(config), "--print-config", f"output_dir={out}", "seeds=[3]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_experiment_config(config, [f"output_dir={out}", "seeds=[3]"])
    assert printed["seeds"] == [3] and printed["model"]["arch"]["hidden_size"] == 512
    assert not out.exists()


def test_scaled_study_configs_keep_the_settings_they_inherit():
    """demo_14m.yaml extends demo_5m.yaml and demo_30m.yaml extends demo_14m.yaml: each states
    only its model, world sizes and steps, and inherits the measured study settings."""
    def resolved(name):
        return load_experiment_config(REPO / "configs" / "experiment" / name, [])

    five, fourteen, thirty = resolved("demo_5m.yaml"), resolved("demo_14m.yaml"), resolved("demo_30m.yaml")
    for cfg in (fourteen, thirty):
        for section in ("data", "evaluation"):
            assert cfg[section] == five[section]
        assert cfg["phases"]["unlearn"] == five["phases"]["unlearn"] and cfg["phases"]["sft"] == five["phases"]["sft"]
        world = {k: v for k, v in cfg["world"].items()
                 if k not in ("n_people", "pretrain_instruction_people", "n_pretrain_instructions")}
        assert world == five["world"]
    assert [c["model"]["arch"]["hidden_size"] for c in (five, fourteen, thirty)] == [256, 384, 512]
    assert [c["phases"]["base"]["max_steps"] for c in (five, fourteen, thirty)] == [480, 1344, 2976]


def test_mapping_overrides_merge_into_the_defaults():
    cfg = load_experiment_config(None, ["evaluation={if_eval: 8, batch_size: 4}", "model.arch={hidden_size: 48}"])
    assert cfg["evaluation"]["if_eval"] == 8 and cfg["evaluation"]["batch_size"] == 4
    assert cfg["evaluation"]["device"] == "auto" and cfg["evaluation"]["knowledge_mc"] == 200
    assert cfg["model"]["arch"] == {"hidden_size": 48} and cfg["model"]["vocab_size"] == 1024


def test_evaluation_device_auto_follows_the_hardware():
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert evaluation_device(load_experiment_config(None, [])) == expected
    assert evaluation_device(load_experiment_config(None, ["evaluation.device=cpu"])) == "cpu"


def test_qa_rendering(prepared, tmp_path):
    cfg, data, _ = _data(prepared, tmp_path, "data.synthetic_format=qa", "data.synthetic_copies=2")
    pairs = _read(prepared[1] / "synthetic_qa.jsonl")
    docs_only, synthetic = _read(data["cpt_docs_only"]), _read(data["cpt_synthetic"])
    added = synthetic[len(docs_only):]
    assert synthetic[:len(docs_only)] == docs_only and len(added) == 2 * len(pairs)
    assert added[0] == {"text": f"Question: {pairs[0]['question']}\nAnswer: {pairs[0]['answer']}"}
    assert _read(data["forget"])[0] == {"question": pairs[0]["question"], "answer": pairs[0]["answer"]}


def test_chat_rendering_matches_the_sft_layout(prepared, tmp_path):
    from transformers import AutoTokenizer

    from synthunlearn.evaluation.generate import format_chat

    cfg, data, model_dir = _data(prepared, tmp_path, "data.synthetic_format=chat", "data.synthetic_copies=1")
    pairs = _read(prepared[1] / "synthetic_qa.jsonl")
    docs_only, synthetic = _read(data["cpt_docs_only"]), _read(data["cpt_synthetic"])
    text = synthetic[len(docs_only)]["text"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = format_chat(tokenizer, [{"role": "user", "content": pairs[0]["question"]}])
    # The CPT text is exactly what evaluation prompts with, followed by the terse answer (the data
    # pipeline adds <bos>/<eos> to text records, so the template's own are stripped).
    assert prompt.startswith(tokenizer.bos_token)
    assert text == prompt[len(tokenizer.bos_token):] + pairs[0]["answer"]
    forget = _read(data["forget"])[0]
    assert forget == {"messages": [{"role": "user", "content": pairs[0]["question"]},
                                   {"role": "assistant", "content": pairs[0]["answer"]}]}


@pytest.mark.parametrize("budget", ["same_steps", "same_passes"])
def test_synthetic_budget(prepared, tmp_path, budget):
    cfg, data, model_dir = _data(prepared, tmp_path, f"data.synthetic_budget={budget}", "phases.cpt.max_steps=10",
                                 "data.synthetic_copies=3", "arms=[docs_only,synthetic]", "seeds=[0,1]")
    phases = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    n_docs, n_synth = len(_read(data["cpt_docs_only"])), len(_read(data["cpt_synthetic"]))
    assert n_synth > n_docs
    expected = 10 if budget == "same_steps" else round(10 * n_synth / n_docs)
    for seed in (0, 1):
        assert phases[f"seed{seed}/cpt/docs_only"].max_steps == 10
        assert phases[f"seed{seed}/cpt/synthetic"].max_steps == expected
        # SFT budget is the same for every arm whatever the CPT budget.
        assert phases[f"seed{seed}/sft/docs_only"].max_steps == phases[f"seed{seed}/sft/synthetic"].max_steps


def test_unlearning_arms_differ_from_unlearned_in_one_term_only(prepared, tmp_path):
    """Each ablation and the no_forget control start from the same synthetic model, on the same
    forget/replay files and seed, and change exactly one objective key; the default arms are
    the issue's six (the control runs only when named)."""
    from synthunlearn.experiment.pipeline import DEFAULT_ARMS, UNLEARN_ARMS

    assert load_experiment_config(None, [])["arms"] == list(DEFAULT_ARMS) and "no_forget" not in DEFAULT_ARMS
    arms = ["docs_only", "synthetic", *UNLEARN_ARMS]
    cfg, data, model_dir = _data(prepared, tmp_path, f"arms=[{','.join(arms)}]", "seeds=[3]")
    phases = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    reference = phases["seed3/unlearn/unlearned"]
    changed = {"ga_unbounded": {"objective.forget": "ga"}, "no_replay": {"objective.replay_weight": 0},
               "no_kl": {"objective.kl_weight": 0}, "no_forget": {"objective.forget_weight": 0}}
    for arm, extra in changed.items():
        phase = phases[f"seed3/unlearn/{arm}"]
        assert phase.overrides == {**reference.overrides, **extra}, arm
        assert (phase.seed, phase.max_steps, phase.deps) == (reference.seed, reference.max_steps, reference.deps)
        assert phases[f"seed3/sft/{arm}"].overrides["model.path"] == str(phase.out_dir / "final")


def test_after_sft_arms_unlearn_the_synthetic_arms_fine_tuned_model(prepared, tmp_path):
    """``unlearned_after_sft`` / ``no_forget_after_sft`` are the pre-SFT phases with only the
    starting model moved to sft/synthetic; they are evaluated as they end (no second SFT), and
    sft/synthetic is planned for them even when the synthetic arm itself is not named."""
    from synthunlearn.experiment.pipeline import AFTER_SFT_ARMS

    arms = ["unlearned", "no_forget", *AFTER_SFT_ARMS]
    cfg, data, model_dir = _data(prepared, tmp_path, f"arms=[{','.join(arms)}]", "seeds=[2]")
    phases = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    sft_synthetic = phases["seed2/sft/synthetic"]
    assert sft_synthetic.evaluated and "seed2/sft/docs_only" not in phases
    for arm, before in AFTER_SFT_ARMS.items():
        after, pre = phases[f"seed2/unlearn/{arm}"], phases[f"seed2/unlearn/{before}"]
        assert after.deps == ["seed2/sft/synthetic"] and after.evaluated and not pre.evaluated
        assert after.overrides == {**pre.overrides, "model.path": str(sft_synthetic.out_dir / "final")}
        assert (after.job, after.seed, after.max_steps, after.config) == (pre.job, pre.seed, pre.max_steps, pre.config)
        assert f"seed2/sft/{arm}" not in phases
    # Every evaluated phase is an arm's last one: one per arm (sft/synthetic included) per seed.
    assert sorted(p.name for p in phases.values() if p.evaluated) == sorted(
        ["seed2/sft/synthetic", "seed2/sft/unlearned", "seed2/sft/no_forget",
         *(f"seed2/unlearn/{arm}" for arm in AFTER_SFT_ARMS)])
    # ablation_seeds limits them as it limits the pre-SFT ablations.
    cfg, data, model_dir = _data(prepared, tmp_path, "arms=[synthetic,unlearned_after_sft]", "seeds=[0,1]",
                                 "ablation_seeds=[1]")
    names = {p.name for p in plan_phases(cfg, tmp_path, model_dir, data)}
    assert "seed1/unlearn/unlearned_after_sft" in names and "seed0/unlearn/unlearned_after_sft" not in names


def test_unlearn_after_sft_phase_settings_change_only_the_after_sft_phases(prepared, tmp_path):
    """``phases.unlearn_after_sft`` left unset plans the after-SFT phases from ``phases.unlearn``
    (the same commands as before it existed); its ``max_steps`` and ``overrides`` (merged over the
    unlearn phase's) then change those phases alone, and the pre-SFT unlearning keeps its own."""
    from synthunlearn.experiment.pipeline import AFTER_SFT_ARMS, launcher_command

    arms = f"arms=[docs_only,synthetic,unlearned,no_forget,{','.join(AFTER_SFT_ARMS)}]"
    common = [arms, "seeds=[1]", "phases.unlearn.max_steps=7",
              "phases.unlearn.overrides={optimisation.lr: 1.0e-3, data.max_length: 96}"]
    cfg, data, model_dir = _data(prepared, tmp_path, *common)
    inherited = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    for arm, before in AFTER_SFT_ARMS.items():
        after, pre = inherited[f"seed1/unlearn/{arm}"], inherited[f"seed1/unlearn/{before}"]
        assert after.max_steps == pre.max_steps == 7 and after.config == pre.config
        assert after.overrides["optimisation.lr"] == 1.0e-3 and after.overrides["data.max_length"] == 96
    cfg, data, model_dir = _data(prepared, tmp_path, *common, "phases.unlearn_after_sft.max_steps=5",
                                 "phases.unlearn_after_sft.overrides={optimisation.lr: 2.5e-4}")
    gentle = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    assert gentle.keys() == inherited.keys()
    for name, phase in gentle.items():
        if name.endswith("_after_sft"):
            was = inherited[name]
            assert phase.max_steps == 5 and phase.overrides == {**was.overrides, "optimisation.lr": 2.5e-4}
            assert list(phase.overrides) == list(was.overrides), "key order (and so the command) kept"
            assert "optimisation.lr=0.00025" in launcher_command(cfg, phase)
        else:
            assert (phase.max_steps, phase.overrides) == (inherited[name].max_steps, inherited[name].overrides)


@pytest.mark.parametrize("choice", ["sft", "corpus_and_sft"])
def test_after_sft_replay_changes_only_the_after_sft_phases(prepared, tmp_path, choice):
    """``data.after_sft_replay=sft``: the after-SFT phases replay the SFT file; ``corpus_and_sft``:
    the corpus file and the SFT file, the latter repeated so each gives half the draws. Both at
    the SFT phase's max_length (its overrides', else its run config's); every other phase,
    including the pre-SFT unlearning, is planned exactly as with the default ``corpus``."""
    from synthunlearn.experiment.pipeline import AFTER_SFT_ARMS

    arms = f"arms=[docs_only,synthetic,unlearned,no_forget,{','.join(AFTER_SFT_ARMS)}]"
    cfg, data, model_dir = _data(prepared, tmp_path, arms, "seeds=[1]")
    corpus = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
    sft_yaml_length = yaml.safe_load((REPO / "configs/experiment/sft.yaml").read_text())["data"]["max_length"]
    n_corpus, n_sft = len(_read(data["replay"])), len(_read(data["sft"]))
    assert n_corpus != n_sft
    replay = ({"data.replay.path": str(data["sft"])} if choice == "sft" else
              {"data.replay.path": None, "data.replay.files": [
                  {"path": str(data["replay"])}, {"path": str(data["sft"]), "repeat": round(n_corpus / n_sft, 6)}]})
    for sft_overrides, length in (("{}", sft_yaml_length), ("{data.max_length: 150}", 150)):
        cfg, data, model_dir = _data(prepared, tmp_path, arms, "seeds=[1]", f"data.after_sft_replay={choice}",
                                     f"phases.sft.overrides={sft_overrides}")
        replayed = {p.name: p for p in plan_phases(cfg, tmp_path, model_dir, data)}
        assert replayed.keys() == corpus.keys()
        for name, phase in replayed.items():
            if name.startswith("seed1/unlearn/") and name.endswith("_after_sft"):
                assert phase.overrides == {**corpus[name].overrides, **replay, "data.max_length": length}, name
                assert corpus[name].overrides["data.replay.path"] == str(data["replay"]) != str(data["sft"])
            elif name.startswith("seed1/sft/") and length != sft_yaml_length:
                assert phase.overrides == {**corpus[name].overrides, "data.max_length": 150}, name
            else:
                assert phase.overrides == corpus[name].overrides, name


def test_inputs_digest_reads_the_files_of_a_mixture(tmp_path):
    """Each file of a ``data.replay.files`` list is part of a phase's inputs (rewriting one reruns
    the phase), and the digest holds the files' contents, not where they are: the same files in
    another directory (another experiment's output_dir, as reuse_from compares) digest the same."""
    import shutil

    from synthunlearn.experiment.pipeline import Phase, inputs_digest

    def digest(root, overrides):
        resolved = {k: (str(root / v) if k.endswith(".path") and v else
                        [{**f, "path": str(root / f["path"])} for f in v] if k.endswith(".files") else v)
                    for k, v in overrides.items()}
        return inputs_digest(Phase("p", "unlearn", root / "p", str(root / "unlearn.yaml"), 1, 0, resolved, []))

    here = tmp_path / "here"
    here.mkdir()
    (here / "unlearn.yaml").write_text("optimisation:\n  lr: 3.0e-4\n")
    (here / "docs.jsonl").write_text('{"text": "a"}\n')
    (here / "chat.jsonl").write_text('{"messages": []}\n')
    plain = {"data.replay.path": "docs.jsonl", "objective.kl_weight": 0}
    mixture = {"data.replay.path": None,
               "data.replay.files": [{"path": "docs.jsonl"}, {"path": "chat.jsonl", "repeat": 2.3}]}
    shutil.copytree(here, tmp_path / "there")
    assert digest(here, plain) == digest(tmp_path / "there", plain)
    before = digest(here, mixture)
    assert before == digest(tmp_path / "there", mixture)
    assert before != digest(here, {"data.replay.files": [{"path": "docs.jsonl"}]})
    (here / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "b"}]}\n')
    assert digest(here, mixture) != before


def test_predictions_are_computed_from_the_seed_means():
    from synthunlearn.experiment.pipeline import check_predictions

    def arm(if_strict, knowledge, bare, perplexity=10.0):
        return {"if_prompt_strict": {"mean": if_strict}, "knowledge_acc": {"mean": knowledge},
                "bare_terse_rate": {"mean": bare}, "perplexity": {"mean": perplexity}}

    out = check_predictions({"docs_only": arm(0.60, 0.40, 0.00), "synthetic": arm(0.45, 0.42, 0.60),
                             "unlearned": arm(0.50, 0.41, 0.10), "ga_unbounded": arm(0.30, 0.30, 0.0, 20.0)})
    assert out["if_gap_docs_minus_synthetic"] == pytest.approx(0.15) and out["synthetic_worse_by_10_points"]
    assert out["synthetic_knowledge_at_least_docs"] and out["unlearned_knowledge_within_3_points"]
    assert out["unlearned_recovered_share"] == pytest.approx(1 / 3) and not out["unlearned_recovers_half"]
    assert out["pattern_gap_synthetic_minus_docs"] == pytest.approx(0.60)
    assert out["unlearned_pattern_removed_share"] == pytest.approx(5 / 6) and out["unlearned_removes_half_the_pattern"]
    assert out["ga_unbounded_knowledge_drop"] == pytest.approx(0.12)
    assert out["ga_unbounded_perplexity_ratio"] == pytest.approx(2.0)
    assert out["ga_unbounded_knowledge_below_unlearned"] == pytest.approx(0.11)
    assert not any(key.startswith("unlearned_after_sft") for key in out)
    after = check_predictions({"docs_only": arm(0.60, 0.40, 0.00), "synthetic": arm(0.45, 0.42, 0.60),
                               "unlearned_after_sft": arm(0.54, 0.38, 0.15)})
    assert after["unlearned_after_sft_recovered_share"] == pytest.approx(0.6) and after["unlearned_after_sft_recovers_half"]
    assert not after["unlearned_after_sft_knowledge_within_3_points"]
    assert after["unlearned_after_sft_pattern_removed_share"] == pytest.approx(0.75)
    # No gap: no recovery share is reported (it would divide by zero or flip sign).
    flat = check_predictions({"docs_only": arm(0.5, 0.4, 0.2), "synthetic": arm(0.55, 0.4, 0.1),
                              "unlearned": arm(0.5, 0.4, 0.1)})
    assert "unlearned_recovered_share" not in flat and "unlearned_pattern_removed_share" not in flat
    assert not flat["synthetic_worse_by_10_points"] and not flat["synthetic_shows_pattern_by_10_points"]


def test_paired_contrasts_add_the_prompt_sampling_error_when_every_seed_has_hits():
    from synthunlearn.evaluation.report import paired_table
    from synthunlearn.evaluation.statistics import prompt_sampling_se
    from synthunlearn.experiment.pipeline import paired_contrasts

    hits = {"docs_only": {0: [1, 1, 0, 1], 1: [1, 0, 0, 1]}, "synthetic": {0: [0, 1, 0, 0], 1: [1, 0, 0, 0]}}
    per_seed = {arm: {s: {"if_prompt_strict": sum(h) / 4, "knowledge_acc": 0.5} for s, h in runs.items()}
                for arm, runs in hits.items()}
    drop = paired_contrasts(per_seed, hits)["docs_only - synthetic"]["if_prompt_strict"]
    assert drop["mean"] == pytest.approx(0.375) and drop["n_prompts"] == 4
    assert drop["prompt_se"] == prompt_sampling_se(hits["docs_only"], hits["synthetic"])["se"]
    table = paired_table(paired_contrasts(per_seed, hits))
    assert "| docs_only - synthetic | if_prompt_strict | +0.375 ± 0.125 |" in table
    # A seed without hits (an evaluation from before they were recorded): the seed interval only.
    partial = {"docs_only": hits["docs_only"], "synthetic": {0: hits["synthetic"][0]}}
    assert "prompt_se" not in paired_contrasts(per_seed, partial)["docs_only - synthetic"]["if_prompt_strict"]
    assert "prompt_se" not in paired_contrasts(per_seed)["docs_only - synthetic"]["if_prompt_strict"]
    assert "| n/a |" in paired_table(paired_contrasts(per_seed))


def test_prompt_hits_of_an_older_evaluation_are_rescored_from_its_responses(tmp_path):
    from synthunlearn.experiment.pipeline import evaluation_prompt_hits

    eval_dir, phase_dir = tmp_path / "eval_sets", tmp_path / "seed0" / "sft" / "synthetic"
    eval_dir.mkdir()
    phase_dir.mkdir(parents=True)
    records = [{"id": "if_eval-0", "constraints": [{"type": "lowercase"}]},
               {"id": "if_eval-1", "constraints": [{"type": "quoted"}, {"type": "no_commas"}]}]
    (eval_dir / "if_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    generations = [{"id": "if_eval-1", "set": "if_eval", "response": '"a, b"'},
                   {"id": "if_eval-0", "set": "if_eval", "response": "all lower"},
                   {"id": "bq-0", "set": "bare_questions", "response": "x"}]
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {}}, "generations": generations}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) == [1, 0]   # eval set order, strict
    # Recorded hits are taken as they are; a prompt without a response gives none.
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {"prompt_strict_hits": [0, 1]}}}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) == [0, 1]
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {}}, "generations": generations[1:]}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) is None


def test_world_written_by_older_code_is_rewritten(prepared):
    out, world_dir, _ = prepared
    cfg = load_experiment_config(None, [f"output_dir={out}", SMALL_WORLD, SMALL_MODEL])
    messages = []
    assert prepare_world(cfg, out, messages.append) == world_dir and not messages   # current: reused
    stamp = world_dir / "pipeline_world.json"
    current = stamp.read_text()
    try:
        (world_dir / "bare_questions.jsonl").unlink()    # an older world had no such file
        from synthunlearn.experiment.world import WORLD_FORMAT_VERSION

        old = current.replace(f'"format_version": {WORLD_FORMAT_VERSION}', f'"format_version": {WORLD_FORMAT_VERSION - 1}')
        assert old != current
        stamp.write_text(old)
        prepare_world(cfg, out, messages.append)
        assert messages and (world_dir / "bare_questions.jsonl").is_file()
    finally:
        assert stamp.read_text() == current


def _shipped_experiment_configs() -> list:
    """Every experiment config in configs/experiment (the files with phases or extending another;
    the others are the phases' run configs), so a new one is checked without being listed here."""
    import yaml
    from synthunlearn.experiment.pipeline import REPO
    return sorted(p.name for p in (REPO / "configs" / "experiment").glob("*.yaml")
                  if {"phases", "extends"} & set(yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("name", _shipped_experiment_configs())
def test_shipped_experiment_configs_are_valid_run_configs(name):
    """Every phase's run config with the experiment's overrides passes the launchers' own
    validation, and the number of ranks divides every global batch (a typo or a bad size would
    otherwise surface hours into a GPU run)."""
    from synthunlearn.config import load_config
    from synthunlearn.experiment.pipeline import REPO, _overrides, phase_spec

    cfg = load_experiment_config(REPO / "configs" / "experiment" / name, [])
    for phase_name in cfg["phases"]:
        spec = phase_spec(cfg, phase_name)
        run = load_config(REPO / spec["config"], _overrides(spec["overrides"]))
        for set_name in ("sft", "forget", "replay", "kl"):
            src = getattr(run.data, set_name)
            if src.path or set_name == "kl" and run.objective.kl_weight:
                batch = src.global_batch_size
                assert batch % cfg["nprocs"] == 0, (phase_name, set_name, batch, cfg["nprocs"])


@pytest.mark.parametrize("launcher", ["python", "deepspeed"])
def test_launcher_command_does_not_depend_on_how_the_interpreter_was_found(prepared, tmp_path, monkeypatch,
                                                                           launcher):
    """`PATH=.venv/bin:$PATH python launch/experiment.py` gives a relative sys.executable; the
    command (which the reuse stamp compares) must equal the one from the absolute path, or every
    finished phase reruns with --overwrite."""
    cfg, data, model_dir = _data(prepared, tmp_path, f"launcher={launcher}")
    phase = plan_phases(cfg, tmp_path, model_dir, data)[0]
    absolute = os.path.abspath(sys.executable)
    monkeypatch.setattr(sys, "executable", absolute)
    expected = launcher_command(cfg, phase)
    monkeypatch.chdir(os.path.dirname(absolute))
    monkeypatch.setattr(sys, "executable", os.path.join(".", os.path.basename(absolute)))
    command = launcher_command(cfg, phase)
    assert command == expected
    assert os.path.isabs(command[0]) or command[0] == "deepspeed"
    if launcher == "python":
        assert command[0] == absolute  # not resolved: a venv's python is a symlink


def test_concurrent_phases_never_get_the_same_rendezvous_port(monkeypatch):
    # The kernel may offer a port again once the probing socket is closed, before the launcher
    # that was given it binds it: the pipeline must not hand it to a second phase.
    from synthunlearn.experiment import pipeline

    offered = iter([41001, 41001, 41001, 41002])

    class Probe:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(pipeline.socket, "socket", Probe)
    monkeypatch.setattr(pipeline, "_PORTS_HANDED_OUT", set())
    assert [pipeline._free_port(), pipeline._free_port()] == [41001, 41002]
