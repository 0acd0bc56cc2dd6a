"""SRN architecture, stages, timm contract details and error messages."""
import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

from timm_srn import srn_stage_loss
from timm_srn.models.srn import tap_feature_index


def _tiny(name='srn_test_resnet', **kwargs):
    return timm.create_model(name, num_classes=5, **kwargs)


@pytest.mark.parametrize('name', ['srn_test_resnet', 'srn_test_vit', 'srn_test_convnext'])
def test_branches_follow_the_paper(name):
    model = _tiny(name).eval()
    out = model.forward_branches(torch.randn(2, 3, 160, 160))
    # softmax over the positions of each image and class
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 5))
    # y_att = sum over positions of A * S (no sigmoid)
    torch.testing.assert_close(out.att_logits, (out.attention * out.confidence).sum(dim=(2, 3)))
    torch.testing.assert_close(out.logits, 0.5 * out.cls_logits + 0.5 * out.sr_logits)
    # f_sr sees U = A * sigmoid(S)
    torch.testing.assert_close(model.regularizer(out.attention * out.confidence.sigmoid()), out.sr_logits)
    assert out.attention.shape == (2, 5, 10, 10) and out.confidence.shape == (2, 5, 10, 10)
    torch.testing.assert_close(model(torch.zeros(1, 3, 160, 160)), model.forward_branches(torch.zeros(1, 3, 160, 160)).logits)


def test_class_maps_mean_equals_main_logits_for_gap_linear_head():
    model = _tiny().eval()
    out = model.forward_branches(torch.randn(2, 3, 160, 160))
    assert out.class_maps.shape == (2, 5, 5, 5)
    torch.testing.assert_close(out.class_maps.mean(dim=(2, 3)), out.cls_logits, rtol=1e-5, atol=1e-5)


def test_resnet101_shapes_and_head_parameters():
    model = timm.create_model('srn_resnet101', device='meta')
    assert model.regularizer.conv3.weight.shape == (2048, 1, 14, 14)
    assert model.regularizer.conv3.groups == 512
    assert model.tap_map_size == (14, 14) and model.attention.in_chs == 1024
    f_att = sum(p.numel() for n, p in model.attention.named_parameters() if not n.startswith('confidence'))
    confidence = sum(p.numel() for p in model.attention.confidence.parameters())
    f_sr = sum(p.numel() for p in model.regularizer.parameters())
    for count, reference in ((f_att, 2.93e6), (confidence, 82e3), (f_sr, 0.87e6)):
        assert abs(count - reference) / reference < 0.01, (count, reference)


@pytest.mark.parametrize('size', [(128, 128), (224, 192), (96, 160)])
def test_any_resolution(size):
    for name in ('srn_test_resnet', 'srn_test_vit'):
        model = _tiny(name).eval()
        out = model(torch.randn(1, 3, *size))
        assert out.shape == (1, 5) and torch.isfinite(out).all()


def _grads_after_stage(model, stage):
    model.zero_grad(set_to_none=True)
    model.set_stage(stage)
    model.train()
    out = model.forward_branches(torch.randn(2, 3, 160, 160))
    srn_stage_loss(out, torch.randint(0, 2, (2, 5)).float(), stage).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('stage,groups', [
    (1, ('backbone.', 'fc.')), (2, ('attention.',)), (3, ('regularizer.',)),
    (4, ('backbone.', 'fc.', 'attention.', 'regularizer.'))])
def test_stage_gradients_reach_exactly_the_trainable_group(stage, groups):
    model = _tiny()
    with_grad = _grads_after_stage(model, stage)
    trainable = {n for n, p in model.named_parameters() if n.startswith(groups)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert with_grad == trainable, sorted(trainable ^ with_grad)[:5]


def test_frozen_groups_keep_norm_statistics():
    model = _tiny()
    model.set_stage(3)
    model.train()
    assert not model.backbone.training and not model.attention.training and model.regularizer.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 160, 160))
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


def test_stage_one_trains_exactly_what_the_plain_model_trains():
    """SRN at stage 1 and the plain backbone from the same weights: one AdamW step on the same batch leaves the
    backbone and the classifier equal, and the SRN heads untouched."""
    from timm.optim import create_optimizer_v2
    srn = _tiny()
    plain = timm.create_model('test_resnet', num_classes=5)
    plain.load_state_dict({**{k: v for k, v in srn.backbone.state_dict().items()},
                           'fc.weight': srn.fc.weight, 'fc.bias': srn.fc.bias})
    heads = {k: v.clone() for k, v in srn.state_dict().items() if k.startswith(('attention.', 'regularizer.'))}
    srn.set_stage(1)
    images, target = torch.randn(4, 3, 160, 160), torch.randint(0, 2, (4, 5)).float()
    for model, loss_fn in ((srn, lambda m: srn_stage_loss(m.forward_branches(images), target, 1)),
                           (plain, lambda m: F.binary_cross_entropy_with_logits(m(images), target))):
        optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-2, weight_decay=0.05)
        model.train()
        loss_fn(model).backward()
        optimizer.step()
    trained = srn.state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(trained[key if key.startswith('fc.') else f'backbone.{key}'], value, rtol=0, atol=0)
    assert all(torch.equal(trained[k], v) for k, v in heads.items())


def test_stage_losses():
    out = _tiny().eval().forward_branches(torch.randn(2, 3, 160, 160))
    target = torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(srn_stage_loss(out, target, 1), bce(out.cls_logits, target))
    torch.testing.assert_close(srn_stage_loss(out, target, 2), bce(out.att_logits, target))
    torch.testing.assert_close(srn_stage_loss(out, target, 3), bce(out.sr_logits, target))
    torch.testing.assert_close(srn_stage_loss(out, target, 4), bce(out.logits, target) + bce(out.att_logits, target))
    torch.testing.assert_close(
        srn_stage_loss(out, target, 4, stage4_loss='released'),
        bce(out.cls_logits, target) + bce(out.att_logits, target) + bce(out.sr_logits, target))
    with pytest.raises(ValueError, match='stage4_loss'):
        srn_stage_loss(out, target, 4, stage4_loss='other')
    with pytest.raises(ValueError, match='stage'):
        _tiny().set_stage(5)


def test_reset_classifier_resets_every_classifier():
    model = _tiny()
    model.reset_classifier(3)
    assert model.fc.out_features == 3 and model.attention.conv3.out_channels == 3
    assert model.attention.confidence.out_channels == 3 and model.regularizer.conv1.in_channels == 3
    assert model.regularizer.fc.out_features == 3
    assert len(model.get_classifier()) == 5
    assert model.eval()(torch.randn(1, 3, 160, 160)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, model.head_hidden_size)
    assert model.get_classifier() == (model.fc,)


def test_classifier_names_match_state_dict():
    model = _tiny()
    keys = model.state_dict().keys()
    for name in model.pretrained_cfg['classifier']:
        assert f'{name}.weight' in keys


def test_group_matcher_and_no_weight_decay_use_real_names():
    from timm.models._manipulate import group_parameters
    model = _tiny('srn_test_vit')
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    assert groups['attention.conv1.weight'] == max(groups.values())
    assert groups['backbone.patch_embed.proj.weight'] < groups['attention.conv1.weight']
    names = {n for n, _ in model.named_parameters()}
    assert 'backbone.pos_embed' in model.no_weight_decay() and 'backbone.pos_embed' in names


def test_construction_device_dtype_meta_and_unknown_kwargs():
    model = timm.create_model('srn_test_resnet', device='meta', dtype=torch.bfloat16)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(TypeError):
        timm.create_model('srn_test_resnet', not_an_arg=1)


def test_generic_entrypoint_any_backbone():
    model = timm.create_model('srn', backbone='test_efficientnet', num_classes=4, img_size=160).eval()
    assert model.pretrained_cfg['first_conv'] == 'backbone.conv_stem'
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 4)
    assert 'backbone.conv_stem.weight' in model.state_dict()


def test_tap_is_the_feature_closest_to_reduction_16():
    cases = {(4, 8, 16, 32): 2, (7, 14, 28): 1, (14,) * 12: 11, (12, 12, 12, 17, 17, 17): 5, (8, 32): 0, (8, 24): 1,
             (16, 16, 32): 1}
    for reductions, index in cases.items():
        assert tap_feature_index([dict(reduction=r) for r in reductions]) == index, reductions
    # output stride 8: the late stages all have reduction 8 -> the deepest; the f_sr kernel follows its 20x20 map
    model = timm.create_model('srn', backbone='test_resnet', img_size=160, backbone_kwargs=dict(output_stride=8))
    assert [info['reduction'] for info in model.feature_info][-2:] == [8, 8]
    assert model.tap_index == len(model.feature_info) - 1 and model.tap_map_size == (20, 20)
    assert model.regularizer.conv3.kernel_size == (20, 20)
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 80)
    # tap_index overrides the rule; the kernel follows the chosen map (reduction 32: 5x5 at 160)
    model = timm.create_model('srn', backbone='test_resnet', img_size=160, tap_index=-1, num_classes=3)
    assert model.feature_info[model.tap_index]['reduction'] == 32 and model.tap_map_size == (5, 5)
    assert model.regularizer.conv3.kernel_size == (5, 5) and model.attention.in_chs == model.feature_info[-1]['num_chs']
    assert model.forward_branches(torch.randn(2, 3, 160, 160)).attention.shape == (2, 3, 5, 5)


def test_img_size_defaults_to_the_backbone_size_and_impossible_sizes_are_refused():
    model = timm.create_model('srn', backbone='cait_xxs24_384', device='meta')
    assert model.img_size == (384, 384) and model.pretrained_cfg['input_size'] == (3, 384, 384)
    assert timm.create_model('srn', backbone='test_convnext', device='meta').img_size == (160, 160)
    with pytest.raises(ValueError, match=r"Backbone 'cait_xxs24_384' cannot run at img_size=\(224, 224\) .*"
                                         r"pretrained input size \(384, 384\)"):
        timm.create_model('srn', backbone='cait_xxs24_384', img_size=224)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="Unknown backbone 'no_such_net'"):
        timm.create_model('srn', backbone='no_such_net')
    # weights for 5 classes into a model configured for the same count as the cfg but built with 7
    weights = tmp_path / 'srn5.safetensors'
    save_file(_tiny().state_dict(), str(weights))
    with pytest.raises(RuntimeError, match='trained for 5 classes but the model has num_classes=7'):
        timm.create_model('srn_test_resnet', pretrained=True, num_classes=7,
                          pretrained_cfg_overlay=dict(file=str(weights), num_classes=7))
    plain = tmp_path / 'resnet.safetensors'
    save_file(timm.create_model('test_resnet').state_dict(), str(plain))
    with pytest.raises(RuntimeError, match='plain backbone checkpoint'):
        timm.create_model('srn_test_resnet', pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)))
    other = tmp_path / 'other.safetensors'
    save_file(timm.create_model('srn_test_convnext', num_classes=5).state_dict(), str(other))
    with pytest.raises(RuntimeError, match='another architecture'):
        timm.create_model('srn_test_resnet', pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(other), num_classes=5))


def test_pretrained_from_local_file_and_adaptation(tmp_path):
    source = _tiny().eval()
    weights = tmp_path / 'srn.safetensors'
    save_file(source.state_dict(), str(weights))
    loaded = timm.create_model(
        'srn_test_resnet', pretrained=True, num_classes=5,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=5)).eval()
    x = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(loaded(x), source(x))
    # another num_classes: timm drops every classifier, the rest loads
    adapted = timm.create_model(
        'srn_test_resnet', pretrained=True, num_classes=3,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=5))
    torch.testing.assert_close(adapted.backbone.conv1[0].weight, source.backbone.conv1[0].weight)
    torch.testing.assert_close(adapted.attention.conv1.weight, source.attention.conv1.weight)
    assert adapted.fc.out_features == 3


def test_pretrained_backbone_only(tmp_path):
    backbone = timm.create_model('test_resnet', num_classes=0)
    weights = tmp_path / 'backbone.safetensors'
    save_file(backbone.state_dict(), str(weights))
    model = timm.create_model(
        'srn_test_resnet', pretrained_backbone=True,
        backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=str(weights))))
    torch.testing.assert_close(model.backbone.conv1[0].weight, backbone.conv1[0].weight)


def test_output_hook_sees_all_branches():
    model = _tiny().eval()
    seen = []
    handle = model.register_output_hook(seen.append)
    logits = model(torch.randn(1, 3, 160, 160))
    handle.remove()
    model(torch.randn(1, 3, 160, 160))
    assert len(seen) == 1 and seen[0].logits is logits


@pytest.mark.parametrize('backbone', [
    'test_resnet', 'test_convnext', 'test_efficientnet', 'test_nfnet', 'test_byobnet', 'test_vit', 'test_vit2'])
def test_any_timm_backbone_trains(backbone):
    model = timm.create_model('srn', backbone=backbone, num_classes=4, img_size=160)
    reference = timm.create_model(backbone).pretrained_cfg
    assert model.pretrained_cfg['first_conv'] == f"backbone.{reference['first_conv']}"
    assert (model.pretrained_cfg['pool_size'] is None) == (reference['pool_size'] is None)
    out = model.forward_branches(torch.randn(2, 3, 160, 160))
    assert out.logits.shape == (2, 4) and out.attention.shape[-2:] == (10, 10)
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 4))
    srn_stage_loss(out, torch.ones(2, 4), 4).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_full_map_conv_equals_the_grouped_convolution(memory_format):
    regularizer = timm.create_model('srn_test_resnet', num_classes=6).regularizer
    x = torch.randn(3, regularizer.hidden_chs, *regularizer.map_size).contiguous(memory_format=memory_format)
    torch.testing.assert_close(regularizer.full_map_conv(x), regularizer.conv3(x), rtol=1e-5, atol=1e-5)
