"""The experiment file: defaults, ``extends`` chains, overrides, and errors that name the file or key
(synthunlearn/experiment/config.py)."""

from __future__ import annotations

import pytest
import yaml

from synthunlearn.errors import ConfigError
from synthunlearn.experiment.config import REPO, evaluation_device, load_experiment_config


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
    """A key added to DEFAULTS gets a type in config.py (or its section's own check): every
    scalar key and every key of data, evaluation and model (arch aside) is typed, and the
    defaults themselves pass."""
    import dataclasses

    from synthunlearn.experiment.config import (DEFAULTS, _DataTypes, _EvaluationTypes, _ModelTypes,
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


def _shipped_experiment_configs() -> list:
    """Every experiment config in configs/experiment (the files with phases or extending another;
    the others are the phases' run configs), so a new one is checked without being listed here."""
    return sorted(p.name for p in (REPO / "configs" / "experiment").glob("*.yaml")
                  if {"phases", "extends"} & set(yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("name", _shipped_experiment_configs())
def test_shipped_experiment_configs_are_valid_run_configs(name):
    """Every phase's run config with the experiment's overrides passes the launchers' own
    validation, and the number of ranks divides every global batch (a typo or a bad size would
    otherwise surface hours into a GPU run)."""
    from synthunlearn.config import load_config
    from synthunlearn.experiment.phases import override_args
    from synthunlearn.experiment.pipeline import phase_spec

    cfg = load_experiment_config(REPO / "configs" / "experiment" / name, [])
    for phase_name in cfg["phases"]:
        spec = phase_spec(cfg, phase_name)
        run = load_config(REPO / spec["config"], override_args(spec["overrides"]))
        for set_name in ("sft", "forget", "replay", "kl"):
            src = getattr(run.data, set_name)
            if src.path or set_name == "kl" and run.objective.kl_weight:
                batch = src.global_batch_size
                assert batch % cfg["nprocs"] == 0, (phase_name, set_name, batch, cfg["nprocs"])
