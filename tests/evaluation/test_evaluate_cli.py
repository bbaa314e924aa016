"""launch/evaluate.py end to end on tiny models and a small world."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _main(args, capsys):
    """In process (transformers already imported): the fast path for the other cases."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run(args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py")] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def test_evaluate_end_to_end(tiny, world_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = _run(["--model", str(tiny["model_b"]), "--eval-dir", str(world_dir), "--baseline", str(tiny["model_a"]),
                 "--output", str(out), "--max-new-tokens", "8", "--limit", "6", "--kl-backend", "torch",
                 "--plot", str(tmp_path / "plot.png")])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    for key in ("if_prompt_strict", "if_prompt_loose", "if_instruction_strict", "if_instruction_loose",
                "pattern_rate", "terse_rate", "bare_terse_rate", "knowledge_acc", "knowledge_acc_norm", "token_jsd"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["kl_shift"] > 0 and metrics["perplexity"] > 1
    assert results["details"]["if"]["n_prompts"] == 6 and results["details"]["knowledge"]["n"] == 6
    assert len([g for g in results["generations"] if g["set"] == "if_eval"]) == 6
    assert len([g for g in results["generations"] if g["set"] == "bare_questions"]) == 6
    assert "| if_prompt_strict |" in proc.stdout and (tmp_path / "plot.png").exists()
    assert results["device"] == "cpu" and results["dtype"] == "float32"
    assert results["environment"]["packages"]["torch"] and "commit" in results["environment"]


def test_evaluate_chat_template_model_without_baseline(tiny, world_dir, tmp_path, capsys):
    out = tmp_path / "chat.json"
    code, _, err = _main(["--model", str(tiny["model_chat"]), "--eval-dir", str(world_dir), "--output", str(out),
                          "--max-new-tokens", "4", "--limit", "3"], capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert "kl_shift" not in metrics and 0.0 <= metrics["if_prompt_strict"] <= 1.0
    assert "if_prompt_strict_heldout_phrasing" not in metrics
    # --limit shortens the evaluation sets, not the reference distribution of token_jsd: that
    # is every SFT answer, however few prompts are evaluated.
    from synthunlearn.evaluation.pattern import token_frequency_jsd
    from synthunlearn.evaluation.suite import read_jsonl
    references = [m["content"] for r in read_jsonl(world_dir / "sft.jsonl") for m in r["messages"]
                  if m["role"] == "assistant"]
    assert len(references) > 3
    responses = [g["response"] for g in results["generations"] if g["set"] == "if_eval"]
    assert len(responses) == 3
    assert metrics["token_jsd"] == token_frequency_jsd(responses, references)


def test_heldout_phrasing_metric(tiny, tmp_path, capsys):
    # A world whose IF prompts are half in wordings no training set uses: the suite reports the
    # strict accuracy on those prompts as its own metric (absent when there are none: above).
    from synthunlearn.experiment.world import WorldConfig, write_world

    from .conftest import SMALL_WORLD
    world = tmp_path / "world"
    write_world(WorldConfig(seed=3, **{**SMALL_WORLD, "eval_heldout_phrasing_share": 0.5}), world)
    out = tmp_path / "mixed.json"
    code, _, err = _main(["--model", str(tiny["model_chat"]), "--eval-dir", str(world), "--output", str(out),
                          "--max-new-tokens", "4", "--limit", "8"], capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    groups = results["details"]["if"]["per_group"]["phrasing"]
    assert set(groups) == {"trained", "heldout"}
    assert sum(g["count"] for g in groups.values()) == 8
    assert results["metrics"]["if_prompt_strict_heldout_phrasing"] == groups["heldout"]["prompt_strict"]


def test_evaluate_user_errors(tiny, world_dir, tmp_path, capsys):
    code, _, err = _main(["--model", str(tmp_path / "missing"), "--eval-dir", str(world_dir),
                          "--output", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "not a model directory" in err
    code, _, err = _main(["--model", str(tiny["model_a"]), "--eval-dir", str(tmp_path),
                          "--output", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "holds none of" in err
    code, _, err = _main(["--model", str(tiny["model_a"]), "--eval-dir", str(world_dir), "--baseline",
                          str(tiny["model_chat"]), "--output", str(tmp_path / "x.json"), "--limit", "1"], capsys)
    assert code == 0   # same vocabulary (the chat template differs), so the KL shift is allowed


def test_pickle_weights_are_refused_by_the_evaluation_and_synthesis_tools(tiny, world_dir, tmp_path, capsys):
    """Any model these tools are handed is loaded as the trainer loads one: safetensors only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from synthunlearn.experiment.synthesize import main as synthesize_main
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny["model_a"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert (pickled / "pytorch_model.bin").exists() and not (pickled / "model.safetensors").exists()
    code, _, err = _main(["--model", str(tiny["model_a"]), "--baseline", str(pickled), "--eval-dir",
                          str(world_dir), "--output", str(tmp_path / "r.json"), "--limit", "1"], capsys)
    assert code == 2 and "--baseline" in err and "pickle-based weights" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
    docs = tmp_path / "docs.txt"
    docs.write_text("Alan was born in Toraval.\n")
    assert synthesize_main(["--model", str(pickled), "--documents", str(docs), "--output", str(tmp_path / "qa.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "pickle-based weights" in err
    assert not (tmp_path / "qa.jsonl").exists()
