"""One optimizer step on 2 DeepSpeed ranks equals a single-process plain PyTorch step.

The DeepSpeed side is the real launcher (``deepspeed --num_gpus 2 launch/unlearn.py``) under each
ZeRO stage, with gradient accumulation 2 and the bundled data, whose sequences differ in length,
so the ranks hold uneven numbers of valid tokens. The plain side is written independently of the
trainer: the same samples (reconstructed from the samplers' documented order), logits from the
Hugging Face forward, log_softmax, the objective's formula, torch.optim.AdamW.

Adam's first step is nearly sign(g) and would hide a wrong gradient *scale*; with eps = 1 the
update is ~lr * g / (|g| + 1), proportional to the gradient, so normalisation errors (per-rank
means instead of global ones, a missing accumulation factor) show up in the updated weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from synthunlearn.config import load_config
from synthunlearn.data import StatefulSampler, build_dataset, collate
from synthunlearn.modeling import load_tokenizer
from synthunlearn.objectives.objective import SET_IDS
from synthunlearn.tiny_model import resolve_model_path
from synthunlearn.training.batches import source_for
from tests.launcher import REPO, run_job

WORLD, ACCUM = 2, 2
OVERRIDES = [
    "optimisation.gradient_accumulation_steps=2", "optimisation.lr=0.01", "optimisation.eps=1.0",
    "optimisation.weight_decay=0.01", "optimisation.warmup_steps=0", "optimisation.schedule=constant",
    "data.forget.global_batch_size=8", "data.replay.global_batch_size=4", "data.kl.global_batch_size=4",
    "data.forget.eval_path=null", "data.replay.eval_path=null", "checkpointing.save_steps=0",
    "logging.progress_bar=false", "objective.tau=7.05", "objective.kl_weight=2.0",
]


def plain_step(config):
    """The same global batch and update, in one process, without DeepSpeed or our fused op."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(config.model)
    path = resolve_model_path(config.model.path)
    policy = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    names = ["forget", "replay", "kl"]
    datasets, samplers = {}, {}
    for name in names:
        src, key = source_for(config.data, name)
        datasets[name] = build_dataset(src, key, tok, max_length=config.data.max_length, packing=False)
        mbs = getattr(config.data, name).global_batch_size // (WORLD * ACCUM)
        samplers[name] = [StatefulSampler(len(datasets[name]), micro_batch_size=mbs, rank=r, world_size=WORLD,
                                          seed=config.optimisation.seed * 1000 + SET_IDS[name])
                          for r in range(WORLD)]
    # Every (rank, micro-step) draws each set in order; pool the rows per set.
    rows = {name: [] for name in names}
    for _ in range(ACCUM):
        for r in range(WORLD):
            for name in names:
                rows[name] += [datasets[name][i] for i in next(samplers[name][r])]

    def token_logps(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return torch.log_softmax(logits.double(), -1), batch["labels"][:, 1:]

    tau, ob = config.objective.tau, config.objective
    # forget: capped ascent per sequence, mean over all forget sequences of the step
    lp, y = token_logps(policy, collate(rows["forget"], tok.pad_token_id))
    mask = y != -100
    tok_lp = lp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask
    nll = -tok_lp.sum(1) / mask.sum(1)
    forget = -torch.minimum(nll, torch.full_like(nll, tau)).mean()
    # replay: token-mean NLL over all replay tokens of the step
    lp, y = token_logps(policy, collate(rows["replay"], tok.pad_token_id))
    mask = y != -100
    replay = -(lp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask).sum() / mask.sum()
    # KL(p_ref || p_theta) per token, mean over KL-set tokens
    batch = collate(rows["kl"], tok.pad_token_id)
    lp, y = token_logps(policy, batch)
    with torch.no_grad():
        ref_lp, _ = token_logps(reference, batch)
    mask = y != -100
    kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * mask).sum() / mask.sum()
    loss = ob.forget_weight * forget + ob.replay_weight * replay + ob.kl_weight * kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    o = config.optimisation
    opt = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    opt.step()
    return before, {k: v.detach() for k, v in policy.state_dict().items()}


@pytest.fixture(scope="module")
def expected():
    config = load_config(REPO / "configs/tiny/unlearn.yaml", OVERRIDES)
    return plain_step(config)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny model with its output matrix tied to the input embedding (Llama-3.2-1B, Qwen2.5-0.5B
    and SmolLM are built so), and the plain step on it. Under ZeRO-3 the reference's tied matrix
    is released by the reference's own forward: it must be gathered after that forward."""
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("tied")
    source = resolve_model_path("builtin:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(str(source), tie_word_embeddings=True)
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(path)
    load_tokenizer(load_config(REPO / "configs/tiny/unlearn.yaml", OVERRIDES).model).save_pretrained(path)
    overrides = [*OVERRIDES, f"model.path={path}"]
    return overrides, plain_step(load_config(REPO / "configs/tiny/unlearn.yaml", overrides))


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero3-tied"])
def test_one_step_matches_plain_pytorch(stage, expected, tied, tmp_path):
    overrides, (before, after) = (tied if stage.endswith("-tied") else (OVERRIDES, expected))
    out = tmp_path / stage
    run_job("unlearn", ["--output-dir", str(out), "--max-steps", "1",
                        "--deepspeed-config", f"configs/deepspeed/{stage.split('-')[0]}.json", *overrides])
    got = load_file(str(out / "final" / "model.safetensors"))
    if stage.endswith("-tied"):  # saved once, under the input embedding's name
        after = {k: v for k, v in after.items() if k in got}
    assert set(got) == set(after)
    num = den = 0.0
    for name, ref in after.items():
        # the updated weights themselves, as the issue asks: 1e-5 relative
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=f"{stage}: {name}")
        num += float(((got[name] - before[name]) - (ref - before[name])).double().norm() ** 2)
        den += float((ref - before[name]).double().norm() ** 2)
    # and the update itself: a normalisation error of even 1% would exceed this
    assert (num / den) ** 0.5 < 1e-3, f"{stage}: relative error of the update {(num / den) ** 0.5:.2e}"
