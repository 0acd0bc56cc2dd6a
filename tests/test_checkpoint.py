"""Atomic checkpoint writes and safe loading."""
import pytest
import torch

from timm_srn.checkpoint import CheckpointError, load_checkpoint_file, save_atomic


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError('simulated crash while writing')


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / 'last.pth.tar'
    save_atomic({'epoch': 1, 'w': torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match='simulated crash'):
        save_atomic({'epoch': 2, 'bad': _Unpicklable()}, path)
    assert load_checkpoint_file(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']  # no temporary file left behind


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'obj': _Harmless()}, path)
    with pytest.raises(Exception, match='holds objects other than tensors.*it needs tests.test_checkpoint._Harmless'):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        load_checkpoint_file(tmp_path / 'missing.pth')


class _Harmless:
    pass
