"""timm's own test suite (tests/test_models.py) from the sdist of the installed timm version.

Downloaded once with pip from the package registry into a cache folder; the project's tests run
its checks on every registered srn model.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import timm


def timm_test_models() -> ModuleType:
    version = timm.__version__
    cache = Path(os.environ.get('TIMM_SRN_CACHE', Path.home() / '.cache' / 'timm-srn')) / f'timm-{version}'
    path = cache / f'timm-{version}' / 'tests' / 'test_models.py'
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-q',
             f'timm=={version}', '-d', str(cache)], check=True)
        with tarfile.open(cache / f'timm-{version}.tar.gz') as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
            archive.extractall(cache, members=members, filter='data')
    spec = importlib.util.spec_from_file_location('timm_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
