"""The experiment's training files and phase plan, without training anything."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from synthunlearn.experiment.config import REPO, load_experiment_config
from synthunlearn.experiment.phases import launcher_command
from synthunlearn.experiment.pipeline import plan_phases, prepare_data, prepare_model, prepare_world

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
    from synthunlearn.experiment.config import DEFAULT_ARMS, UNLEARN_ARMS

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
    from synthunlearn.experiment.config import AFTER_SFT_ARMS

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
    from synthunlearn.experiment.config import AFTER_SFT_ARMS

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
    from synthunlearn.experiment.config import AFTER_SFT_ARMS

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

    from synthunlearn.experiment.phases import Phase, inputs_digest

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
    from synthunlearn.experiment import phases

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

    monkeypatch.setattr(phases.socket, "socket", Probe)
    monkeypatch.setattr(phases, "_PORTS_HANDED_OUT", set())
    assert [phases._free_port(), phases._free_port()] == [41001, 41002]
