"""The benchmark scripts run as a user runs them (`python benchmarks/NAME.py ...`), on tiny sizes: each prints the
side-by-side ratio it exists for, as a finite positive number. Timings are not checked, only that they are made."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='2')
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ratio(output: str, pattern: str) -> float:
    found = re.search(pattern, output, re.M)
    assert found, output
    value = float(found.group(1))
    assert math.isfinite(value) and value > 0, output
    return value


def test_data_throughput_prints_the_loaders_ratio():
    out = _run('data_throughput.py', '--images', '64', '--img-size', '64', '--workers', '0', '--rounds', '1')
    assert '64 images, 64 px' in out
    _ratio(out, r'ratio train.py / timm: ([\d.]+)')


@pytest.mark.slow
def test_loss_overhead_prints_counts_ratios_and_buffer_sizes():
    out = _run('loss_overhead.py', '--img-size', '64', '--batch-size', '2', '--steps', '1', '--num-samples', '100',
               '--num-classes', '10')
    counts = re.search(r'^spatial\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$', out, re.M)  # forward, kernels, backward, syncs
    assert counts and int(counts.group(2)) > 0 and counts.group(4) == '0', out
    _ratio(out, r'ratio ([\d.]+) \(target <= 1.02\)')
    _ratio(out, r'of the same bytes: ratio ([\d.]+)')
    assert re.search(r'^ImageNet-1K train\s+[\d.]+ GiB', out, re.M), out


@pytest.mark.slow
def test_srn_overhead_prints_train_inference_and_flop_ratios():
    out = _run('srn_overhead.py', '--img-size', '64', '--batch-size', '2', '--steps', '1', '--num-classes', '10')
    for label in ('train step s', 'inference s', 'GFLOPs/img'):
        _ratio(out, rf'^{label}\s+[\d.]+\s+[\d.]+\s+([\d.]+)')
    assert _ratio(out, r'^GFLOPs/img\s+[\d.]+\s+[\d.]+\s+([\d.]+)') > 1, out  # SRN's head adds work
