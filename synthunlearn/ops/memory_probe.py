"""Peak extra CPU memory of a call, for the memory-bound test and the benchmark.

Replays the profiler's allocation events (``profile_memory=True``; frees are negative sizes, worker
threads included) in time order and returns the peak of the running total: the most memory the
call held at once beyond what existed before it.
"""

from __future__ import annotations


def peak_cpu_allocated_bytes(fn) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
