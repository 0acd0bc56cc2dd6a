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
