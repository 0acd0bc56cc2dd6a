"""Side-by-side timing: candidates run interleaved in one process, so ratios share the same machine state."""
import statistics
import time
from typing import Callable, Dict

import torch


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], None]], device: torch.device, warmup: int = 3, steps: int = 10) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin (A, B, A, B, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    import platform
    return f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
