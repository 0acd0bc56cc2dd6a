"""Side-by-side timing: candidates run interleaved in one process, so ratios share the same machine state."""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from timm_srn.cli import HelpFormatter
from timm_srn.evaluation import AMP_DTYPES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from scripts import load_script  # noqa: E402  the training scripts imported as modules, as the tests do


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


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--batch-size', type=int, default=8, help='images per step')
    p.add_argument('--img-size', type=int, default=224, help='input size (square)')
    p.add_argument('--num-classes', type=int, default=80, help='labels C')
    p.add_argument('--steps', type=int, default=10, help='timed steps per candidate (after 3 warm-up steps)')
    p.add_argument('--amp', default=None, choices=tuple(AMP_DTYPES), help='autocast dtype (none: float32)')
    return p
