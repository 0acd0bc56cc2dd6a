"""timm's own model checks (tests/test_models.py of the installed timm's sdist) on every srn model."""
import fnmatch

import pytest
import timm

from tests.timm_sdist import timm_test_models

TM = timm_test_models()
SRN_MODELS = timm.list_models('srn*')
VIT_MODELS = ('srn_vit_*', 'srn_test_vit')

FX_REASON = (
    'torch.fx symbolic tracing cannot follow Python control flow on runtime feature-map shapes, which SRN needs '
    '(class maps fold every position of the final map, U is resampled when the input size differs from img_size) '
    "and which timm's own ViT forward_intermediates uses; torch.compile and torch.export (ONNX) trace it instead")

# (check, model pattern) -> why the check does not apply
NOT_APPLICABLE = {
    ('test_model_default_cfgs', 'srn_vit_*'): 'ViT backbones output tokens; timm runs its non-std cfg check for them',
    ('test_model_default_cfgs', 'srn_test_vit'): 'ViT backbones output tokens; timm runs its non-std cfg check for them',
    ('test_model_default_cfgs_non_std', 'srn_*'): 'only ViT backbones are non-std; CNN variants take the std cfg check',
    ('test_model_forward_torchscript', 'srn*'): (
        'SRN taps the backbone through forward_intermediates (Union return, list indices, kwargs) and calls '
        'registered output hooks, which TorchScript cannot compile; torch.compile and ONNX export are supported '
        'and tested instead (tests/models/test_deploy.py)'),
    ('test_model_forward_fx', 'srn*'): FX_REASON,
    ('test_model_backward_fx', 'srn*'): FX_REASON,
    ('test_model_forward_features', 'srn_vit_*'): 'timm excludes ViTs (NON_STD_FILTERS) from features_only checks',
    ('test_model_forward_features', 'srn_test_vit'): 'timm excludes ViTs (NON_STD_FILTERS) from features_only checks',
}


def _not_applicable(check, model_name):
    for (name, pattern), reason in NOT_APPLICABLE.items():
        if name == check and fnmatch.fnmatch(model_name, pattern):
            if check == 'test_model_default_cfgs_non_std' and any(fnmatch.fnmatch(model_name, p) for p in VIT_MODELS):
                continue
            return reason
    return None


CHECKS = [
    ('test_model_forward', dict(batch_size=1)),
    ('test_model_backward', dict(batch_size=2)),
    ('test_model_default_cfgs', dict(batch_size=1, cfg_device='meta')),
    ('test_model_default_cfgs_non_std', dict(batch_size=1, cfg_device='meta')),
    ('test_model_forward_torchscript', dict(batch_size=1)),
    ('test_model_forward_features', dict(batch_size=1)),
    ('test_model_forward_intermediates_features', dict(batch_size=1)),
    ('test_model_forward_intermediates', dict(batch_size=1)),
    ('test_reset_classifier_keeps_pool', dict()),
    ('test_prune_intermediate_layers_contract', dict()),
    ('test_model_forward_fx', dict(batch_size=1)),
    ('test_model_backward_fx', dict(batch_size=2)),
]


@pytest.mark.parametrize('model_name', SRN_MODELS)
@pytest.mark.parametrize('check,kwargs', CHECKS, ids=[c for c, _ in CHECKS])
def test_timm_model_check(check, kwargs, model_name):
    reason = _not_applicable(check, model_name)
    if reason:
        pytest.skip(f'not applicable: {reason}')
    getattr(TM, check)(model_name=model_name, **kwargs)


def test_torchscript_really_does_not_apply():
    """The reason given above holds: scripting SRN fails."""
    import torch
    with pytest.raises(Exception):
        torch.jit.script(timm.create_model('srn_test_resnet'))


@pytest.mark.parametrize('name', ['srn_test_resnet', 'srn_test_vit'])
def test_fx_really_does_not_apply(name):
    """The reason given above holds: symbolic tracing fails."""
    from torch.fx import symbolic_trace
    with pytest.raises(Exception, match='Proxy|symbolically traced'):
        symbolic_trace(timm.create_model(name).eval())


def test_pruned_srn_is_a_feature_extractor():
    model = timm.create_model('srn_test_resnet', num_classes=5)
    model.prune_intermediate_layers([2])
    assert model.num_classes == 0 and model.attention is None and model.get_classifier() == (model.fc,)
    with pytest.raises(RuntimeError, match='pruned to a feature extractor'):
        model.reset_classifier(3)


def test_registered_models():
    assert set(SRN_MODELS) >= {
        'srn', 'srn_resnet50', 'srn_resnet101', 'srn_convnext_tiny', 'srn_vit_small_patch16_224',
        'srn_test_resnet', 'srn_test_vit', 'srn_test_convnext'}
