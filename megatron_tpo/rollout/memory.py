"""Peak memory a piece of code allocates, measured rather than assumed."""

from typing import Any, Callable, Tuple

import torch


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, int]:
    """``(fn(), the most bytes fn had allocated at once on device beyond what it started with)``.

    CUDA: the caching allocator's peak statistic. CPU: the allocation events the torch
    profiler records (every block allocated and freed on the CPU, in time order); for
    tests and benchmarks, not for every sync.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events, nodes = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size,
                           node.extra_fields.ptr))
    live = peak = 0
    created = set()  # a block that existed before fn and is freed inside it is not fn's
    for _, size, pointer in sorted(events):
        if size > 0:
            live += size
            created.add(pointer)
        elif pointer in created:
            live += size
            created.discard(pointer)
        peak = max(peak, live)
    return result, peak
