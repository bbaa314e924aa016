"""The training recipe for both jobs, top to bottom: set-up, resume, loop, export.

    train(job, args)
      1. process group, config, output directory (new run / resume / refuse)
      2. tokenizer, data sets and samplers, DeepSpeed config
      3. policy engine (PolicyWithLogProbs) and, only if an objective term needs it, a frozen
         reference engine
      4. resume from the newest complete checkpoint, if any
      5. loop: per optimizer step, draw all micro-batches, all-reduce the unit counts, then
         forward -> objective -> engine.backward / engine.step per micro-batch; log, evaluate,
         checkpoint; stop cleanly on SIGTERM/SIGUSR1 after a checkpoint
      6. export final/ as a Hugging Face model directory
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from synthunlearn.config import RunConfig, load_config, to_dict
from synthunlearn.distributed import DistEnv, all_reduce_max, all_reduce_sum, barrier, init_distributed
from synthunlearn.errors import NonFiniteError, UserError
from synthunlearn.objectives.objective import FORGET, KL, SET_IDS, Objective
from synthunlearn.training import checkpoint as ckpt
from synthunlearn.training.batches import build_sets, eval_micro_batches, next_micro_batch
from synthunlearn.training.deepspeed_config import (build_policy_config, build_reference_config,
                                                    read_deepspeed_json, zero_stage)
from synthunlearn.training.loss_module import PolicyWithLogProbs, ReferenceHidden, check_plain_head
from synthunlearn.training.metrics import MetricsWriter
from synthunlearn.training.schedule import lr_multiplier, reapply as reapply_schedule

log = logging.getLogger("synthunlearn")

# Config keys that may change between a run and its resumption (they do not change the math of
# the steps already taken).
RESUMABLE_CHANGES = ("optimisation.max_steps", "checkpointing.", "logging.")


# ---------------------------------------------------------------------------------------------
# 1. Output directory: new run, resume, or refuse
# ---------------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# What a run writes into its directory; a run that left none of its results may be replaced.
RUN_ARTEFACTS = ("run_config.json", "metrics.jsonl", "monitor", "checkpoints", "STOPPED", "final.tmp")


def _has_results(out: Path) -> bool:
    return (out / "final").exists() or ckpt.latest_complete(out / "checkpoints") is not None


def check_output_dir(out: Path, run_record: dict, *, overwrite: bool) -> bool:
    """Read-only decision, the same on every rank: True when the directory's old run is replaced.

    A different run is refused only if it has something to lose (a complete checkpoint or
    final/): a run that failed before its first checkpoint (bad data, an error found at set-up,
    a crash at step 3) must not block the corrected command.
    """
    record_file = out / "run_config.json"
    if overwrite or not out.exists() or not any(out.iterdir()):
        return False
    if not record_file.is_file():
        raise UserError(f"--output-dir {out}: holds files that are not a synthunlearn run; "
                        "choose another directory or pass --overwrite")
    try:
        previous = json.loads(record_file.read_text())
    except (OSError, ValueError):
        previous = {}  # unreadable record: compare as "different"
    old, new = _flatten(previous), _flatten(run_record)
    for key in sorted(set(old) | set(new)):
        if key.startswith("config.") and key[len("config."):].startswith(RESUMABLE_CHANGES):
            continue
        if old.get(key) != new.get(key):
            if not _has_results(out):
                log.warning("--output-dir %s: replacing an earlier run that left no checkpoint and no "
                            "final/ (%s: %r there, %r now)", out, key, old.get(key), new.get(key))
                return True
            raise UserError(f"--output-dir {out}: holds a different run ({key}: {old.get(key)!r} "
                            f"there, {new.get(key)!r} now); resume it with the same settings, "
                            "choose another directory, or pass --overwrite to start over")
    return False


def prepare_output_dir(out: Path, run_record: dict, *, overwrite: bool, replace: bool, env: DistEnv) -> None:
    """Rank 0 writes once every rank has decided (``check_output_dir``) and validated its inputs."""
    record_file = out / "run_config.json"
    barrier()
    if env.is_main:
        if overwrite or replace:
            # Only our own artefacts, never the whole directory: --output-dir . must not wipe a
            # checkout. --overwrite also drops final/; a replaced run never had one.
            for name in RUN_ARTEFACTS + (("final",) if overwrite else ()):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        tmp = record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(run_record, indent=2, sort_keys=True))
        tmp.replace(record_file)
    barrier()


# ---------------------------------------------------------------------------------------------
# 3. Engines
# ---------------------------------------------------------------------------------------------

def build_policy_engine(config: RunConfig, ds_config: dict, total_steps: int):
    import deepspeed

    from synthunlearn.modeling import load_causal_lm

    model = load_causal_lm(config.model.path, "model.path", dtype=config.model.dtype,
                           trust_remote_code=config.model.trust_remote_code, ds_config=ds_config,
                           gradient_checkpointing=config.model.gradient_checkpointing)
    check_plain_head(model, "model.path")
    policy = PolicyWithLogProbs(model, kl_direction=config.objective.kl_direction,
                                backend=config.objective.op_backend)
    o = config.optimisation

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, total_steps=total_steps, warmup_steps=o.warmup_steps, schedule=o.schedule,
            min_lr_ratio=o.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=policy, model_parameters=[p for p in policy.parameters()
                                                                            if p.requires_grad],
                                           config=ds_config, lr_scheduler=schedule)
    return engine


def build_reference_engine(config: RunConfig, policy_ds_config: dict):
    import deepspeed

    from synthunlearn.modeling import load_causal_lm

    ref_ds = build_reference_config(policy_ds_config, config)
    spec = config.reference.path or config.model.path
    key = "reference.path" if config.reference.path else "model.path"
    model = load_causal_lm(spec, key, dtype=config.model.dtype,
                           trust_remote_code=config.model.trust_remote_code, ds_config=ref_ds)
    check_plain_head(model, key)
    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=ReferenceHidden(model), config=ref_ds)
    engine.eval()
    return engine


@contextlib.contextmanager
def reference_head(ref_engine):
    """The reference's output matrix, gathered for the policy's forward *and* backward.

    It belongs to another engine, so the policy's forward would see an empty ZeRO-3 partition;
    the op also re-reads it in backward, hence one context around both. Enter it only after the
    reference's own forward (:func:`reference_forward`): that forward re-partitions every parameter
    it used when it ends, and a tied output matrix is one of them (it is the input embedding), so
    a matrix gathered before it would be empty by the time the policy's op reads it.
    """
    if ref_engine is None:
        yield None
        return
    import deepspeed

    weight = ref_engine.module.model.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight


# ---------------------------------------------------------------------------------------------
# 5. One micro-batch through the models
# ---------------------------------------------------------------------------------------------

@dataclass
class PreparedBatch:
    """A micro-batch on the device with the reference's final hidden states of the rows that need them."""

    batch: dict
    ref_rows: torch.Tensor
    ref_hidden: Optional[torch.Tensor]


def reference_forward(ref_engine, batch: dict, objective: Objective, device) -> PreparedBatch:
    batch = {k: v.to(device) for k, v in batch.items()}
    ref_set_ids = torch.tensor([SET_IDS[s] for s in objective.reference_sets()], dtype=torch.long)
    ref_rows = torch.isin(batch["row_set"], ref_set_ids.to(device))
    ref_hidden = None
    if ref_engine is not None:
        with torch.no_grad():
            pos = batch.get("position_ids")
            ref_hidden = ref_engine(batch["input_ids"][ref_rows], batch["attention_mask"][ref_rows],
                                    pos[ref_rows] if pos is not None else None)
    return PreparedBatch(batch, ref_rows, ref_hidden)


def policy_forward(engine, prepared: PreparedBatch, ref_weight):
    """The policy's per-token outputs; ``ref_weight`` comes from :func:`reference_head`."""
    batch = prepared.batch
    return engine(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["row_set"],
                  ref_rows=prepared.ref_rows, ref_hidden=prepared.ref_hidden, ref_weight=ref_weight,
                  position_ids=batch.get("position_ids"))


def resolve_total_steps(config: RunConfig, primary_len: int, primary_global_batch: int) -> int:
    o = config.optimisation
    if o.max_steps is not None:
        if o.epochs is not None:
            log.warning("optimisation.max_steps=%d and optimisation.epochs=%s are both set: max_steps "
                        "decides (set optimisation.max_steps=null to train by epochs)", o.max_steps, o.epochs)
        return o.max_steps
    return max(1, math.ceil(o.epochs * primary_len / primary_global_batch))


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out sets
# ---------------------------------------------------------------------------------------------

def evaluate(engine, ref_engine, sets, objective: Objective, config: RunConfig, env: DistEnv, pad_id: int) -> dict:
    engine.eval()
    results = {}
    with torch.no_grad():
        for name, ds in sets.items():
            if ds.eval is None:
                continue
            nll = tokens = kl = 0.0
            for batch in eval_micro_batches(ds, rank=env.rank, world_size=env.world_size,
                                            max_batches=config.logging.eval_batches, pad_token_id=pad_id):
                reference = ref_engine if name == KL else None
                prepared = reference_forward(reference, batch, objective, env.device)
                with reference_head(reference) as ref_w:
                    out = policy_forward(engine, prepared, ref_w)
                nll -= float(out.logp.sum())
                kl += float(out.kl.sum())
                tokens += out.logp.numel()
            nll, kl, tokens = all_reduce_sum([nll, kl, tokens], env.device)
            results[f"eval/{name}_nll"] = nll / max(tokens, 1)
            if name == KL:
                results["eval/kl"] = kl / max(tokens, 1)
            if name == FORGET and objective.cfg.forget == "capped_ga" and objective.cfg.tau_mode == "absolute":
                results["eval/forget_nll_over_tau"] = results[f"eval/{name}_nll"] / objective.cfg.tau
    engine.train()
    return results


# ---------------------------------------------------------------------------------------------
# Stop requests (SLURM sends SIGUSR1/SIGTERM before a time limit or preemption)
# ---------------------------------------------------------------------------------------------

class StopRequest:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (all ranks must stop together)."""
        return all_reduce_max(1.0 if self.requested else 0.0, device) > 0


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def train(job: str, args) -> None:
    # Cheap checks first: a bad config fails in seconds, before any process group exists.
    config = load_config(args.config, args.overrides)
    ds_user = read_deepspeed_json(args.deepspeed_config)
    env = init_distributed(args.local_rank)
    stop = StopRequest()  # from the start: a signal during set-up must not kill the job uncleanly
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(config.optimisation.seed)
    out = Path(args.output_dir)
    run_record = {"job": job, "world_size": env.world_size, "config": to_dict(config),
                  "deepspeed": ds_user}
    # Refuse a directory before the slow set-up, but write to it only once every input is checked
    # (prepare_output_dir below): a bad file or key leaves nothing behind.
    replace = check_output_dir(out, run_record, overwrite=args.overwrite)
    ckpt_dir = out / "checkpoints"

    # 2. tokenizer, data, DeepSpeed config
    from synthunlearn.data import check_vocab
    from synthunlearn.modeling import check_model_dir, load_tokenizer

    objective = Objective(job, config.objective)
    tokenizer = load_tokenizer(config.model)
    # Weights format and vocabulary from config.json alone, before DeepSpeed starts.
    check_vocab(tokenizer, check_model_dir(config.model.path, "model.path",
                                           trust_remote_code=config.model.trust_remote_code)[1],
                "model.tokenizer_path" if config.model.tokenizer_path else "model.path")
    if objective.needs_reference and config.reference.path:
        check_vocab(tokenizer, check_model_dir(config.reference.path, "reference.path",
                                               trust_remote_code=config.model.trust_remote_code)[1],
                    "reference.path")
    pad_id = tokenizer.pad_token_id
    accumulation = config.optimisation.gradient_accumulation_steps
    # A per-sequence forgetting loss bounds (or weighs) each Q-A pair on its own: its rows must be
    # single examples, so packing never applies to that set.
    unpacked = [FORGET] if objective.forget_active and objective.forget_unit() == "forget_seqs" else []
    if config.data.packing and unpacked:
        log.info("data.packing: the forget set stays one example per row (objective.forget=%s is per "
                 "sequence); the other sets are packed", config.objective.forget)
    sets = build_sets(objective.active_sets(), config.data, tokenizer, rank=env.rank,
                      world_size=env.world_size, accumulation=accumulation, seed=config.optimisation.seed,
                      unpacked=unpacked)
    if not sets:
        raise UserError(f"{args.config}: the objective has no active term (all weights are zero)")
    primary = next(iter(sets.values()))
    total_steps = resolve_total_steps(config, len(primary.train),
                                      primary.micro_batch_size * env.world_size * accumulation)
    ds_config = build_policy_config(ds_user, args.deepspeed_config, config,
                                    micro_batch_size=primary.micro_batch_size, world_size=env.world_size,
                                    monitor_dir=str(out / "monitor"))
    if zero_stage(ds_config) == 0:
        # Only the ZeRO optimizers discard a step with non-finite gradients.
        raise UserError(f"{args.deepspeed_config}: ZeRO stage 0 does not detect non-finite gradients; use "
                        "configs/deepspeed/zero1.json or higher")
    if objective.needs_reference:
        build_reference_config(ds_config, config)  # raises on e.g. reference.offload without ZeRO-3
    prepare_output_dir(out, run_record, overwrite=args.overwrite, replace=replace, env=env)
    if env.is_main:
        for name, ds in sets.items():
            log.info("data %s: %s", name, ds.train.stats)

    # 3. engines
    engine = build_policy_engine(config, ds_config, total_steps)
    check_vocab(tokenizer, engine.module.model.config, "model.path")
    ref_engine = build_reference_engine(config, ds_config) if objective.needs_reference else None
    zero3 = zero_stage(ds_config) == 3

    # 4. resume
    ckpt.remove_incomplete(ckpt_dir, env.is_main)
    barrier()
    step = 0
    latest = ckpt.latest_complete(ckpt_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(engine, ckpt_dir, latest[0], rank=env.rank, world_size=env.world_size)
        step = int(state["step"])
        for name, ds in sets.items():
            ds.sampler.load_state_dict(state["samplers"][name])
        torch.set_rng_state(state["torch_rng"])
        if env.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], env.device)  # dropout on the GPU draws from it
        reapply_schedule(engine.lr_scheduler)  # max_steps may have changed, and with it the schedule
        log.info("resumed from %s at step %d", latest[1], step)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=env.is_main, resume_step=step,
                            total_steps=total_steps, progress_bar=config.logging.progress_bar,
                            monitor=engine.monitor if (config.logging.tensorboard or config.logging.csv) else None)

    def trainer_state() -> dict:
        return {"step": step, "samplers": {n: d.sampler.state_dict() for n, d in sets.items()},
                "torch_rng": torch.get_rng_state(),
                # This rank's GPU generator (dropout, sampling on the device), so a resumed run on
                # GPUs draws what the uninterrupted one would have; None on the CPU.
                "cuda_rng": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None}

    def save() -> None:
        assert_finite_weights(engine, env)
        ckpt.save_checkpoint(engine, ckpt_dir, step, trainer_state(), rank=env.rank, is_main=env.is_main,
                             keep_last=config.checkpointing.keep_last)

    skipped = engine.skipped_steps
    inject_nonfinite = _fault_injection_steps()

    # 5. loop (a fresh run first measures the held-out sets once, as the baseline)
    has_eval = any(ds.eval is not None for ds in sets.values())
    if step == 0 and has_eval and config.logging.eval_steps:
        metrics.log({"step": 0, **evaluate(engine, ref_engine, sets, objective, config, env, pad_id)})
    scale = env.world_size * accumulation
    engine.train()
    while step < total_steps:
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step's update uses
        micro_batches = [next_micro_batch(sets, pad_id) for _ in range(accumulation)]
        local = [objective.unit_counts(mb["labels"][:, 1:], mb["row_set"]) for mb in micro_batches]
        keys = sorted(local[0])
        totals = all_reduce_sum([sum(c[k] for c in local) for k in keys] +
                                [float(sum(mb["attention_mask"].sum() for mb in micro_batches))], env.device)
        global_counts, tokens_seen = dict(zip(keys, totals[:-1])), totals[-1]
        sums: dict[str, float] = {}
        for mb in micro_batches:
            prepared = reference_forward(ref_engine, mb, objective, env.device)
            with reference_head(ref_engine) as ref_w:
                outputs = policy_forward(engine, prepared, ref_w)
                loss, term_sums = objective.loss(outputs, global_counts, scale)
                if step + 1 in inject_nonfinite and env.is_main:
                    loss = loss * float("nan")
                engine.backward(loss)
            engine.step()
            for k, v in term_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        step += 1
        if not engine.was_step_applied():
            skipped += 1
            log.warning("step %d: non-finite gradients; the update was not applied (%d skipped so far)",
                        step, skipped)
        record = _step_record(objective, sums, global_counts, env, engine, step, lr, tokens_seen,
                              time.perf_counter() - t0)
        record["skipped_steps"] = skipped
        if step % config.logging.log_steps == 0 or step == total_steps:
            metrics.log(record)
        else:
            metrics.advance(record)
        if not engine.was_step_applied() and config.optimisation.on_nonfinite == "stop":
            save()
            metrics.close()
            raise NonFiniteError(f"step {step}: non-finite loss or gradients (optimisation.on_nonfinite"
                                 f"=stop); the last good weights are checkpointed in {ckpt_dir / ckpt.tag_for(step)}")
        if config.logging.eval_steps and step % config.logging.eval_steps == 0 and step < total_steps:
            metrics.log({"step": step, **evaluate(engine, ref_engine, sets, objective, config, env, pad_id)})
        if config.checkpointing.save_steps and step % config.checkpointing.save_steps == 0:
            save()
        if stop.agreed(env.device):
            if not (config.checkpointing.save_steps and step % config.checkpointing.save_steps == 0):
                save()
            log.warning("stopped at step %d after a checkpoint; rerun the same command to resume", step)
            if env.is_main:  # tells launch/slurm/job.sh "exited 0 but not finished": requeue
                (out / "STOPPED").write_text(json.dumps({"step": step}) + "\n")
            metrics.close()
            return

    # 6. final evaluation and export
    if has_eval:
        metrics.log({"step": step, **evaluate(engine, ref_engine, sets, objective, config, env, pad_id)})
    if config.checkpointing.save_steps and (ckpt.latest_complete(ckpt_dir) or (0,))[0] != step:
        save()
    if config.checkpointing.export_final:
        from synthunlearn.modeling import export_hf
        assert_finite_weights(engine, env)
        export_hf(engine, tokenizer, out / "final", is_main=env.is_main, zero3=zero3)
    metrics.close()
    if env.is_main:  # a marker from an earlier, stopped run of this directory no longer applies
        (out / "STOPPED").unlink(missing_ok=True)
    log.info("done: %d steps; model in %s", step, out / "final")


def assert_finite_weights(engine, env: DistEnv) -> None:
    """Refuses to write non-finite weights (every rank checks its own partition)."""
    bad = 0.0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps the rank's partition in ds_tensor
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad = 1.0
            break
    if all_reduce_max(bad, env.device) > 0:
        raise RuntimeError("refusing to save: the model has non-finite weights (a bug: such steps "
                           "should have been discarded)")


def _fault_injection_steps() -> set[int]:
    """Steps whose loss is made NaN on rank 0, for testing the non-finite policy end to end.

    Set only by tests: SYNTHUNLEARN_TEST_NONFINITE_STEPS="3,7".
    """
    raw = os.environ.get("SYNTHUNLEARN_TEST_NONFINITE_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def _step_record(objective: Objective, sums: dict, counts: dict, env: DistEnv, engine, step: int,
                 lr: float, tokens_seen: float, seconds: float) -> dict:
    names = sorted(sums)
    totals = dict(zip(names, all_reduce_sum([sums[n] for n in names], env.device)))
    record = {"step": step}
    units = objective.stat_units()
    loss = 0.0
    for name, total in totals.items():
        count = counts.get(units.get(name, ""), 0.0)
        value = total / count if count > 0 else float("nan")
        record[name] = value
        weight = {"forget_loss": objective.cfg.forget_weight, "replay_nll": objective.cfg.replay_weight,
                  "kl": objective.cfg.kl_weight, "sft_nll": 1.0}.get(name)
        if weight is not None and count > 0:
            loss += weight * value
    record["loss"] = loss
    grad_norm = engine.get_global_grad_norm()
    record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    record["lr"] = lr
    record["tokens_per_s"] = tokens_seen / max(seconds, 1e-9)
    record["step_seconds"] = seconds
    return record
