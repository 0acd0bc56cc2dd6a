"""Every Python block of the README runs as written (offline, CPU, in a fresh folder)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'^```python\n(.*?)^```$', README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    result = subprocess.run([sys.executable, '-c', BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f'README block {index}:\n{BLOCKS[index]}\n{result.stderr[-3000:]}'
