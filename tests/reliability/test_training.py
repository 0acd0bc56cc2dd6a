"""train.py and validate.py under faults: kills between writes, bad files and folders, divergence, a stalled rank.
Every mistake ends with one `error:` line and exit status 2; nothing saved before is damaged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_srn.checkpoint import load_checkpoint_file

from ..scripts import SCRIPTS

ROOT = Path(__file__).resolve().parents[2]
TINY = ['--model', 'srn_test_resnet', '--img-size', '64', '--batch-size', '16', '--workers', '0', '--no-progress',
        '--max-train-images', '96', '--max-val-images', '32', '--num-viz', '0', '--lr', '3e-3']


def _args(data_dir, output, *extra):
    return ['--data-dir', str(data_dir), '--output', str(output), *TINY, *extra]


@pytest.fixture
def csv_dir(tmp_path):
    """A small CSV dataset: 24 train / 8 val images, three labels, none changed by a horizontal flip."""
    root = tmp_path / 'csv'
    root.mkdir()
    (root / 'hflip.txt').write_text('')
    rng = np.random.RandomState(0)
    for split, count in (('train', 24), ('val', 8)):
        rows = []
        for i in range(count):
            name = f'{split}_{i}.png'
            Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name)
            rows.append(f"{name},{['a', 'b', 'c'][i % 3]}\n")
        (root / f'{split}.csv').write_text('image,labels\n' + ''.join(rows))
    return root


def _one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as stopped:
        run()
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]
    assert len(errors) == 1, errors
    return errors[0]


class _Killed(BaseException):
    """Stands in for kill -9 at a chosen write."""


def test_kill_between_writes_loses_neither_best_nor_metrics(synthetic_dir, tmp_path, train_script, monkeypatch):
    output = tmp_path / 'run'
    write = train_script.write_checkpoint

    def killed_at_second_last(state, path):
        if path.name == 'last.pth.tar' and state['epoch'] == 1:
            raise _Killed()  # epoch 1: metrics appended and best written, last.pth.tar still says epoch 0
        write(state, path)

    monkeypatch.setattr(train_script, 'write_checkpoint', killed_at_second_last)
    with pytest.raises(_Killed):
        train_script.main(_args(synthetic_dir, output, '--epochs', '2'))
    monkeypatch.setattr(train_script, 'write_checkpoint', write)
    assert load_checkpoint_file(output / 'last.pth.tar')['epoch'] == 0
    (output / '.last.pth.tar.killed.tmp').write_bytes(b'partial')  # what a kill -9 inside torch.save leaves
    train_script.main(_args(synthetic_dir, output, '--epochs', '2', '--resume', str(output / 'last.pth.tar')))
    records = [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [-1, 0, 1]  # epoch 1 once, though it was logged before the kill
    best = load_checkpoint_file(output / 'best.pth.tar')
    assert best['best_metric'] == max(r['eval']['mAP'] for r in records[1:])
    assert load_checkpoint_file(output / 'last.pth.tar')['best_metric'] == best['best_metric']
    assert not list(output.glob('.*.tmp'))


def test_bad_inputs_stop_before_training_with_one_line(synthetic_dir, csv_dir, tmp_path, train_script, capsys):
    truncated = tmp_path / 'truncated.pth.tar'
    train_script.main(_args(synthetic_dir, tmp_path / 'ok', '--epochs', '1'))
    data = (tmp_path / 'ok' / 'last.pth.tar').read_bytes()
    truncated.write_bytes(data[:len(data) // 3])
    line = _one_error_line(capsys, lambda: train_script.main(
        _args(synthetic_dir, tmp_path / 'r', '--resume', str(truncated))))
    assert '--resume: ' in line and 'truncated.pth.tar' in line and ('corrupt' in line or 'truncated' in line)

    (tmp_path / 'a_file').write_text('x')
    for bad_output in (tmp_path / 'a_file', Path('/proc/timm_srn_output')):
        line = _one_error_line(capsys, lambda: train_script.main(_args(synthetic_dir, bad_output)))
        assert f'output folder {bad_output} is not usable' in line

    output = tmp_path / 'kwargs'
    line = _one_error_line(capsys, lambda: train_script.main(
        _args(synthetic_dir, output, '--loss', 'spatial', '--loss-kwargs', 'bogus=1')))
    assert "--loss-kwargs {'bogus': 1} do not fit loss 'spatial'" in line and 'bogus' in line
    assert not (output / 'metrics.jsonl').exists()  # stopped before the first evaluation pass

    (csv_dir / 'val.csv').write_text('image,labels\n')
    line = _one_error_line(capsys, lambda: train_script.main(
        ['--dataset', 'csv', *_args(csv_dir, tmp_path / 'empty')]))
    assert 'dataset csv: the val split has no images' in line


def test_unreadable_images_found_up_front_or_skipped(csv_dir, tmp_path, train_script, capsys):
    data = (csv_dir / 'train_5.png').read_bytes()
    (csv_dir / 'train_5.png').write_bytes(data[:len(data) // 2])
    line = _one_error_line(capsys, lambda: train_script.main(
        ['--dataset', 'csv', *_args(csv_dir, tmp_path / 'check', '--check-images')]))
    assert 'dataset csv train: 1 unreadable images: ' in line and 'train_5.png' in line
    result = train_script.main(['--dataset', 'csv', *_args(csv_dir, tmp_path / 'skip', '--skip-unreadable',
                                                           '--epochs', '1', '--batch-size', '8')])
    assert not result['stopped'] and result['history'][-1]['epoch'] == 0


def test_state_of_another_run_is_named(synthetic_dir, tmp_path, train_script, capsys):
    output = tmp_path / 'sp'
    extra = ('--loss', 'spatial', '--epochs', '1')
    train_script.main(_args(synthetic_dir, output, *extra))
    files = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    # a new run into the folder is refused before it writes anything: the first run's outputs stay intact
    line = _one_error_line(capsys, lambda: train_script.main(_args(synthetic_dir, output, *extra)))
    assert f'output folder {output} holds another run (metrics.jsonl, last.pth.tar' in line
    assert f'--resume {output / "last.pth.tar"}' in line
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == files
    # resuming it with other data: its observed labels do not belong to these images
    line = _one_error_line(capsys, lambda: train_script.main(
        _args(synthetic_dir, output, *extra, '--max-train-images', '80', '--resume', str(output / 'last.pth.tar'))))
    assert 'observed_labels.npy' in line and 'Use another output folder' in line
    # a checkpoint whose criterion buffers were sized for another training set
    line = _one_error_line(capsys, lambda: train_script.main(
        _args(synthetic_dir, tmp_path / 'other', *extra, '--max-train-images', '80',
              '--resume', str(output / 'last.pth.tar'))))
    assert 'criterion state' in line and 'another training set size or class count' in line


def test_divergence_and_full_disk_stop_with_one_line(synthetic_dir, tmp_path, train_script, capsys, monkeypatch):
    monkeypatch.setattr(train_script, 'build_criterion', lambda *args: lambda output, target: output.sum() * float('nan'))
    line = _one_error_line(capsys, lambda: train_script.main(_args(synthetic_dir, tmp_path / 'nan', '--epochs', '1')))
    assert 'loss is nan at epoch 0, batch 0: training diverged' in line
    monkeypatch.undo()

    def disk_full(state, path):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(train_script, 'save_atomic', disk_full)
    line = _one_error_line(capsys, lambda: train_script.main(_args(synthetic_dir, tmp_path / 'full', '--epochs', '1')))
    assert 'cannot write checkpoint' in line and 'No space left on device' in line


def test_validate_refuses_a_damaged_checkpoint_with_one_line(tmp_path):
    path = tmp_path / 'bad.pth.tar'
    path.write_bytes(b'PK\x03\x04 not really a zip')
    result = subprocess.run([sys.executable, str(SCRIPTS / 'validate.py'), '--checkpoint', str(path)],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'validate.py: error: ' in lines[0] and 'bad.pth.tar' in lines[0], result.stderr


def test_a_stalled_rank_fails_the_other_after_the_timeout(synthetic_dir, tmp_path):
    """Two gloo processes; rank 1 stalls before its first training step. Rank 0 stops with one line after
    --dist-timeout instead of waiting forever."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
               MASTER_PORT='29631', PYTHONPATH=str(ROOT))
    args = _args(synthetic_dir, tmp_path, '--epochs', '1', '--dist-timeout', '5')
    ranks = [subprocess.Popen([sys.executable, '-m', 'tests.reliability.stalled_rank', *args], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, stderr = ranks[0].communicate(timeout=240)
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and 'rank 0: a collective failed or timed out (--dist-timeout 5 s)' in errors[0]
