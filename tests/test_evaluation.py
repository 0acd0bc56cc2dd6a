"""Evaluation: every model on the same whole-image view, each SRN branch scored, map localisation by hand."""
import numpy as np
import timm
import torch
from PIL import Image

from timm_srn.evaluation import IndexedDataset, eval_transform, evaluate
from timm_srn.localisation import argmax_in_box, map_localisation


def test_every_model_sees_the_whole_image():
    """A 1-pixel red column at the left edge survives for a model whose pretrained cfg centre-crops (87.5%)."""
    image = np.full((100, 150, 3), 255, dtype=np.uint8)
    image[:, 0] = (255, 0, 0)
    for name in ('tf_efficientnet_lite0', 'srn_test_resnet'):
        model = timm.create_model(name, num_classes=3)
        x = eval_transform(model, 64)(Image.fromarray(image))
        assert x.shape[-2:] == (64, 64)
        red = x[0, :, 0] - x[1, :, 0]  # the red channel minus green along the left column
        assert (red > 0.5).all(), name
    cropped = eval_transform(timm.create_model('tf_efficientnet_lite0'), 64, crop_pct=None)(Image.fromarray(image))
    assert not ((cropped[0, :, 0] - cropped[1, :, 0]) > 0.5).all()  # the cfg's centre crop cuts it away


class _Scenes(torch.utils.data.Dataset):
    """Two images with boxes: a bright square top-left (class 0), bottom-right (class 1)."""

    def __init__(self):
        self.images = torch.zeros(2, 3, 64, 64)
        self.images[0, :, :16, :16] = 1
        self.images[1, :, 48:, 48:] = 1
        self.targets = np.array([[1, 0], [0, 1]], dtype=np.float32)
        self.mask = np.ones_like(self.targets, dtype=bool)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.images[i], torch.from_numpy(self.targets[i])


def test_srn_branches_are_scored_from_one_forward():
    loader = torch.utils.data.DataLoader(IndexedDataset(_Scenes()), batch_size=2)
    srn = evaluate(timm.create_model('srn_test_resnet', num_classes=2), loader, torch.device('cpu'), progress=False)
    assert {'mAP', 'mAP_y_cls', 'mAP_y_att', 'mAP_y_sr'} <= set(srn)
    plain = evaluate(timm.create_model('test_resnet', num_classes=2), loader, torch.device('cpu'), progress=False)
    assert not [k for k in plain if k.startswith('mAP_')]


def test_argmax_in_box_by_hand():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 3] = 1  # cell (row 0, col 3): centre (0.875, 0.125)
    maps[1, 2, 1] = 1  # cell (row 2, col 1): centre (0.375, 0.625)
    boxes = np.array([[0, 0.75, 0.0, 1.0, 0.25], [1, 0.0, 0.0, 0.3, 0.3], [1, 0.5, 0.5, 1.0, 1.0]])
    assert argmax_in_box(maps, boxes) == {0: True, 1: False}
    boxes[2] = [1, 0.25, 0.5, 0.5, 0.75]  # a second box of class 1 that holds its argmax
    assert argmax_in_box(maps, boxes) == {0: True, 1: True}


def test_map_localisation_counts_present_labels():
    scenes = _Scenes()
    boxes = [np.array([[0, 0, 0, .25, .25]]), np.array([[1, .75, .75, 1, 1]])]
    loader = torch.utils.data.DataLoader(IndexedDataset(scenes), batch_size=2)
    result = map_localisation(timm.create_model('srn_test_resnet', num_classes=2), loader, boxes, torch.device('cpu'))
    assert result['localised_labels'] == 2 and 0 <= result['localisation'] <= 100
