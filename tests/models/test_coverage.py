"""SRN and plain-model class maps on every timm family (meta sweep) and real training steps on a few."""
import pytest
import torch
import timm

from timm_srn import srn_stage_loss
from timm_srn.losses import HeatmapSource, SpatialConsistencyLoss
from timm_srn.models.coverage import FAMILY_MODELS, CPU_FAMILIES, NO_SPATIAL_FEATURES, check_family

from ..losses.test_spatial_consistency import C, _batch

FAMILIES = [family for family in timm.list_modules() if family != 'srn']


def test_family_lists_name_real_families_and_models():
    assert set(FAMILY_MODELS) <= set(FAMILIES)
    assert set(CPU_FAMILIES) | set(NO_SPATIAL_FEATURES) <= set(FAMILIES)
    for family, name in FAMILY_MODELS.items():
        assert name in timm.list_models(module=family), (family, name)


@pytest.mark.parametrize('family', FAMILIES)
def test_every_timm_family(family):
    result = check_family(family)
    no_layout = family in NO_SPATIAL_FEATURES
    assert result.srn_class_maps == ('confidence' if no_layout else 'head')
    assert result.plain_class_maps is not no_layout


# backbones shrunk through their constructor arguments so a CPU step takes a moment
REAL_BACKBONES = {
    **{name: {} for name in timm.list_models('test_*')},
    'swin_tiny_patch4_window7_224': dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),  # NHWC
    'hieradet_small': dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),  # NHWC
    'levit_128s': {},  # tokens on the last stage's grid, BatchNorm head
    'coat_lite_tiny': {},  # class token in front of the last stage's tokens
    'twins_svt_small': dict(depths=(1, 1, 1, 1)),  # tokens, no class token
    'eva02_tiny_patch14_224': dict(depth=2),  # patch 14: tap at reduction 14
    'crossvit_tiny_240': dict(depth=((1, 1, 0),) * 3),  # no spatial layout: confidence maps
}


@pytest.mark.parametrize('name', REAL_BACKBONES)
def test_real_training_step(name):
    kwargs = REAL_BACKBONES[name]
    model = timm.create_model('srn', backbone=name, num_classes=C, backbone_kwargs=kwargs)
    size = model.img_size
    out = model.forward_branches(torch.randn(2, 3, *size))
    srn_stage_loss(out, torch.ones(2, C), 4).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    plain = timm.create_model(name, num_classes=C, **kwargs)
    criterion = SpatialConsistencyLoss(num_samples=4, num_classes=C, warmup_epochs=0).attach(plain)
    target = _batch([0, 1], boxes=[(0., 0., 1., 1.), (0.2, 0.1, 0.9, 0.8)], flips=[0, 1])
    images = torch.randn(2, 3, *size)
    if name.startswith('crossvit'):
        with pytest.raises(ValueError, match='no per-position final features'):
            criterion(plain(images), target)
        return
    for step in range(2):  # the spatial term compares with the heatmaps kept from the first step
        plain.zero_grad()
        loss = criterion(plain(images), target)
        loss.backward()
    assert torch.isfinite(loss) and criterion.last_terms['spatial'] > 0
    assert all(p.grad is not None for p in plain.parameters() if p.requires_grad)


@pytest.mark.parametrize('name', ['swin_tiny_patch4_window7_224', 'levit_128s', 'twins_svt_small'])
def test_class_maps_average_to_the_logits_for_nhwc_and_token_models(name):
    """Average-pool + linear heads: the maps' spatial mean is the logits, whatever the final features' layout."""
    kwargs = REAL_BACKBONES[name]
    plain = timm.create_model(name, num_classes=C, **kwargs).eval()
    source = HeatmapSource(plain)
    size = plain.pretrained_cfg['input_size'][1:]
    logits = plain(torch.randn(2, 3, *size))
    maps = source.latest()
    assert maps.shape[-2:] == tuple(s // plain.feature_info[-1]['reduction'] for s in size) or name == 'levit_128s'
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4)


def test_class_maps_leave_batchnorm_statistics_of_the_head_alone():
    plain = timm.create_model('levit_128s', num_classes=C).train()
    source = HeatmapSource(plain)
    plain(torch.randn(2, 3, 224, 224))
    before = {k: v.clone() for k, v in plain.state_dict().items() if 'head' in k}
    source.latest()
    after = plain.state_dict()
    assert any('running_mean' in k for k in before)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(m.momentum == 0.1 for m in plain.modules() if isinstance(m, torch.nn.BatchNorm1d))
