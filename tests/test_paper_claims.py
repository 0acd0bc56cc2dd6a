"""benchmarks/paper_claims.py: the README block is generated from the committed JSON, and the study runs end to end
(ImageNet backbone file, fine-tune through train.py, scoring with branches and localisation, crop analysis, report)
and resumes without retraining."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_srn.checkpoint import create_model_from_checkpoint
from timm_srn.data import create_dataset, protocol_split
from timm_srn.evaluation import eval_transform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import paper_claims  # noqa: E402


@pytest.mark.parametrize('name', ['paper_claims', 'single_positive'])
def test_readme_block_is_the_rendering_of_the_committed_results(name):
    results = json.loads((paper_claims.RESULTS_DIR / f'{name}.json').read_text())
    assert paper_claims.readme_block(ROOT / 'README.md', name) == paper_claims.markdown(results)
    assert (paper_claims.RESULTS_DIR / f'{name}.md').read_text() == paper_claims.markdown(results)
    assert all(len(s['seeds']) == 3 for s in results['settings'].values())


def test_study_backbone_map_sizes():
    """At the study's input size (160): the plain model's class maps are 5x5 (10x10 with output stride 16) and
    SRN's attention tap is 10x10 (14x14 at 224, as in the paper), and the 224 px settings' maps are 14x14."""
    import timm
    import torch
    from timm_srn.models.class_maps import class_activation_maps
    cfg = paper_claims.CONFIG
    size = (cfg['img_size'], cfg['img_size'])
    x = torch.randn(1, 3, *size)
    for output_stride, img_size, maps in ((32, size, (5, 5)), (16, size, (10, 10)), (16, (224, 224), (14, 14))):
        plain = timm.create_model(cfg['backbone'], num_classes=10, output_stride=output_stride).eval()
        features = plain.forward_features(torch.randn(1, 3, *img_size))
        assert class_activation_maps(plain, features, img_size, plain.forward_head).shape[-2:] == maps
    srn = timm.create_model('srn', backbone=cfg['backbone'], num_classes=10, img_size=cfg['img_size']).eval()
    assert srn.forward_branches(x).attention.shape[-2:] == (10, 10)
    reported = paper_claims.aggregate({name: {0: {}} for name in paper_claims.SETTINGS})  # as the report reads them
    assert paper_claims._map_sizes(reported['spatial']) == ('7x7', '5x5')
    assert paper_claims._map_sizes(reported['spatial 10x10 maps']) == ('10x10', '10x10')
    assert paper_claims._map_sizes(reported['spatial 14x14 maps']) == ('14x14', '14x14')
    assert paper_claims._map_sizes(reported['srn spatial attention warm-up 3']) == ('10x10', '10x10')


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(paper_claims.CONFIG, 'train_scenes', 60)
    monkeypatch.setitem(paper_claims.CONFIG, 'test_scenes', 30)
    monkeypatch.setitem(paper_claims.CONFIG, 'epochs', 1)
    monkeypatch.setitem(paper_claims.CONFIG, 'img_size', 64)
    argv = ['--out', str(tmp_path), '--only', 'spatial', 'srn', '--seeds', '0', '--device', 'cpu', '--workers', '0']
    results = paper_claims.main(argv)
    spatial = results['settings']['spatial']['seeds'][0]
    srn = results['settings']['srn']['seeds'][0]
    assert set(spatial) >= {'mAP', 'mAP_relations', 'mAP_objects', 'crop_mAP', 'crop_accuracy', 'crops', 'AP',
                            'localisation'}
    assert spatial['crops'] > 0 and np.isfinite(spatial['mAP']) and 'crop_mAP' not in srn
    assert spatial['memory_format'] == 'channels_last' and results['config']['memory_formats'] == ['channels_last']
    assert len(spatial['localisation_by_epoch']) == 1 and 0 <= spatial['buffer_observed'] <= 100
    assert 'buffer_observed' not in srn and 'unobserved_mAP' not in srn
    assert all(0 <= spatial[k] <= 100 for k in ('unobserved_mAP', 'ema_targets_mAP', 'ema_targets_shuffled_mAP'))
    _check_unobserved_labels(tmp_path)
    chance = results['chance']['5x5']  # a random argmax: fewer hits on whole images than in zoomed-in crops
    assert 0 < chance['test'] < 50 and chance['buffer_observed'] < chance['crop_maps_observed'] < 100
    assert srn['fused_minus_y_cls'] == pytest.approx(srn['mAP'] - srn['mAP_y_cls'])
    assert {'mAP_y_att', 'mAP_y_sr'} <= set(srn) and 0 <= srn['localisation'] <= 100 and srn['localised_labels'] > 30
    assert (tmp_path / 'pretrained' / 'tf_efficientnet_lite0_in1k.safetensors').exists()
    for name in ('paper_claims.json', 'paper_claims.md', 'paper_claims.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert "What the consistency term's targets hold" in (tmp_path / 'paper_claims.md').read_text()
    checkpoint = tmp_path / 'runs' / 'spatial' / 'seed0' / 'last.pth.tar'
    stamp = checkpoint.stat().st_mtime_ns
    again = paper_claims.main(argv)  # finished runs are reported, not retrained
    assert checkpoint.stat().st_mtime_ns == stamp
    assert again['settings']['spatial']['seeds'][0] == spatial


@pytest.mark.slow
def test_parallel_jobs_give_the_runs_of_one_at_a_time(tmp_path, monkeypatch):
    """--jobs 2: two runs at once, each in its own process with one thread and the parent's configuration, give
    the results the same runs give one after the other (up to the rounding of 1 against 2 threads)."""
    for key, value in dict(train_scenes=40, test_scenes=20, epochs=1, img_size=64).items():
        monkeypatch.setitem(paper_claims.CONFIG, key, value)
    argv = ['--only', 'an', '--seeds', '0', '1', '--device', 'cpu', '--workers', '0']
    parallel = paper_claims.main(argv + ['--out', str(tmp_path / 'parallel'), '--jobs', '2'])['settings']['an']
    serial = paper_claims.main(argv + ['--out', str(tmp_path / 'serial')])['settings']['an']
    assert sorted(parallel['seeds']) == [0, 1] and parallel['seeds'][0]['mAP'] != parallel['seeds'][1]['mAP']
    for seed in (0, 1):
        assert parallel['seeds'][seed]['mAP'] == pytest.approx(serial['seeds'][seed]['mAP'], abs=0.5)
        records = (tmp_path / 'parallel' / 'runs' / 'an' / f'seed{seed}' / 'metrics.jsonl').read_text().splitlines()
        assert [json.loads(r)['epoch'] for r in records] == [-1, 0]  # the shrunk CONFIG reached the job processes


def _check_unobserved_labels(out):
    """`unobserved_labels` scores the stored rows by their training image: rows that hold the true labels score 100
    mAP, the same rows shuffled less; rows never written and observed labels are left out. Without the buffer, the
    model alone is scored."""
    checkpoint = out / 'runs' / 'spatial' / 'seed0' / 'last.pth.tar'
    model = create_model_from_checkpoint(checkpoint)
    transform = eval_transform(model, paper_claims.CONFIG['img_size'])
    train, _, observed, _ = protocol_split(create_dataset('synthetic', str(out / 'data' / 'finetune'), split='train',
                                                          transform=transform))
    truth = torch.as_tensor(np.asarray(train.targets), dtype=torch.float16)
    stored = torch.where(torch.from_numpy(np.asarray(observed) > 0), 0., truth * 0.9 + 0.05)  # observed: ranked last
    stored[0] = 1 - truth[0]  # a row never written, wrong everywhere
    written = torch.ones(len(truth), 1, 1, dtype=torch.bool)
    written[0] = False
    state = {'loss.predictions.maps': stored[:, :, None, None], 'loss.predictions.seen': written}
    scores = paper_claims.unobserved_labels(state, model, train, observed, torch.device('cpu'))
    assert scores['ema_targets_mAP'] == pytest.approx(100.) and scores['ema_targets_shuffled_mAP'] < 90.
    alone = paper_claims.unobserved_labels({'epoch': torch.zeros(())}, model, train, observed, torch.device('cpu'))
    assert list(alone) == ['unobserved_mAP'] and 0 <= alone['unobserved_mAP'] <= 100
