#!/usr/bin/env python
"""Forward+backward time and peak extra memory of ``linear_logprob_kl`` implementations.

    python benchmarks/bench_linear_logprob_kl.py [--device cpu|cuda] [--quick] [--json OUT]
                                                  [--impls cpu,torch,...] [--shapes NxDxV,...]

Implementations (each skipped with a note where it cannot run):
  cpu            our C++ CPU backend (device cpu)
  chunked        our chunked pure-PyTorch fallback
  triton         our Triton backend (device cuda)
  torch          the plain composition: logits -> log_softmax -> gather, plus the KL (materialises N x V)
  torch_compile  the same composition under torch.compile, applied per token chunk inside
                 torch.utils.checkpoint so that only one chunk's logits are alive at a time
  liger_ce       Liger-Kernel fused linear cross-entropy (CE only; if installed)
  cce            Apple Cut Cross-Entropy (CE only; if installed)

Also recorded: the median process CPU time of a step (all threads), less sensitive than wall time
to other processes on a shared machine (spin-waiting threads still count).

One step = forward, loss = sum(g_logp * logp) + sum(g_kl * kl) with random upstream gradients,
backward into hidden and weight.  Time: median over --repeats steps after --warmup steps.
TFLOP/s is over the FLOP floor: 12 N D V with a reference (fwd 2+2, bwd recompute 2+2, dH 2,
dW 2), 8 N D V without (CE-only rows), whatever the implementation actually executes.

Peak extra memory: bytes allocated beyond what existed before the step (inputs, parameters and
the .grad buffers from the warm-up are excluded; the gradients the step returns are included).
  cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  cpu:  a separate profiled step (torch.profiler, profile_memory=True): every allocation and free
        through the c10 CPU allocator, from all threads, replayed in time order; the peak of the
        running sum.  Memory that bypasses c10 (MKL/oneDNN scratch, std::vector) is not seen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthunlearn import environment  # noqa: E402
from synthunlearn.ops.memory_probe import peak_cpu_allocated_bytes  # noqa: E402
from synthunlearn.ops.torch_reference import linear_logprob_kl_torch  # noqa: E402

DEFAULT_SHAPES = {"cpu": [(2048, 128, 65536)], "cuda": [(8192, 2048, 128256), (16384, 4096, 128256)]}
QUICK_SHAPES = [(64, 32, 1000)]
COMPILE_CHUNK = 512


# ----------------------------------------------------------------------------- implementations
def _ours_cpu():
    from synthunlearn.ops import cpu_backend

    cpu_backend.load_extension()  # build outside the timed region; raises if unavailable
    return lambda h, w, y, rh, rw: cpu_backend.linear_logprob_kl_cpu(h, w, y, rh, rw)


def _ours_chunked():
    from synthunlearn.ops.chunked_fallback import linear_logprob_kl_chunked

    return lambda h, w, y, rh, rw: linear_logprob_kl_chunked(h, w, y, rh, rw)


def _ours_triton():
    from synthunlearn.ops.triton_backend import linear_logprob_kl_triton

    return lambda h, w, y, rh, rw: linear_logprob_kl_triton(h, w, y, rh, rw)


def _plain_torch():
    return lambda h, w, y, rh, rw: linear_logprob_kl_torch(h, w, y, rh, rw)


def _torch_compile():
    from torch.utils.checkpoint import checkpoint

    def chunk_fn(h, w, y, rh, rw):
        logp, kl, _ = linear_logprob_kl_torch(h, w, y, rh, rw)
        return logp, (kl if kl is not None else torch.zeros_like(logp))

    compiled = torch.compile(chunk_fn, dynamic=False)
    # Fail here (not in the timed loop) when the machine cannot compile.
    probe = torch.randn(4, 8, requires_grad=True)
    compiled(probe, torch.randn(16, 8), torch.zeros(4, dtype=torch.long), None, None)[0].sum().backward()

    def run(h, w, y, rh, rw):
        outs = [checkpoint(compiled, h[i:i + COMPILE_CHUNK], w, y[i:i + COMPILE_CHUNK],
                           None if rh is None else rh[i:i + COMPILE_CHUNK], rw, use_reentrant=False)
                for i in range(0, h.shape[0], COMPILE_CHUNK)]
        logp = torch.cat([o[0] for o in outs])
        return logp, (torch.cat([o[1] for o in outs]) if rh is not None else None), None

    return run


def _liger_ce():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, y, rh, rw: (-loss(w, h, y), None, None)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, y, rh, rw: (-linear_cross_entropy(h, w, y, reduction="none"), None, None)


IMPLS = {"cpu": _ours_cpu, "chunked": _ours_chunked, "triton": _ours_triton, "torch": _plain_torch,
         "torch_compile": _torch_compile, "liger_ce": _liger_ce, "cce": _cce}
CE_ONLY = {"liger_ce", "cce"}
DEVICE_ONLY = {"cpu": "cpu", "triton": "cuda", "liger_ce": "cuda", "cce": "cuda"}


# ----------------------------------------------------------------------------- measurement
def _make_inputs(n, d, v, dtype, device, with_ref, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    ref_hidden = ref_weight = None
    if with_ref:
        ref_hidden = torch.randn(n, d, generator=g).to(device, dtype)
        ref_weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype)
    g_logp = torch.randn(n, generator=g).to(device)
    g_kl = torch.randn(n, generator=g).to(device)
    return hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl


def _step(fn, inputs):
    hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl = inputs
    hidden.grad = weight.grad = None
    logp, kl, _ = fn(hidden, weight, labels, ref_hidden, ref_weight)
    loss = (logp.float() * g_logp).sum()
    if kl is not None:
        loss = loss + (kl * g_kl).sum()
    loss.backward()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(fn, inputs, device, warmup, repeats):
    for _ in range(warmup):
        _step(fn, inputs)
    times, cpu_times = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        _step(fn, inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def _peak_extra_bytes(fn, inputs, device):
    if device == "cuda":
        torch.cuda.synchronize()
        inputs[0].grad = inputs[1].grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    inputs[0].grad = inputs[1].grad = None  # the step's own gradients count as extra memory
    return peak_cpu_allocated_bytes(lambda: _step(fn, inputs))


def bench_one(name, shape, with_ref, args):
    n, d, v = shape
    row = dict(impl=name, N=n, D=d, V=v, ref=with_ref, dtype=args.dtype)
    flops = (12 if with_ref else 8) * n * d * v
    try:
        fn = IMPLS[name]()
    except Exception as exc:  # not installed / cannot build / cannot compile
        row["note"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    inputs = _make_inputs(n, d, v, getattr(torch, args.dtype), args.device, with_ref)
    try:
        times, cpu_times = _time_steps(fn, inputs, args.device, args.warmup, args.repeats)
        peak = _peak_extra_bytes(fn, inputs, args.device)
    except Exception as exc:
        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    med = statistics.median(times)
    row.update(time_ms=med * 1e3, time_min_ms=min(times) * 1e3, time_max_ms=max(times) * 1e3,
               cpu_time_ms=statistics.median(cpu_times) * 1e3, peak_extra_mib=peak / 2 ** 20,
               tflops=flops / med / 1e12)
    return row


# ----------------------------------------------------------------------------- driver
def _machine():
    """synthunlearn.environment's record (commit, packages, CPU/GPU) plus this process's threads."""
    return dict(environment.describe(), threads=torch.get_num_threads())


def _parse_shapes(text):
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]


def _print_table(rows):
    head = f"{'impl':<14}{'N':>7}{'D':>6}{'V':>8} {'ref':<4}{'time ms':>10}{'min-max ms':>18}" \
           f"{'CPU s':>8}{'peak MiB':>11}{'TFLOP/s':>9}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "time_ms" in r:
            spread = f"{r['time_min_ms']:.0f}-{r['time_max_ms']:.0f}"
            print(f"{r['impl']:<14}{r['N']:>7}{r['D']:>6}{r['V']:>8} {str(r['ref'])[0]:<4}"
                  f"{r['time_ms']:>10.1f}{spread:>18}{r['cpu_time_ms'] / 1e3:>8.2f}"
                  f"{r['peak_extra_mib']:>11.1f}{r['tflops']:>9.3f}")
        else:
            print(f"{r['impl']:<14}{r['N']:>7}{r['D']:>6}{r['V']:>8} {str(r['ref'])[0]:<4}"
                  f"{'':>10}{'':>18}{'':>8}{'':>11}{'':>9}  {r['note']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 3 repeats (smoke run)")
    p.add_argument("--json", help="write the rows and the machine description here")
    p.add_argument("--impls", help="comma-separated subset of: " + ",".join(IMPLS))
    p.add_argument("--shapes", help="comma-separated NxDxV (default depends on the device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-ref", action="store_true", help="CE-only rows (no reference head)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    shapes = _parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick
                                                             else DEFAULT_SHAPES[args.device])
    names = args.impls.split(",") if args.impls else list(IMPLS)
    unknown = set(names) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementations {sorted(unknown)}")

    load_start = os.getloadavg()  # other processes on a shared machine inflate wall times
    rows = []
    for shape in shapes:
        for name in names:
            if DEVICE_ONLY.get(name, args.device) != args.device:
                continue
            with_ref = not args.no_ref and name not in CE_ONLY
            rows.append(bench_one(name, shape, with_ref, args))
            print(f"  done {name} {shape}", file=sys.stderr, flush=True)
    _print_table(rows)
    load_end = os.getloadavg()
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    result = dict(machine=_machine(), load_average_start=load_start, load_average_end=load_end, command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                  device=args.device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
