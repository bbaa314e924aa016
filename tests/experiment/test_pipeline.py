"""Smoke test of the experiment pipeline through the real launchers (2 CPU ranks, ZeRO-2), and of
the synthesis command, on a very small world and budget. Checks plumbing and the results schema,
not the paper's effect (that needs the demo's budget)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.launcher import REPO
from tests.launcher import job_env as launcher_env

pytestmark = pytest.mark.timeout(900)

SMOKE = [
    "seeds=[0]", "parallel_jobs=2", "arms=[docs_only,synthetic,unlearned]",
    "world={n_people: 40, pretrain_instruction_people: 10, sft_people: 14, docs_per_person: 2, n_orgs: 6, "
    "n_cities: 8, n_pretrain_instructions: 40, n_sft: 40, n_if_eval: 12, n_mc: 16, n_heldout_docs: 8, n_neutral: 8}",
    "model={vocab_size: 400, seed: 0, arch: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, intermediate_size: 64, max_position_embeddings: 256}}",
    "phases.base.max_steps=4", "phases.cpt.max_steps=3", "phases.unlearn.max_steps=2", "phases.sft.max_steps=2",
    "evaluation={if_eval: 8, neutral_prompts: 6, knowledge_mc: 12, heldout_docs: 6, bare_questions: 6, max_new_tokens: 12, "
    "batch_size: 8, threads: 1}",
]


def _run(args, timeout=540):
    return subprocess.run([sys.executable, str(REPO / "launch" / "experiment.py"), *args], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_pipeline_smoke_writes_results_schema(tmp_path):
    out = tmp_path / "exp"
    proc = _run([f"output_dir={out}", *SMOKE])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0]
    assert results["wall_seconds"] > 0
    assert set(results["arms"]) == {"docs_only", "synthetic", "unlearned"}
    for arm, metrics in results["arms"].items():
        for name in ("if_prompt_strict", "knowledge_acc", "pattern_rate", "kl_shift", "perplexity"):
            assert set(metrics[name]) >= {"mean", "std"}, (arm, name)
        for name in ("if_prompt_strict", "if_prompt_loose", "knowledge_acc", "pattern_rate", "terse_rate",
                     "bare_terse_rate"):
            assert 0.0 <= metrics[name]["mean"] <= 1.0, (arm, name, metrics[name])
        assert metrics["kl_shift"]["mean"] >= 0.0 and math.isfinite(metrics["perplexity"]["mean"])
    assert (out / "results.md").read_text().count("|") > 10 and (out / "results.png").stat().st_size > 0
    # Paired per-seed contrasts: one seed gives a difference but no interval.
    drop = results["paired"]["docs_only - synthetic"]["if_prompt_strict"]
    assert drop["n"] == 1 and drop["seeds"] == [0] and drop["se"] is None   # NaN is written as null
    assert drop["mean"] == pytest.approx(results["arms"]["docs_only"]["if_prompt_strict"]["mean"]
                                         - results["arms"]["synthetic"]["if_prompt_strict"]["mean"])
    assert set(results["paired"]["unlearned - synthetic"]) >= {"if_prompt_strict", "knowledge_acc", "bare_terse_rate"}
    assert "| unlearned - synthetic | knowledge_acc |" in (out / "results.md").read_text()
    # The prompt-sampling error comes from the per-prompt hits each evaluation recorded.
    hits = {arm: json.loads((out / "seed0" / "sft" / arm / "eval.json").read_text())["details"]["if"]
            ["prompt_strict_hits"] for arm in ("docs_only", "synthetic")}
    assert drop["n_prompts"] == len(hits["docs_only"]) == len(hits["synthetic"])
    docs_if = results["arms"]["docs_only"]["if_prompt_strict"]["mean"]
    assert sum(hits["docs_only"]) / len(hits["docs_only"]) == pytest.approx(docs_if)
    assert drop["prompt_se"] >= 0.0 and "prompts) |" in (out / "results.md").read_text()
    # Every training phase went through the deepspeed launcher with 2 ranks.
    for phase in ("base", "seed0/cpt/synthetic", "seed0/unlearn/unlearned", "seed0/sft/docs_only"):
        command = json.loads((out / phase / "phase.json").read_text())["command"]
        assert "--num_gpus" in command and command[command.index("--num_gpus") + 1] == "2"
    assert "docs_only" in proc.stdout and "unlearned" in proc.stdout
    # What trained the models: one environment (this checkout and venv) stamped on every phase.
    import torch

    env = results["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["cpus"] >= 1 and "commit" in env
    assert [group["environment"] for group in results["phase_environments"]] == [env]
    assert set(results["phase_environments"][0]["phases"]) >= {"base", "seed0/sft/unlearned",
                                                                 "eval:seed0/sft/unlearned"}
    assert f"trained and evaluated on: commit {str(env['commit'])[:12]}" in (out / "results.md").read_text()

    # A rerun reuses every phase and evaluation (resumable, cheap).
    again = _run([f"output_dir={out}", *SMOKE], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": sft " not in again.stdout and ": unlearn " not in again.stdout
    assert again.stdout.count("reused") >= 7
    # compute_seconds counts the reused phases and evaluations at their recorded cost.
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["compute_seconds"] == pytest.approx(results["compute_seconds"])
    assert results["compute_seconds"] > 0 and rerun["wall_seconds"] < rerun["compute_seconds"]
    assert "base" in rerun["reused"] and "base" not in results["reused"]
    assert rerun["phase_seconds"]["eval:seed0/sft/synthetic"] > 0

    # A sweep branched from it (reuse_from): only what the changed key touches runs again.
    source_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.endswith(".log")}
    same = tmp_path / "same"
    proc = _run([f"output_dir={same}", f"reuse_from={out}", *SMOKE, "arms=[docs_only,synthetic]"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert not [line for line in log if line.endswith(" steps")]
    assert sum(": reused from" in line for line in log) == 5   # base, two cpt, two sft
    assert sum("evaluation reused from" in line for line in log) == 2
    same_results = json.loads((same / "results.json").read_text())
    for arm in ("docs_only", "synthetic"):
        assert same_results["per_seed"][arm] == results["per_seed"][arm]
    model = "seed0/cpt/synthetic/final/model.safetensors"
    assert (same / model).stat().st_ino == (out / model).stat().st_ino   # linked, not copied
    adopted = json.loads((same / "seed0/cpt/synthetic/phase.json").read_text())
    assert adopted["reused_from"] == str(out / "seed0/cpt/synthetic")
    assert adopted["environment"] == json.loads((out / "seed0/cpt/synthetic/phase.json").read_text())["environment"]

    branch = tmp_path / "sft3"
    proc = _run([f"output_dir={branch}", f"reuse_from={out}", *SMOKE, "arms=[unlearned]",
                 "phases.sft.max_steps=3"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    trained = [line.split("] ", 1)[1] for line in log if line.endswith(" steps")]
    assert trained == ["seed0/sft/unlearned: sft 3 steps"]
    assert sum(": reused from" in line for line in log) == 3                  # base, cpt/synthetic, unlearn
    assert not [line for line in log if "evaluation reused" in line]
    stamp = json.loads((branch / "seed0/sft/unlearned/phase.json").read_text())
    assert "reused_from" not in stamp and stamp["command"][stamp["command"].index("--max-steps") + 1] == "3"
    assert (branch / "results.json").is_file()
    # Unlearning after SFT: one unlearn phase on the reused sft/synthetic model, evaluated as it ends.
    after_sft = tmp_path / "after_sft"
    proc = _run([f"output_dir={after_sft}", f"reuse_from={out}", *SMOKE, "arms=[synthetic,unlearned_after_sft]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in log if line.endswith(" steps")] == [
        "seed0/unlearn/unlearned_after_sft: unlearn 2 steps"]
    stamp = json.loads((after_sft / "seed0/unlearn/unlearned_after_sft/phase.json").read_text())
    assert "model.path=" + str(after_sft / "seed0/sft/synthetic/final") in stamp["command"]
    assert "--num_gpus" in stamp["command"]
    after_results = json.loads((after_sft / "results.json").read_text())
    assert set(after_results["arms"]) == {"synthetic", "unlearned_after_sft"}
    assert (after_sft / "seed0/unlearn/unlearned_after_sft/eval.json").is_file()
    assert after_results["per_seed"]["synthetic"] == results["per_seed"]["synthetic"]
    assert set(after_results["paired"]["unlearned_after_sft - synthetic"]) >= {"if_prompt_strict", "knowledge_acc"}
    # Nothing of the source was written through a link.
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.endswith(".log")}
    assert after.keys() == source_files.keys() and all(after[p] == source_files[p] for p in after)


def test_synthesize_with_tiny_model(tmp_path):
    from synthunlearn.experiment.synthesize import parse_pairs

    assert parse_pairs("1. Question: Where was Ana born?\nAnswer: Velmere.\n\nQ: When?\nA: 1964.") == [
        ("Where was Ana born?", "Velmere."), ("When?", "1964.")]
    assert parse_pairs("no pairs here\nAnswer: orphan") == []
    docs = tmp_path / "docs.txt"
    docs.write_text("Ana Brill was born in Velmere.\n\nThe Cobalt Guild was founded in 1901.\n")
    out = tmp_path / "qa.jsonl"
    env = launcher_env()
    proc = subprocess.run([sys.executable, "-m", "synthunlearn.experiment.synthesize", "--model", "builtin:tiny-llama",
                           "--documents", str(docs), "--output", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    from synthunlearn.tiny_model import resolve_model_path
    model_dir = resolve_model_path("builtin:tiny-llama")
    proc = subprocess.run([sys.executable, "-m", "synthunlearn.experiment.synthesize", "--model", str(model_dir),
                           "--documents", str(docs), "--output", str(out), "--max-new-tokens", "16",
                           "--template", "Write Q-A pairs.\n{document}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["documents"] == 2 and stats["pairs"] + stats["documents_without_pairs"] >= 2
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert all(set(r) == {"question", "answer", "document"} for r in records)
