"""train.py / validate.py end to end on tiny synthetic COCO-format data (CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from timm_srn.checkpoint import load_checkpoint_file, load_model

from ..scripts import SCRIPTS, load_script

TINY = ['--model', 'srn_test_resnet', '--img-size', '96', '--batch-size', '16', '--workers', '0', '--no-progress',
        '--max-train-images', '192', '--max-val-images', '64', '--num-viz', '1', '--lr', '3e-3']


def _args(synthetic_dir, output, *extra):
    return ['--data-dir', str(synthetic_dir), '--output', str(output), *TINY, *extra]


def test_two_epochs_improve_map_and_validate_reproduces_it(synthetic_dir, tmp_path, train_script, validate_script):
    result = train_script.main(_args(synthetic_dir, tmp_path, '--epochs', '2'))
    history = result['history']
    assert history[0]['epoch'] == -1 and len(history) == 3
    assert history[-1]['eval']['mAP'] > history[0]['eval']['mAP'] + 3
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['epoch'] for l in lines] == [-1, 0, 1]
    assert (tmp_path / 'best.pth.tar').exists() and (tmp_path / 'viz_val_0.png').exists()
    table = (tmp_path / 'metrics_table.txt').read_text().splitlines()
    assert table[0].split()[:3] == ['epoch', 'stage', 'mAP'] and len(table) == 2 + 3
    assert float(table[-1].split()[2]) == pytest.approx(result['last_eval']['mAP'], abs=0.005)
    out = tmp_path / 'validate.json'
    validated = validate_script.main(['--checkpoint', str(tmp_path / 'last.pth.tar'), '--data-dir', str(synthetic_dir),
                                      '--max-images', '64', '--workers', '0', '--output', str(out)])
    assert validated['metrics'] == result['last_eval']
    srn = validate_script.main(['--checkpoint', str(tmp_path / 'last.pth.tar'), '--data-dir', str(synthetic_dir),
                                '--max-images', '64', '--workers', '0', '--output', str(tmp_path / 'srn.json'),
                                '--metrics', 'srn'])
    assert srn['metrics']['CP'] >= validated['metrics']['CP'] and srn['settings']['metrics'] == 'srn'
    assert json.loads(out.read_text())['metrics'] == result['last_eval']
    assert set(validated['metrics']) >= {'mAP', 'CP', 'CR', 'CF1', 'CF1_harmonic', 'OP', 'OR', 'OF1', 'top3_CF1', 'top3_OF1'}
    flipped = validate_script.main(['--checkpoint', str(tmp_path / 'last.pth.tar'), '--data-dir', str(synthetic_dir),
                                    '--max-images', '64', '--workers', '0', '--tta-flip', '--output', str(out)])
    assert flipped['settings']['tta_flip'] and flipped['metrics']['mAP'] != validated['metrics']['mAP']

    # publish: a dry run writes the Hub folder whose card holds the validated numbers and the training command
    publish = load_script('publish')
    folder = publish.main(['--checkpoint', str(tmp_path / 'best.pth.tar'), '--results', str(out), '--repo-id',
                           'me/srn-synthetic', '--out', str(tmp_path / 'hub'), '--dry-run'])
    card = (folder / 'README.md').read_text()
    assert f"{flipped['metrics']['mAP']:.2f}" in card and 'python train_scripts/train.py --data-dir' in card
    config = json.loads((folder / 'config.json').read_text())
    assert config['label_names'][-1] == 'ball left of dog' and config['model_args']['pretrained_backbone'] is False
    assert config['pretrained_cfg']['input_size'] == [3, 96, 96]
    assert config['pretrained_cfg']['tag'] == 'synthetic_96'  # a trained checkpoint is not tagged 'untrained'
    assert load_model(tmp_path / 'last.pth.tar').pretrained_cfg['tag'] == 'synthetic_96'
    # the exported folder loads through timm's own local-dir source and evaluates to the same numbers
    exported = validate_script.main(['--model', f'local-dir:{folder}', '--pretrained', '--data-dir', str(synthetic_dir),
                                     '--max-images', '64', '--workers', '0', '--output', str(tmp_path / 'exported.json')])
    assert exported['metrics'] == result['last_eval'] and exported['settings']['img_size'] == 96


def test_resume_after_epoch_one_matches_uninterrupted_run(synthetic_dir, tmp_path, train_script):
    extra = ['--epochs', '2', '--loss', 'spatial', '--loss-kwargs', 'warmup_epochs=0', '--num-viz', '0']
    train_script.main(_args(synthetic_dir, tmp_path / 'full', *extra))
    stopped = train_script.main(_args(synthetic_dir, tmp_path / 'split', *extra, '--stop-after-epochs', '1'))
    assert stopped['stopped']
    train_script.main(_args(synthetic_dir, tmp_path / 'split', *extra, '--resume', str(tmp_path / 'split' / 'last.pth.tar')))
    full = load_checkpoint_file(tmp_path / 'full' / 'last.pth.tar')
    split = load_checkpoint_file(tmp_path / 'split' / 'last.pth.tar')
    assert full['epoch'] == split['epoch'] == 1
    for key in full['state_dict']:
        assert torch.equal(full['state_dict'][key], split['state_dict'][key]), key
    for key in full['criterion']:
        assert torch.equal(full['criterion'][key], split['criterion'][key]), key
    assert full['criterion']['heatmaps.seen'].any()


def test_em_apl_pseudo_labels_after_each_epoch_from_warm_up(synthetic_dir, tmp_path, train_script):
    extra = ['--epochs', '3', '--loss', 'em-apl', '--loss-kwargs', 'warmup_epochs=2', '--num-viz', '0']
    train_script.main(_args(synthetic_dir, tmp_path, *extra))
    state = load_checkpoint_file(tmp_path / 'last.pth.tar')['criterion']
    observed = torch.from_numpy(__import__('numpy').load(tmp_path / 'observed_labels.npy')) > 0.5
    unobserved = (~observed).sum(0)
    # after epochs 2 and 3 (1-based): int(0.9 * U_c / (3 - 2)) per class each time, capped by what is left
    per_epoch = (0.9 * unobserved.double()).long()
    assert torch.equal(state['pseudo_labelled'].sum(0), torch.minimum(2 * per_epoch, unobserved))
    assert not (state['pseudo_labelled'] & observed).any()


def test_role_estimates_train_at_ten_times_the_learning_rate(synthetic_dir, tmp_path, train_script):
    train_script.main(_args(synthetic_dir, tmp_path, '--epochs', '1', '--loss', 'role', '--num-viz', '0'))
    groups = load_checkpoint_file(tmp_path / 'last.pth.tar')['optimizer']['param_groups']
    assert groups[-1]['initial_lr'] == pytest.approx(10 * groups[0]['initial_lr']) and groups[-1]['weight_decay'] == 0


def test_srn_stages_all_run_in_sequence_with_their_own_epochs_and_rates(synthetic_dir, tmp_path, train_script):
    result = train_script.main(_args(synthetic_dir, tmp_path, '--srn-stage', 'all', '--num-viz', '0',
                                     '--max-train-images', '64', '--stage-epochs', '1', '2', '1', '1',
                                     '--stage-lr', '1e-3', '4e-3', '2e-3', '5e-4', '--sched', 'step'))
    assert [r['stage'] for r in result['history'][1:]] == [1, 2, 2, 3, 4]
    # step schedule (no decay within 2 epochs): each stage ends at its own rate; no warm-up after stage 1
    assert [r['lr'] for r in result['history'][2:]] == pytest.approx([4e-3, 4e-3, 2e-3, 5e-4])
    args = train_script.parse_args(['--srn-stage', 'all', '--warmup-epochs', '2', '--stage-epochs', '3', '1', '1', '4'])
    assert [train_script.stage_schedule(args, i) for i in (0, 1, 3)] == [
        dict(epochs=3, lr=args.lr, warmup_epochs=2), dict(epochs=1, lr=args.lr, warmup_epochs=0),
        dict(epochs=4, lr=args.lr, warmup_epochs=0)]


def test_srn_trains_every_branch_by_default(synthetic_dir, tmp_path, train_script):
    """No --srn-stage: SRN models train jointly (stage 4: BCE(y) + BCE(y_att)); the attention branch learns."""
    result = train_script.main(_args(synthetic_dir, tmp_path, '--epochs', '2', '--num-viz', '0'))
    first, last = result['history'][0]['eval'], result['history'][-1]['eval']
    assert [r['stage'] for r in result['history'][1:]] == [4, 4]
    assert last['mAP_y_att'] > first['mAP_y_att'] + 5 and last['mAP_y_cls'] > first['mAP_y_cls'] + 5
    assert train_script.stages_to_run(train_script.parse_args(['--loss', 'spatial'])) == [None]
    assert train_script.stages_to_run(train_script.parse_args(['--model', 'test_resnet'])) == [None]


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, str(SCRIPTS / 'train.py'), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize('extra,message', [
    (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
    (['--num-classes', '3'], '--num-classes 3 differs from the 10 classes of synthetic'),
    (['--loss', 'spatial', '--mixup', '0.8'], "loss 'spatial' needs per-sample hard labels"),
    (['--dataset', 'coco', '--data-dir', '/nonexistent'], 'dataset coco: COCO image folder not found'),
])
def test_bad_arguments_stop_with_one_line(synthetic_dir, tmp_path, extra, message):
    result = _cli(*_args(synthetic_dir, tmp_path), *extra)
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if 'error' in l]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / 'last.pth.tar').exists()


def test_resume_file_for_another_model(synthetic_dir, tmp_path, train_script):
    train_script.main(_args(synthetic_dir, tmp_path / 'a', '--epochs', '1', '--num-viz', '0'))
    result = _cli(*_args(synthetic_dir, tmp_path / 'b', '--model', 'srn_test_convnext'),
                  '--resume', str(tmp_path / 'a' / 'last.pth.tar'))
    assert result.returncode == 2 and "holds a 'srn_test_resnet' checkpoint, not 'srn_test_convnext'" in result.stderr


def test_help_shows_every_default_and_help_loss_lists_the_kwargs(train_script):
    parser = train_script.build_parser()
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert not undocumented, undocumented
    text = ' '.join(parser.format_help().split())
    assert '(default: 128)' in text and '(default: srn_test_resnet)' in text
    assert text.count('en-spatial') == 1  # the loss names are listed once, not repeated as choices
    result = _cli('--help-loss', 'epr', '--dataset', 'voc2007')
    assert result.returncode == 0 and 'expected_positives=1.5' in result.stdout
    result = _cli('--help-loss', 'asl')
    assert 'asl_gamma_neg=4.0' in result.stdout and 'poly_epsilon' not in result.stdout
    result = _cli('--help-loss', 'nope')
    assert result.returncode == 2 and "unknown loss 'nope'" in result.stderr


def test_unknown_dataset_and_loss_rejected_by_the_parser(tmp_path):
    for extra in (['--dataset', 'nope'], ['--loss', 'nope']):
        result = _cli('--output', str(tmp_path), *extra)
        assert result.returncode == 2 and 'invalid choice' in result.stderr


def test_torchrun_two_processes_gloo(synthetic_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           str(SCRIPTS / 'train.py'), *_args(synthetic_dir, tmp_path, '--epochs', '1', '--loss', 'spatial',
                                              '--loss-kwargs', 'warmup_epochs=0', '--num-viz', '0',
                                              '--grad-accum-steps', '2')]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint_file(tmp_path / 'last.pth.tar')
    records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    # metrics gathered over both ranks, every image once: the 20% val split of train, and the official val as test
    assert records[-1]['eval']['num_images'] == round(0.2 * 192)
    assert json.loads((tmp_path / 'summary.json').read_text())['test']['num_images'] == 64
    # the criterion saw both ranks' batches: 2 ranks x floor(77 / 16) batches x 16 (154 train images after the split)
    num_train = 192 - round(0.2 * 192)
    assert int(state['criterion']['samples_seen']) == 2 * ((num_train // 2 + num_train % 2) // 16) * 16
    assert state['criterion']['heatmaps.seen'].sum(dim=(1, 2)).gt(0).sum() > 16 * 2
    assert state['step'] == 2  # 4 batches per rank, accumulated in pairs (DDP no_sync on the first of each)


def test_config_file_and_training_options(synthetic_dir, tmp_path, train_script):
    """--config YAML defaults, channels_last, gradient accumulation, model EMA and torch.compile in one run."""
    config = tmp_path / 'config.yaml'
    config.write_text('epochs: 1\nchannels_last: true\ngrad_accum_steps: 2\nmodel_ema: true\ntorchcompile: eager\n')
    args = train_script.parse_args(['--config', str(config), '--lr', '1e-3'])
    assert args.epochs == 1 and args.grad_accum_steps == 2 and args.lr == 1e-3
    result = train_script.main(_args(synthetic_dir, tmp_path / 'run', '--config', str(config), '--num-viz', '0'))
    record = result['history'][-1]
    assert 'eval_ema' in record and record['eval']['num_images'] == 64
    state = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=True)
    assert 'state_dict_ema' in state and state['step'] == 6  # 192 images / 16 per batch / 2 accumulation steps
