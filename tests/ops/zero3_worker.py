"""One rank of the ZeRO-3 check of ``linear_logprob_kl`` (started by ``deepspeed --num_gpus 2``).

A tiny policy (embedding -> linear+tanh -> lm_head) and a frozen reference of another width, both
ZeRO-3 engines on CPU/gloo.  The op is called inside the policy's module forward (where ZeRO-3
gathers lm_head); the reference lm_head belongs to another engine and is gathered explicitly with
GatheredParameters.  The step is run once with ``backend`` (default "cpu") and once with the
"torch" oracle from identical parameters, the full gradients are gathered with
``safe_get_full_grad`` after each backward, and rank 0 writes a JSON comparison to ``--out``.

    deepspeed --num_gpus 2 tests/ops/zero3_worker.py --out result.json [--backend cpu]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: it caches the choice

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

VOCAB, D_MODEL, D_REF, TOKENS = 97, 24, 16, 40


class TinyLM(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.proj(self.embed(ids)))


class PolicyWithLoss(nn.Module):
    """The module engine(...) calls: the op must read lm_head.weight inside this forward."""

    def __init__(self, ref_engine):
        super().__init__()
        self.lm = TinyLM(D_MODEL)
        self.__dict__["ref_engine"] = ref_engine  # not a submodule: another engine owns it

    def forward(self, ids, labels, g_logp, g_kl, backend):
        import deepspeed

        from synthunlearn.ops import linear_logprob_kl

        hidden = self.lm.hidden(ids)
        with torch.no_grad():
            ref_hidden = self.ref_engine.module.hidden(ids)
        ref_head = self.ref_engine.module.lm_head.weight
        with deepspeed.zero.GatheredParameters([ref_head]):
            out = linear_logprob_kl(hidden, self.lm.lm_head.weight, labels, ref_hidden, ref_head,
                                    kl_direction="forward", ignore_index=-100, backend=backend)
        loss = (out.logp * g_logp).sum() + (out.kl * g_kl).sum()
        return loss, out.logp.detach(), out.kl.detach(), out.ref_logp.detach()


def _ds_config(optimizer):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1e9,  # explicit (0.19.3+ defaults to 1.0): never clips here
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "wall_clock_breakdown": False,
    }
    if optimizer:
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    return cfg


def _full_grads(engine):
    from deepspeed.utils import safe_get_full_grad

    return {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)  # appended by the deepspeed launcher
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="cpu")
    args = p.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    torch.manual_seed(0)  # identical initial weights on every rank
    with deepspeed.zero.Init(config_dict_or_path=_ds_config(False)):
        ref_model = TinyLM(D_REF)
    ref_engine, *_ = deepspeed.initialize(model=ref_model, config=_ds_config(False))
    ref_engine.eval()
    with deepspeed.zero.Init(config_dict_or_path=_ds_config(True)):
        policy = PolicyWithLoss(ref_engine)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(),
                                      config=_ds_config(True))

    # Each rank its own batch, a quarter of the tokens ignored, random upstream gradients.
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[torch.rand(TOKENS, generator=g) < 0.25] = -100
    g_logp, g_kl = torch.randn(TOKENS, generator=g), torch.randn(TOKENS, generator=g)

    results = {}
    for backend in (args.backend, "torch"):
        loss, logp, kl, ref_logp = engine(ids, labels, g_logp, g_kl, backend)
        engine.backward(loss)
        results[backend] = dict(grads=_full_grads(engine), logp=logp, kl=kl, ref_logp=ref_logp)
        engine.optimizer.zero_grad()  # no step: both backends see the same parameters

    ours, oracle = results[args.backend], results["torch"]
    report = dict(rank=rank, world_size=world, backend=args.backend, grads={}, values={})
    for name, grad in oracle["grads"].items():
        diff = (ours["grads"][name] - grad).abs().max().item()
        report["grads"][name] = dict(max_abs_diff=diff, max_abs=grad.abs().max().item(),
                                     shape=list(grad.shape), nonzero=bool(grad.abs().sum() > 0))
    for key in ("logp", "kl", "ref_logp"):
        report["values"][key] = (ours[key] - oracle[key]).abs().max().item()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, report)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f, indent=2)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
