"""When the pipeline may reuse a finished phase, world or model, and when it must not: the reuse
stamps cover what the launchers actually run with, and a rewrite that stops half-way is never
taken for the finished one. No training: the launcher is replaced where a phase has to "run"."""

from __future__ import annotations

import json
import shutil

import pytest

from synthunlearn.errors import ConfigError
from synthunlearn.experiment import phases
from synthunlearn.experiment.config import REPO, load_experiment_config
from synthunlearn.experiment.phases import Phase, inputs_digest, launcher_command, phase_done, run_phase
from synthunlearn.experiment.pipeline import _eval_signature, plan_phases, prepare_data, prepare_model, prepare_world

SMALL_WORLD = ("world={n_people: 30, pretrain_instruction_people: 8, sft_people: 10, docs_per_person: 2, n_orgs: 5, "
               "n_cities: 6, n_pretrain_instructions: 20, n_sft: 20, n_if_eval: 6, n_mc: 8, n_heldout_docs: 4, "
               "n_neutral: 4}")
SMALL_MODEL = ("model={vocab_size: 400, seed: 0, arch: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
               "num_key_value_heads: 1, intermediate_size: 64, max_position_embeddings: 256}}")


def _finish(phase: Phase, command, inputs=None) -> None:
    """What run_phase leaves behind after a successful run."""
    (phase.out_dir / "final").mkdir(parents=True, exist_ok=True)
    (phase.out_dir / "final" / "config.json").write_text("{}")
    (phase.out_dir / "phase.json").write_text(json.dumps(
        {"command": command, "inputs": inputs_digest(phase, command) if inputs is None else inputs, "seconds": 1.0}))


@pytest.fixture
def unlearn_phase(tmp_path):
    """An unlearning phase with its own run config, data file and DeepSpeed JSON."""
    run_config = tmp_path / "unlearn.yaml"
    run_config.write_text("optimisation:\n  lr: 3.0e-4\n")
    data = tmp_path / "forget.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    zero = tmp_path / "zero2.json"
    zero.write_text((REPO / "configs/deepspeed/zero2.json").read_text())
    phase = Phase("seed0/unlearn/unlearned", "unlearn", tmp_path / "seed0/unlearn/unlearned", str(run_config), 30, 0,
                  {"data.forget.path": str(data)}, [])
    cfg = {"launcher": "deepspeed", "nprocs": 2, "deepspeed_config": str(zero)}
    return phase, cfg, run_config, zero


def test_editing_the_run_config_or_the_deepspeed_json_reruns_the_phase(unlearn_phase):
    """The command names the run config and the DeepSpeed JSON by path only: their contents are
    part of the phase's inputs, so an edit reruns the phase and undoing it reuses it again. The
    evaluation signature is built on the phase's recorded inputs, so it follows."""
    phase, cfg, run_config, zero = unlearn_phase
    command = launcher_command(cfg, phase)
    _finish(phase, command)
    assert phase_done(phase, launcher_command(cfg, phase))
    signature = _eval_signature(cfg | {"evaluation": {}, "world": {}}, phase.out_dir / "final", phase.out_dir)

    original = run_config.read_text()
    run_config.write_text("optimisation:\n  lr: 1.0e-3\n")
    assert not phase_done(phase, launcher_command(cfg, phase))
    _finish(phase, command)           # the rerun's stamp
    assert _eval_signature(cfg | {"evaluation": {}, "world": {}}, phase.out_dir / "final", phase.out_dir) != signature
    run_config.write_text(original)
    _finish(phase, command)

    # A comment or a key written out at its default resolves to the same run: nothing reruns.
    run_config.write_text("# the rate of the issue\noptimisation:\n  lr: 3.0e-4\n  weight_decay: 0.0\n")
    assert phase_done(phase, launcher_command(cfg, phase))

    settings = json.loads(zero.read_text())
    zero.write_text(json.dumps(settings, indent=4))          # reformatted only
    assert phase_done(phase, launcher_command(cfg, phase))
    zero.write_text(json.dumps({**settings, "gradient_clipping": 0.5}))
    assert not phase_done(phase, launcher_command(cfg, phase))
    zero.write_text(json.dumps(settings))
    assert phase_done(phase, launcher_command(cfg, phase))


def test_the_python_launcher_digests_the_default_deepspeed_json(unlearn_phase):
    """A single-process launch gets no --deepspeed-config and uses the launchers' default."""
    phase, cfg, _, _ = unlearn_phase
    python = {**cfg, "launcher": "python"}
    digest = inputs_digest(phase, launcher_command(python, phase))
    assert digest == inputs_digest(phase)
    default = {**cfg, "deepspeed_config": str(REPO / "configs/deepspeed/zero2.json")}
    assert digest == inputs_digest(phase, launcher_command(default, phase))


def test_named_files_are_read_from_the_checkout_and_must_exist(unlearn_phase, tmp_path, monkeypatch):
    """The launchers run with cwd=REPO: a relative path is the checkout's file wherever the
    pipeline was started, and a path that names nothing is an error, not a silent omission."""
    phase, cfg, _, _ = unlearn_phase
    relative = "synthunlearn/assets/tiny/forget.jsonl"

    def digest(path):
        return inputs_digest(Phase(phase.name, phase.job, phase.out_dir, phase.config, phase.max_steps, phase.seed,
                                   {"data.forget.path": path}, []))

    absolute = digest(str(REPO / relative))
    elsewhere = tmp_path / "cwd"
    (elsewhere / relative).parent.mkdir(parents=True)
    (elsewhere / relative).write_text('{"question": "other", "answer": "file"}\n')
    monkeypatch.chdir(elsewhere)
    assert digest(relative) == absolute
    with pytest.raises(ConfigError, match=r"seed0/unlearn/unlearned: data.forget.path: 'nowhere.jsonl' does not exist"):
        digest("nowhere.jsonl")
    # Files named by the run config itself count too, not only the phase's overrides.
    run_config = tmp_path / "with_replay.yaml"
    run_config.write_text(f"data:\n  replay:\n    path: {tmp_path / 'replay.jsonl'}\n")
    with_replay = Phase(phase.name, phase.job, phase.out_dir, str(run_config), 30, 0, phase.overrides, [])
    with pytest.raises(ConfigError, match="data.replay.path: .* does not exist"):
        inputs_digest(with_replay)
    (tmp_path / "replay.jsonl").write_text('{"text": "a"}\n')
    before = inputs_digest(with_replay)
    (tmp_path / "replay.jsonl").write_text('{"text": "b"}\n')
    assert inputs_digest(with_replay) != before


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse")
    cfg = load_experiment_config(None, [f"output_dir={out}", SMALL_WORLD, SMALL_MODEL])
    world_dir = prepare_world(cfg, out, lambda _: None)
    return out, world_dir, prepare_model(cfg, out, world_dir, lambda _: None)


def _plan(prepared, out, *overrides):
    _, world_dir, model_dir = prepared
    cfg = load_experiment_config(None, [f"output_dir={out}", SMALL_WORLD, SMALL_MODEL, "seeds=[0]", *overrides])
    phases = plan_phases(cfg, out, model_dir, prepare_data(cfg, out, world_dir, model_dir))
    for phase in phases:          # every upstream model "trained" (the digests read them)
        (phase.out_dir / "final").mkdir(parents=True, exist_ok=True)
        (phase.out_dir / "final" / "model.safetensors").write_text(phase.name)
    return cfg, {p.name: p for p in phases}


def test_editing_the_sft_run_config_reruns_exactly_the_phases_that_use_it(prepared, tmp_path):
    """The SFT phases' commands name their run config by path: an edit of its data.max_length
    changes their inputs (and the after-SFT unlearning's, which reads that length), nothing
    upstream; a second, identical experiment in another directory has the same inputs (what
    reuse_from and an unchanged rerun rely on)."""
    sft = tmp_path / "sft.yaml"
    shutil.copy(REPO / "configs/experiment/sft.yaml", sft)
    arms = ["arms=[docs_only,synthetic,unlearned_after_sft]", "data.after_sft_replay=sft", f"phases.sft.config={sft}"]

    def inputs(out):
        cfg, phases = _plan(prepared, out, *arms)
        return {name: (launcher_command(cfg, p), inputs_digest(p, launcher_command(cfg, p)))
                for name, p in phases.items()}

    before = inputs(tmp_path / "a")
    assert inputs(tmp_path / "a") == before
    branch = inputs(tmp_path / "b")
    assert {n: d for n, (_, d) in branch.items()} == {n: d for n, (_, d) in before.items()}
    text = sft.read_text()
    assert "max_length: 192" in text
    sft.write_text(text.replace("max_length: 192", "max_length: 96"))
    after = inputs(tmp_path / "a")
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == ["seed0/sft/docs_only", "seed0/sft/synthetic", "seed0/unlearn/unlearned_after_sft"]
    assert after["seed0/sft/synthetic"][0] == before["seed0/sft/synthetic"][0]   # the command alone: unchanged


def _small(*overrides):
    return load_experiment_config(None, [SMALL_WORLD, SMALL_MODEL, *overrides])


def test_an_interrupted_world_rewrite_is_not_reused(tmp_path, monkeypatch):
    """The world is rewritten in place: if that stops half-way, going back to the previous
    knobs must write it again, not trust the previous stamp over a mix of files."""
    import synthunlearn.experiment.world as world

    messages = []
    world_dir = prepare_world(_small(), tmp_path, messages.append)
    written = {p.name: p.read_bytes() for p in world_dir.glob("*.jsonl")}

    def interrupted(cfg, out_dir):
        (out_dir / "docs.jsonl").write_text('{"text": "half of another world"}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(world, "write_world", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_world(_small("world.seed=7"), tmp_path, messages.append)
    monkeypatch.undo()
    messages.clear()
    prepare_world(_small(), tmp_path, messages.append)
    assert messages == [f"world: writing {world_dir}"]
    assert {p.name: p.read_bytes() for p in world_dir.glob("*.jsonl")} == written


def test_an_interrupted_model_build_is_not_reused(prepared, tmp_path, monkeypatch):
    import synthunlearn.tiny_model as tiny_model

    out, world_dir, model_dir = prepared
    shutil.copytree(model_dir, tmp_path / "init_model")
    cfg = _small()
    messages = []
    assert prepare_model(cfg, tmp_path, world_dir, messages.append) == tmp_path / "init_model" and not messages

    def interrupted(out_dir, **kwargs):
        (out_dir / "model.safetensors").write_bytes(b"half of another model")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_model, "build_tiny_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(_small("model.seed=3"), tmp_path, world_dir, messages.append)
    monkeypatch.undo()
    messages.clear()
    prepare_model(cfg, tmp_path, world_dir, messages.append)
    assert messages == [f"model: building {tmp_path / 'init_model'}"]
    assert (tmp_path / "init_model/model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_a_phase_interrupted_while_it_reruns_is_not_reused(unlearn_phase, monkeypatch):
    """A phase that reruns under new settings and is stopped after its launcher exported the new
    final/ (before the new phase.json): going back to the old settings must not find the old
    stamp and evaluation vouching for the new model."""
    phase, cfg, _, _ = unlearn_phase
    cfg = {**cfg, "omp_threads": 1}
    old_command = launcher_command(cfg, phase)
    _finish(phase, old_command)
    (phase.out_dir / "eval.json").write_text(json.dumps({"signature": "the old model's", "metrics": {}}))
    assert phase_done(phase, old_command)

    def launcher(command, **kwargs):
        (phase.out_dir / "final" / "config.json").write_text('{"trained": "with 40 steps"}')
        raise KeyboardInterrupt

    monkeypatch.setattr(phases.environment, "describe", lambda: {})
    monkeypatch.setattr(phases.subprocess, "run", launcher)
    longer = Phase(**{**phase.__dict__, "max_steps": 40})
    with pytest.raises(KeyboardInterrupt):
        run_phase(cfg, longer, lambda _: None)
    assert not phase_done(phase, old_command)
    assert not (phase.out_dir / "eval.json").exists()
