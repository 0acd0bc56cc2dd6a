"""The geometry-recording transform records the crop box and flip it applied."""
import random

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from timm_srn.data import GeometryRecordingTransform, PackedTargetDataset, unpack_target
from timm_srn.data.datasets import MultiLabelDataset


def _ramp(width=200, height=100):
    """Red channel = x coordinate, green = y coordinate (0..255 across the image)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_recorded_box_and_flip_match_the_pixels():
    timm_transform = create_transform(64, is_training=True, scale=(0.1, 0.5), hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1),
                                      color_jitter=0.,
                                      interpolation='bilinear')
    transform = GeometryRecordingTransform(timm_transform)
    assert transform.crop is not None and transform.flip_prob == 0.5
    random.seed(0)
    torch.manual_seed(0)
    flips = set()
    for _ in range(20):
        tensor, (box, flip) = transform(_ramp())
        flips.add(flip)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        red = tensor[0] * 255  # the ramp's x coordinate, scaled to 0..255
        left, right = red[:, 0].mean().item(), red[:, -1].mean().item()
        if flip:
            left, right = right, left
        assert abs(left - x0 * 255) < 8 and abs(right - x1 * 255) < 8
        green = tensor[1] * 255
        assert abs(green[0].mean().item() - y0 * 255) < 8 and abs(green[-1].mean().item() - y1 * 255) < 8
    assert flips == {True, False}


def test_eval_transform_records_the_full_image_and_dataset_packs_targets():
    transform = GeometryRecordingTransform(create_transform(32, is_training=False))
    _, (box, flip) = transform(_ramp())
    assert box == (0., 0., 1., 1.) and not flip
    base = MultiLabelDataset(['unused.jpg'] * 3, np.eye(3), ['a', 'b', 'c'])
    base.load_image = lambda index: _ramp()
    dataset = PackedTargetDataset(base, create_transform(32, is_training=True), observed_labels=np.eye(3)[::-1].copy())
    image, target = dataset[1]
    packed = unpack_target(target[None], 3)
    assert image.shape == (3, 32, 32) and int(packed.index[0]) == 1
    assert packed.labels[0].tolist() == [0., 1., 0.]
