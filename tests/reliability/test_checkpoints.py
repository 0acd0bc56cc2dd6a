"""Checkpoint files: checksummed, refused with one line when damaged, written like every other output."""
import os
import stat

import pytest
import torch

from timm_srn.checkpoint import CheckpointError, load_checkpoint_file, remove_stale_temporaries, save_atomic


def _saved(tmp_path):
    path = tmp_path / 'last.pth.tar'
    save_atomic({'epoch': 3, 'state_dict': {'w': torch.arange(4096, dtype=torch.float32)}}, path)
    return path


def _find(data: bytes, needle: bytes) -> int:
    position = data.find(needle)
    assert position > 0
    return position


def test_a_flipped_byte_anywhere_in_the_tensor_data_is_detected(tmp_path):
    path = _saved(tmp_path)
    assert load_checkpoint_file(path)['epoch'] == 3
    data = bytearray(path.read_bytes())
    data[_find(data, torch.arange(4096, dtype=torch.float32)[1000:1002].numpy().tobytes())] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='is corrupt'):
        load_checkpoint_file(path)


def test_content_that_does_not_match_its_checksum_is_refused(tmp_path, monkeypatch):
    # bypass the zip CRC-32 (as a consistent rewrite would): the stored SHA-256 still catches the change
    path = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    state['epoch'] = 4
    torch.save(state, path)
    with pytest.raises(CheckpointError, match='does not match its stored SHA-256 checksum'):
        load_checkpoint_file(path)


def test_truncated_and_foreign_files_give_one_line(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert 'last.pth.tar' in str(error.value) and '\n' not in str(error.value)
    path.write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='truncated or not a PyTorch checkpoint'):
        load_checkpoint_file(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match='holds a list, not a checkpoint dictionary'):
        load_checkpoint_file(path)


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    _saved(tmp_path)
    (tmp_path / '.last.pth.tar.abc123.tmp').write_bytes(b'partial')
    (tmp_path / '.best.pth.tar.x.tmp').write_bytes(b'partial')
    (tmp_path / 'notes.tmp').write_text('not ours')
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth.tar', 'notes.tmp']
