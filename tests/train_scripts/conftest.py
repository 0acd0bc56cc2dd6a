"""The training scripts, imported from train_scripts/, and one small synthetic dataset per test session."""
import importlib.util
from pathlib import Path

import pytest

from timm_srn.data import create_dataset

SCRIPTS = Path(__file__).resolve().parents[2] / 'train_scripts'


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'timm_srn_{name}', SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('synthetic')
    create_dataset('synthetic', root, 'train')
    create_dataset('synthetic', root, 'val')
    return root


@pytest.fixture(scope='session')
def train_script():
    return load_script('train')


@pytest.fixture(scope='session')
def validate_script():
    return load_script('validate')
