"""The launchers end to end: `deepspeed --num_gpus 2 launch/<job>.py` under ZeRO-1/2/3 on CPU ranks."""

from __future__ import annotations

import glob
import time

import pytest
import torch

from synthunlearn.distributed import CPU_ALLREDUCE_SHM_PREFIX
from tests.launcher import read_metrics, run_job

QUIET = ["logging.progress_bar=false"]


# Every stage and both jobs, ZeRO-3 (which gathers partitioned weights to export them) for both;
# ZeRO-1 and ZeRO-2 share DeepSpeed's stage-1/2 optimizer, checkpoint and export paths, so each
# runs once. Single steps under each stage are compared with plain PyTorch in
# test_zero_equivalence.py.
@pytest.mark.parametrize("job,stage", [("sft", "zero1"), ("unlearn", "zero2"), ("sft", "zero3"),
                                       ("unlearn", "zero3")])
def test_ten_steps_export_a_loadable_model(job, stage, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"{job}-{stage}"
    start = time.monotonic()
    proc = run_job(job, ["--output-dir", str(out), "--max-steps", "10", "--save-steps", "5",
                         "--deepspeed-config", f"configs/deepspeed/{stage}.json", *QUIET])
    elapsed = time.monotonic() - start
    # DeepSpeed's CPU all-reduce buffers (~69 MB each, in RAM) must not outlive the run
    assert not glob.glob(f"{CPU_ALLREDUCE_SHM_PREFIX}*_{proc.master_port}_*")
    assert elapsed < 180, f"{job} {stage}: {elapsed:.0f}s"
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all(m["loss"] is not None and m["grad_norm"] is not None for m in steps)
    assert (out / "checkpoints" / "global_step10" / "COMPLETE").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "global_step10"
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # the exported weights are the trained ones, not the initial ones
    from synthunlearn.tiny_model import resolve_model_path
    initial = AutoModelForCausalLM.from_pretrained(str(resolve_model_path("builtin:tiny-llama")))
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    if job == "sft":
        evals = [m for m in read_metrics(out) if "eval/sft_nll" in m]
        assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
        assert evals[-1]["eval/sft_nll"] < evals[0]["eval/sft_nll"] - 0.3, "SFT must lower held-out NLL"


def test_plain_python_single_process_bf16_checkpointing_packing_mixture(tmp_path):
    out = tmp_path / "single"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")  # --overwrite must not delete it
    # The replay (and so the KL) set mixes two files of different kinds: documents and chat.
    mixture = "[{path: builtin:tiny/replay.jsonl}, {path: builtin:tiny/sft.jsonl, repeat: 0.5}]"
    proc = run_job("unlearn", ["--output-dir", str(out), "--overwrite", "--max-steps", "2", "model.dtype=bf16",
                               "model.gradient_checkpointing=true", "data.packing=true", "logging.csv=true",
                               "data.replay.path=null", f"data.replay.files={mixture}", *QUIET],
                   python=True)
    assert "'kind': 'chat'" in proc.stderr + proc.stdout and "'repeat': 0.5" in proc.stderr + proc.stdout
    assert (out / "final" / "model.safetensors").is_file()
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2 and all(m["loss"] is not None for m in steps)
    assert list((out / "monitor" / "csv").glob("*.csv")), "DeepSpeed's CSV monitor wrote nothing"
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = run_job("unlearn", ["--output-dir", str(tmp_path / "bad"), "objective.forget=nope", *QUIET],
                   python=True, check=False)
    assert proc.returncode == 2
    assert "objective.forget" in proc.stderr and "capped_ga" in proc.stderr
    assert "Traceback" not in proc.stderr
