"""Peak extra CPU memory of a call, for the memory-bound test and the benchmark.

Replays the profiler's allocation events (``profile_memory=True``; frees are negative sizes) in
time order and returns the peak of the running total: the most memory the call held at once
beyond what existed before it.

Only allocations made on the calling thread are seen.  The profiler's memory hook reads the
profiler state from thread-local storage, which ``at::parallel_for`` does not hand to its OpenMP
workers: a tensor allocated inside a parallel region on another thread (the C++ kernel's
per-thread logit tiles, for one) is invisible, so with T intra-op threads a per-thread buffer is
counted once instead of T times.  Pass ``num_threads=1`` for a complete count: on one thread
``at::parallel_for`` runs its body inline on the calling thread.  That measures the one-thread
configuration (one dW accumulator and one set of tiles in the C++ kernel); memory that scales with
the thread count is then to be accounted for separately.  The c10 CPU allocator is what is
observed; BLAS-internal scratch (MKL/OpenBLAS) is not included.
"""

from __future__ import annotations

from typing import Optional


def peak_cpu_allocated_bytes(fn, *, num_threads: Optional[int] = None) -> int:
    """Peak extra bytes allocated by ``fn()`` on the calling thread (see the module docstring).

    ``num_threads``: run ``fn`` with ``torch.set_num_threads(num_threads)`` (restored afterwards);
    1 makes the count complete."""
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)
    events = []

    def walk(nodes):
        for node in nodes:
            if node.typed[0] == _EventType.Allocation:
                events.append((node.start_time_ns, node.typed[1].alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak
