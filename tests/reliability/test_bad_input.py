"""Bad input: one clear ``error:`` line naming the file/line/key, exit status 2, no traceback, and
nothing written to the output directory (so the corrected command is never refused).

Most cases fail before DeepSpeed starts an engine, so they call ``synthunlearn.cli.main`` in this
process (one gloo group of one rank, created by the first case and reused); a few go through the
real launchers (plain python, and ``deepspeed --num_gpus 2``) to see the whole path: exit codes,
both ranks, stderr without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from synthunlearn.cli import main
from tests.launcher import REPO, job_env, run_job

QUIET = ["logging.progress_bar=false"]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _process_group():
    """init_distributed sets RANK/WORLD_SIZE/MASTER_* in os.environ for a plain process: restore
    them, and drop the one-rank group, so later tests that start launchers see a clean env."""
    saved = dict(os.environ)
    for key, value in job_env().items():
        if key in ("TORCH_EXTENSIONS_DIR", "SYNTHUNLEARN_CACHE", "DS_ACCELERATOR"):
            os.environ[key] = value
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tiny_dir():
    from synthunlearn.tiny_model import resolve_model_path
    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture
def run(tmp_path, capsys):
    """``run(job, *argv)`` -> (exit status, the error line, output dir). Options before overrides."""
    def _run(job, *argv):
        out = tmp_path / "out"
        opts, overrides, it = [], [], iter(argv)
        for a in it:  # options (with their values) first, as the usage line writes them
            if a == "--overwrite":
                opts.append(a)
            elif a.startswith("--"):
                opts += [a, next(it)]
            else:
                overrides.append(a)
        argv2 = ["--output-dir", str(out), "--max-steps", "1", *opts, *overrides, *QUIET]
        saved = dict(os.environ)
        try:
            rc = main(job, argv2)
        finally:
            # init_distributed puts RANK/WORLD_SIZE/MASTER_PORT of this one-rank group into the
            # environment; a launcher started later from this process must not inherit them.
            os.environ.clear()
            os.environ.update(saved)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err
        return rc, (lines[-1] if lines else err[-2000:]), out
    return _run


def bad(result, *fragments):
    """Exit 2, every fragment in the error line, nothing written."""
    rc, line, out = result
    assert rc == 2, line
    assert line.startswith("error: "), line
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    assert not out.exists(), f"a failed run wrote {sorted(p.name for p in out.iterdir())}"
    return line


def jsonl(path: Path, *records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def ds_json(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_malformed_jsonl_line_names_file_and_line(run, tmp_path):
    path = jsonl(tmp_path / "forget.jsonl", {"question": "q", "answer": "a"}, '{"question": "q", "answer": ')
    bad(run("unlearn", f"data.forget.path={path}"), "data.forget", f"{path}:2", "invalid JSON")


def test_missing_field(run, tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", {"prompt": "a", "response": "b"}, {"prompt": "c"})
    bad(run("sft", f"data.sft.path={path}"), f"{path}:2", "'response'", "missing")


def test_mistyped_field(run, tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", {"prompt": "a", "response": "b"}, {"prompt": "c", "response": 3})
    bad(run("sft", f"data.sft.path={path}"), f"{path}:2", "'response'", "number", "string")


def test_unknown_record_kind(run, tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", {"foo": "a"})
    bad(run("sft", f"data.sft.path={path}"), path, "'question'+'answer'", "'text'")


def test_jsonl_line_not_utf8_names_file_and_line(run, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    bad(run("sft", f"data.sft.path={path}"), "data.sft", f"{path}:2", "not UTF-8")


def test_json_file_holding_one_object(run, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('{\n  "prompt": "a",\n  "response": "b"\n}\n')
    bad(run("sft", f"data.sft.path={path}"), f"{path}:1", "a .json file must hold a list of records")


def test_empty_data_set(run, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    bad(run("sft", f"data.sft.path={path}"), str(path), "no records")


def test_every_record_fully_masked(run, tmp_path):
    # chats without an assistant turn: no token carries loss
    path = jsonl(tmp_path / "sft.jsonl", {"messages": [{"role": "user", "content": "hi"}]},
                 {"messages": [{"role": "system", "content": "x"}]})
    bad(run("sft", f"data.sft.path={path}"), path, "every one of 2 records was dropped")


def test_every_record_truncated_away(run, tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", {"prompt": "word " * 200, "response": "ok"})
    bad(run("sft", f"data.sft.path={path}", "data.max_length=16"), path, "dropped", "1 were truncated",
        "data.max_length")


def test_missing_data_file(run, tmp_path):
    bad(run("sft", f"data.sft.path={tmp_path / 'nope.jsonl'}"), "data.sft.path", "not found")


def test_missing_file_in_a_mixture_names_the_entry(run, tmp_path):
    docs = jsonl(tmp_path / "docs.jsonl", {"text": "A document."})
    bad(run("unlearn", "data.replay.path=null",
            f"data.replay.files=[{{path: {docs}}}, {{path: {tmp_path / 'gone.jsonl'}, repeat: 2}}]"),
        "data.replay.files[1].path", "gone.jsonl", "not found")


def test_objective_needs_a_set_without_a_file(run):
    bad(run("unlearn", "data.forget.path=null"), "data.forget.path", "needs the forget set")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def test_unknown_config_key_lists_valid_keys(run):
    bad(run("unlearn", "objective.tauu=2"), "'objective.tauu'", "valid keys under objective", "tau_mode")


def test_wrong_type_names_key_and_type(run):
    bad(run("unlearn", "objective.tau=abc"), "objective.tau", "'abc'", "float")


def test_invalid_choice_lists_choices(run):
    bad(run("unlearn", "objective.forget=nope"), "objective.forget", "'capped_ga'", "'npo'")


def test_missing_config_file(run, tmp_path):
    bad(run("sft", "--config", str(tmp_path / "nope.yaml")), "config file not found")


def test_yaml_syntax_error_names_line(run, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: builtin:tiny-llama\n data:\n  x: 1\n")
    bad(run("sft", "--config", str(path)), f"{path}:3", "invalid YAML")


def test_duplicate_yaml_key_names_file_and_line(run, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((REPO / "configs/tiny/sft.yaml").read_text() + "\ndata:\n  packing: true\n")
    first = (REPO / "configs/tiny/sft.yaml").read_text().splitlines().index("data:") + 1
    bad(run("sft", "--config", str(path)), f"{path}:", "duplicate key 'data'", f"first given at line {first}")


def test_non_finite_number_names_key(run):
    bad(run("sft", "optimisation.epochs=.inf", "optimisation.max_steps=null"), "optimisation.epochs",
        "finite number")


def test_world_size_must_divide_global_batch(run):
    # one rank here; 2 accumulation steps play the part of the world size (same check, same message)
    bad(run("sft", "data.sft.global_batch_size=7", "optimisation.gradient_accumulation_steps=2"),
        "data.sft.global_batch_size=7", "not divisible", "world_size (1)")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def test_missing_model_path(run, tmp_path):
    bad(run("sft", f"model.path={tmp_path / 'nomodel'}"), "model.path", "not found")


def test_missing_reference_path(run, tmp_path):
    bad(run("unlearn", f"reference.path={tmp_path / 'nomodel'}"), "reference.path", "not found")


def test_tokenizer_model_vocabulary_mismatch(run, tmp_path, tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])  # more ids than the model has rows
    tok.save_pretrained(str(tmp_path / "tok"))
    bad(run("sft", f"model.tokenizer_path={tmp_path / 'tok'}"), "model.tokenizer_path",
        f"{len(tok)} tokens", "rows")


def test_tokenizer_without_pad_or_eos_token(run, tmp_path, tiny_dir):
    # It used to pass load_tokenizer and fail in collate with a traceback, after the run directory
    # was written.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(str(tmp_path / "tok"))
    bad(run("sft", f"model.tokenizer_path={tmp_path / 'tok'}"), "model.tokenizer_path",
        "neither a pad token nor an EOS token")


def test_pickle_weights_are_refused(run, tmp_path, tiny_dir):
    model = tmp_path / "bin_model"
    shutil.copytree(tiny_dir, model)
    from safetensors.torch import load_file
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    bad(run("sft", f"model.path={model}"), "model.path", "pytorch_model.bin", "not safetensors", "refused")


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ---------------------------------------------------------------------------------------------

ZERO2 = '"zero_optimization": {"stage": 2}'


def test_reference_offload_needs_zero3(run):
    bad(run("unlearn", "reference.offload=true"), "reference.offload", "ZeRO-3")


def test_deepspeed_auto_value(run, tmp_path):
    path = ds_json(tmp_path, '{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, '
                             '"gradient_clipping": 1.0}')
    bad(run("sft", "--deepspeed-config", path), "zero_optimization.reduce_bucket_size", '"auto"')


def test_deepspeed_missing_gradient_clipping(run, tmp_path):
    bad(run("sft", "--deepspeed-config", ds_json(tmp_path, "{" + ZERO2 + "}")), "gradient_clipping",
        "explicitly")


def test_deepspeed_fp16(run, tmp_path):
    path = ds_json(tmp_path, "{" + ZERO2 + ', "gradient_clipping": 1.0, "fp16": {"enabled": true}}')
    bad(run("sft", "--deepspeed-config", path), "fp16.enabled", "bf16")


def test_deepspeed_conflicting_train_batch_size(run, tmp_path):
    path = ds_json(tmp_path, "{" + ZERO2 + ', "gradient_clipping": 1.0, "train_batch_size": 64}')
    bad(run("sft", "--deepspeed-config", path), "train_batch_size=64", "conflicts", "global batch=8")


def test_deepspeed_invalid_json_names_line(run, tmp_path):
    path = ds_json(tmp_path, "{\n" + ZERO2 + ',\n "gradient_clipping": 1.0,\n}\n')
    bad(run("sft", "--deepspeed-config", path), f"{path}:4", "invalid JSON")


@pytest.mark.parametrize("text,fragments", [
    ('{"zero_optimization": "yes", "gradient_clipping": 1.0}', ("zero_optimization", "JSON object")),
    ('{' + ZERO2 + ', "gradient_clipping": "big"}', ("gradient_clipping", "number")),
    ('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}, "gradient_clipping": 1.0}',
     ("offload_param", "stage 3")),
])
def test_deepspeed_wrong_types_and_stage(run, tmp_path, text, fragments):
    bad(run("sft", "--deepspeed-config", ds_json(tmp_path, text)), *fragments)


# ---------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------

def _fake_finished_run(out: Path, **config_changes) -> None:
    """A directory as a finished run with other settings leaves it (record + a complete checkpoint)."""
    from synthunlearn.config import load_config, to_dict
    from synthunlearn.training.deepspeed_config import read_deepspeed_json
    config = load_config(REPO / "configs/tiny/sft.yaml", [f"{k}={v}" for k, v in config_changes.items()])
    record = {"job": "sft", "world_size": 1, "config": to_dict(config),
              "deepspeed": read_deepspeed_json(REPO / "configs/deepspeed/zero2.json")}
    (out / "checkpoints" / "global_step1").mkdir(parents=True)
    (out / "checkpoints" / "global_step1" / "COMPLETE").write_text("1\n")
    (out / "run_config.json").write_text(json.dumps(record))


def test_output_dir_with_a_different_run_is_refused(run, tmp_path):
    out = tmp_path / "out"
    _fake_finished_run(out, **{"optimisation.lr": 0.5})
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rc, line, _ = run("sft")
    assert rc == 2 and "holds a different run" in line and "optimisation.lr" in line and "--overwrite" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # untouched
    # --overwrite gets past the check (and here fails on the next problem, bad data, writing nothing)
    rc, line, _ = run("sft", "--overwrite", "data.sft.path=builtin:nope.jsonl")
    assert rc == 2 and "unknown builtin data" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_output_dir_with_foreign_files_is_refused(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, line, _ = run("sft")
    assert rc == 2 and "not a synthunlearn run" in line
    assert (out / "notes.txt").read_text() == "mine"


def test_run_without_results_does_not_block_the_corrected_command(tmp_path):
    """A run that failed after writing its record (e.g. in DeepSpeed's set-up) left no checkpoint and
    no final/: the corrected command replaces it instead of refusing "a different run"."""
    from synthunlearn.distributed import DistEnv
    from synthunlearn.training.trainer import check_output_dir, prepare_output_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"job": "sft", "config": {"optimisation": {"lr": 0.5}}}))
    (out / "metrics.jsonl").write_text('{"step": 0, "eval/sft_nll": 9.0}\n')
    (out / "checkpoints" / ".incomplete-global_step2").mkdir(parents=True)
    new = {"job": "sft", "config": {"optimisation": {"lr": 0.1}}}
    assert check_output_dir(out, new, overwrite=False) is True
    prepare_output_dir(out, new, overwrite=False, replace=True,
                       env=DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert json.loads((out / "run_config.json").read_text()) == new
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]  # stale metrics gone
    # with a complete checkpoint the old run has something to lose: refused
    (out / "checkpoints" / "global_step2").mkdir(parents=True)
    (out / "checkpoints" / "global_step2" / "COMPLETE").write_text("2\n")
    from synthunlearn.errors import UserError
    with pytest.raises(UserError, match="holds a different run"):
        check_output_dir(out, {"job": "sft", "config": {"optimisation": {"lr": 0.2}}}, overwrite=False)


# ---------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------

def test_remote_code_is_not_executed_by_default(tmp_path, tiny_dir):
    from synthunlearn.config import ModelConfig
    from synthunlearn.modeling import load_causal_lm, load_tokenizer
    model = tmp_path / "remote"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM",
                          "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = ModelConfig(path=str(model))
    assert cfg.trust_remote_code is False
    load_tokenizer(cfg)
    load_causal_lm(str(model), "model.path", dtype="fp32", trust_remote_code=False, ds_config=None)
    assert not marker.exists(), "code shipped with the model ran without trust_remote_code"


def test_trust_remote_code_is_logged(caplog, tiny_dir):
    from synthunlearn.config import ModelConfig
    from synthunlearn.modeling import load_tokenizer
    with caplog.at_level("WARNING", logger="synthunlearn"):
        load_tokenizer(ModelConfig(path=str(tiny_dir), trust_remote_code=True))
    assert "trust_remote_code is ON" in caplog.text


def test_no_pickle_loads_or_shell_in_the_package():
    """torch.load only with weights_only=True; no pickle; nothing through a shell."""
    offenders = []
    for root in ("synthunlearn", "launch"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{path}: {m.group(0)}")
            for pattern in (r"^\s*import pickle", r"pickle\.loads?\(", r"shell\s*=\s*True", r"os\.system\(",
                            r"os\.popen\(", r"yaml\.load\(", r"allow_pickle\s*=\s*True"):
                for m in re.finditer(pattern, text, flags=re.MULTILINE):
                    offenders.append(f"{path}: {m.group(0).strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------
# Through the real launchers
# ---------------------------------------------------------------------------------------------

def _clean_failure(proc, out: Path, *fragments):
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert errors, proc.stderr[-3000:]
    for f in fragments:
        assert any(f in line for line in errors), (f, errors)
    assert not out.exists()
    return errors


def test_plain_python_exit_2_without_traceback(tmp_path):
    path = jsonl(tmp_path / "forget.jsonl", {"question": "q", "answer": "a"}, "not json")
    out = tmp_path / "out"
    proc = run_job("unlearn", ["--output-dir", str(out), f"data.forget.path={path}", *QUIET],
                   python=True, check=False, timeout=180)
    assert proc.returncode == 2
    _clean_failure(proc, out, f"{path}:2")


def test_two_ranks_bad_data_both_ranks_fail_cleanly(tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", {"prompt": "a", "response": "b"}, {"prompt": "c", "response": None})
    out = tmp_path / "out"
    proc = run_job("sft", ["--output-dir", str(out), f"data.sft.path={path}", *QUIET], nprocs=2,
                   check=False, timeout=240)
    errors = _clean_failure(proc, out, f"{path}:2", "'response'")
    assert len(errors) >= 2, errors  # one line from each rank, neither hangs in a collective

