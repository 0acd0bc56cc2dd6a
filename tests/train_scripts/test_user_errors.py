"""What a user trips on: each mistake stops with one line that says what to do, before any evaluation or write;
every script documents its options."""
import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_srn.losses import create_single_positive_loss

from ..scripts import SCRIPTS, load_script

ROOT = Path(__file__).resolve().parents[2]
TINY = ['--model', 'srn_test_resnet', '--img-size', '64', '--batch-size', '16', '--workers', '0', '--no-progress',
        '--max-train-images', '32', '--max-val-images', '16', '--num-viz', '0', '--epochs', '1']


def _run(script, *args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_loss_kwargs_of_the_wrong_kind_stop_before_any_evaluation(synthetic_dir, tmp_path):
    result = _run(SCRIPTS / 'train.py', '--data-dir', synthetic_dir, '--output', tmp_path, *TINY,
                  '--loss', 'spatial', '--loss-kwargs', 'momentum=high')
    line = _one_line(result)
    assert "option momentum='high': expected a number (default 0.5)" in line
    assert not (tmp_path / 'metrics.jsonl').exists()
    with pytest.raises(TypeError, match="align_crops=1: expected True or False"):
        create_single_positive_loss('spatial', 4, 3, align_crops=1)
    line = _one_line(_run(SCRIPTS / 'train.py', '--output', tmp_path, '--loss-kwargs', 'momentum', '0.5'))
    assert "argument --loss-kwargs: expected key=value, got 'momentum'" in line


@pytest.mark.parametrize('option', ['--epochs', '--batch-size'])
def test_counts_below_one_are_refused_by_the_parser(tmp_path, option):
    line = _one_line(_run(SCRIPTS / 'train.py', '--output', tmp_path, option, '0'))
    assert f'argument {option}: must be at least 1, got 0' in line


def test_a_misspelt_data_dir_is_not_filled_with_new_data(tmp_path):
    missing = tmp_path / 'synthetik'
    line = _one_line(_run(SCRIPTS / 'train.py', '--data-dir', missing, '--output', tmp_path / 'out', *TINY))
    assert f'--data-dir {missing} holds no built-in dataset' in line and '--generate-data' in line
    assert not missing.exists() and not (tmp_path / 'out' / 'metrics.jsonl').exists()


def test_corrupt_image_read_by_a_loader_worker_is_one_line(synthetic_dir, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(synthetic_dir, data)
    first_val = sorted((data / 'val').iterdir())[0]
    first_val.write_bytes(first_val.read_bytes()[:200])
    result = _run(SCRIPTS / 'train.py', '--data-dir', data, '--output', tmp_path / 'out', *TINY[:-4], '--workers', '2',
                  '--num-viz', '0', '--epochs', '1')
    line = _one_line(result)
    assert line.startswith('train.py: error: Image 0 is unreadable:') and first_val.name in line
    assert '--skip-unreadable' in line and 'Traceback' not in result.stderr


def test_resume_with_another_class_count_names_the_mismatch(synthetic_dir, tmp_path):
    csv = tmp_path / 'csv'
    shutil.copytree(synthetic_dir / 'train', csv)
    names = sorted(p.name for p in csv.iterdir())[:40]
    for split, rows in (('train', names[:32]), ('val', names[32:])):
        (csv / f'{split}.csv').write_text('image,labels\n' + ''.join(f'{n},{"ab"[i % 2]}\n' for i, n in enumerate(rows)))
    (csv / 'hflip.txt').write_text('')
    assert _run(SCRIPTS / 'train.py', '--data-dir', synthetic_dir, '--output', tmp_path / 'a', *TINY).returncode == 0
    line = _one_line(_run(SCRIPTS / 'train.py', '--dataset', 'csv', '--data-dir', csv, '--output', tmp_path / 'b',
                          *TINY, '--resume', tmp_path / 'a' / 'last.pth.tar'))
    assert 'does not fit this model: size mismatch for fc.weight: copying a param with shape (10, ' in line
    assert 'the shape in current model is (2, ' in line and 'more)' in line


def test_validate_weights_of_another_class_count(synthetic_dir, tmp_path):
    save_file(timm.create_model('srn_test_resnet', num_classes=3).state_dict(), str(tmp_path / 'w.safetensors'))
    line = _one_line(_run(SCRIPTS / 'validate.py', '--model', 'srn_test_resnet', '--weights', tmp_path / 'w.safetensors',
                          '--data-dir', synthetic_dir, '--output', tmp_path / 'v.json'))
    assert line == (f"validate.py: error: --weights {tmp_path / 'w.safetensors'} were trained for 3 classes but "
                    f"synthetic has 10: evaluate them on the data they were trained for")


def _parsers():
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import common
    from timm_srn import viz
    captured = {}

    def capture(name, main):
        original = argparse.ArgumentParser.parse_args

        def grab(parser, *args, **kwargs):
            captured[name] = parser
            raise SystemExit(0)
        argparse.ArgumentParser.parse_args = grab
        try:
            main()
        except SystemExit:
            pass
        finally:
            argparse.ArgumentParser.parse_args = original
    capture('validate', lambda: load_script('validate').main([]))
    capture('publish', lambda: load_script('publish').main([]))
    capture('viz', lambda: viz.main([]))
    captured['benchmark'] = common.benchmark_parser('doc')
    captured['train'] = load_script('train').build_parser()
    return captured


def test_every_option_of_every_script_has_help_and_one_default():
    for name, parser in _parsers().items():
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (name, undocumented)
        text = ' '.join(parser.format_help().split())
        assert text.count('(default: None)') == 0, name
    text = ' '.join(_parsers()['train'].format_help().split())
    data_dir = text[text.rindex('--data-dir DATA_DIR'):text.rindex('--generate-data ')]
    assert data_dir.count('default') == 0 and 'data/synthetic when not given' in data_dir
    publish = _parsers()['publish'].format_help()
    assert '\\' not in publish and '(default: hub_export)' in publish
    assert '(default: 64)' in _parsers()['validate'].format_help()


def test_publish_writes_every_file_with_the_same_permissions(synthetic_dir, tmp_path):
    train = load_script('train')
    train.main(['--data-dir', str(synthetic_dir), '--output', str(tmp_path / 'run'), *TINY])
    folder = load_script('publish').main(['--checkpoint', str(tmp_path / 'run' / 'last.pth.tar'), '--repo-id', 'me/x',
                                          '--out', str(tmp_path / 'hub')])
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes['model.safetensors'] == modes['README.md'] == modes['config.json'], modes
