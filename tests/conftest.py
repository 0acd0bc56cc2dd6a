"""Shared test setup: offline Hub, deterministic CPU threads, timm_srn registered before collection."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # a Hub miss would otherwise retry for ~45 s

import pytest
import torch

import timm_srn  # noqa: F401  registers the srn models with timm

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
    """One small built-in synthetic dataset per test session."""
    from timm_srn.data import create_dataset
    root = tmp_path_factory.mktemp('synthetic')
    create_dataset('synthetic', root, 'train')
    create_dataset('synthetic', root, 'val')
    return root


@pytest.fixture(scope='session')
def train_script():
    from .scripts import load_script
    return load_script('train')


@pytest.fixture(scope='session')
def validate_script():
    from .scripts import load_script
    return load_script('validate')
