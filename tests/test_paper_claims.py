"""benchmarks/paper_claims.py: the README block is generated from the committed JSON, and the study runs end to end
(pretrain, fine-tune through train.py, scoring, crop analysis, report) and resumes without retraining."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import paper_claims  # noqa: E402


def test_readme_block_is_the_rendering_of_the_committed_results():
    results = json.loads((paper_claims.RESULTS_DIR / 'paper_claims.json').read_text())
    assert paper_claims.readme_block(ROOT / 'README.md') == paper_claims.markdown(results)
    assert (paper_claims.RESULTS_DIR / 'paper_claims.md').read_text() == paper_claims.markdown(results)
    assert all(len(s['seeds']) == 3 for s in results['settings'].values())


def test_study_backbone_gives_7x7_class_maps():
    """The issue's bar: class maps of at least 7x7 at the study's input size, for the plain model and SRN."""
    import timm
    import torch
    from timm_srn.models.class_maps import class_activation_maps
    cfg = paper_claims.CONFIG
    size = (cfg['img_size'], cfg['img_size'])
    x = torch.randn(1, 3, *size)
    plain = timm.create_model(cfg['backbone'], num_classes=10, output_stride=cfg['output_stride'])
    assert class_activation_maps(plain, plain.forward_features(x), size, plain.forward_head).shape[-2:] == (7, 7)
    srn = timm.create_model('srn_test_resnet', num_classes=10, img_size=cfg['img_size'], tap_index=3,
                            backbone_kwargs=dict(output_stride=cfg['output_stride'])).eval()
    assert srn.forward_branches(x).class_maps.shape[-2:] == (7, 7)


def test_visible_fraction_by_hand():
    assert paper_claims.visible_fraction((0., 0., .5, .5), (0., 0., 1., 1.)) == 1.
    assert paper_claims.visible_fraction((0., 0., .5, .5), (.25, 0., 1., 1.)) == pytest.approx(.5)
    assert paper_claims.visible_fraction((0., 0., .5, .5), (.6, .6, 1., 1.)) == 0.


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(paper_claims.CONFIG, 'train_scenes', 60)
    monkeypatch.setitem(paper_claims.CONFIG, 'test_scenes', 30)
    monkeypatch.setitem(paper_claims.CONFIG, 'pretrain_scenes', 60)
    monkeypatch.setitem(paper_claims.CONFIG, 'epochs', 1)
    monkeypatch.setitem(paper_claims.CONFIG, 'pretrain_epochs', 1)
    monkeypatch.setitem(paper_claims.CONFIG, 'img_size', 64)
    argv = ['--out', str(tmp_path), '--only', 'spatial', 'srn', '--seeds', '0', '--device', 'cpu', '--workers', '0']
    results = paper_claims.main(argv)
    spatial = results['settings']['spatial']['seeds'][0]
    assert set(spatial) >= {'mAP', 'mAP_relations', 'mAP_objects', 'crop_mAP', 'crop_accuracy', 'crops', 'AP'}
    assert spatial['crops'] > 0 and np.isfinite(spatial['mAP']) and 'crop_mAP' not in results['settings']['srn']['seeds'][0]
    assert (tmp_path / 'pretrained' / 'test_resnet_os16_objects.safetensors').exists()
    for name in ('paper_claims.json', 'paper_claims.md', 'paper_claims.png'):
        assert (tmp_path / name).stat().st_size > 0
    checkpoint = tmp_path / 'runs' / 'spatial' / 'seed0' / 'last.pth.tar'
    stamp = checkpoint.stat().st_mtime_ns
    again = paper_claims.main(argv)  # finished runs are reported, not retrained
    assert checkpoint.stat().st_mtime_ns == stamp
    assert again['settings']['spatial']['seeds'][0] == spatial
