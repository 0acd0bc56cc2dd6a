"""Where maps point, by hand: boxes in a crop's frame, the heatmap buffer's stored maps, the training crops' maps,
and train.py's per-epoch record."""
import numpy as np
import pytest
import torch

from timm_srn.data import pack_target
from timm_srn.localisation import (
    CropLocalisation, boxes_in_crop, buffer_localisation, cells_in_box, chance_localisation, visible_fractions)
from timm_srn.losses import HeatmapBuffer

from .scripts import load_script


def test_boxes_in_crop_by_hand():
    boxes = np.array([[1, 0.2, 0.2, 0.6, 0.6], [2, 0.0, 0.0, 0.1, 0.1]])
    crop = (0.3, 0.0, 1.0, 1.0)
    # class 1: x 0.2-0.6 cut to 0.3-0.6, i.e. 0 to 3/7 of the crop's width; 3/4 of its area in view; class 2 out
    np.testing.assert_allclose(boxes_in_crop(boxes, crop, flip=False), [[1, 0., 0.2, 3 / 7, 0.6]])
    np.testing.assert_allclose(boxes_in_crop(boxes, crop, flip=True), [[1, 4 / 7, 0.2, 1., 0.6]])
    assert len(boxes_in_crop(boxes, crop, flip=False, visible_from=0.76)) == 0


def test_chance_is_the_share_of_cells_inside_the_box():
    """A 4x4 map's cell centres sit at 1/8, 3/8, 5/8, 7/8: the box x 0-0.5, y 0-0.25 holds 2 x 1 of the 16 cells."""
    boxes = np.array([[0, 0., 0., .5, .25], [1, .5, .5, 1., 1.], [1, 0., 0., .3, .3]])
    assert cells_in_box((4, 4), boxes) == {0: 2 / 16, 1: 5 / 16}  # class 1: 4 cells, and 1 more in its second box
    observed = np.array([[1., 0.]])
    assert chance_localisation([boxes], observed, (4, 4)) == dict(observed=100 * 2 / 16, other=100 * 5 / 16)
    # the crop x 0-0.5 (flipped) shows class 0 whole (now x 0-1 of the crop, y 0-0.25: 4 cells) and class 1's small
    # box (x 0-0.3 of the image: 0.4-1 of the crop after the flip, y 0-0.3: 2 cells); its other box is out of view
    assert chance_localisation([boxes], observed, (4, 4), crops=[[((0., 0., .5, 1.), True)]]) == dict(
        observed=25., other=12.5)


def _peak(num_classes, cells, size=(2, 2)):
    """Maps (C, h, w) of zeros with a 1 at cells[c] = (row, col) for the classes given."""
    maps = torch.zeros(num_classes, *size)
    for column, (row, col) in cells.items():
        maps[column, row, col] = 1.
    return maps


def test_buffer_localisation_by_hand():
    buffer = HeatmapBuffer(3, 3, (2, 2), torch.float32)
    # sample 0: class 0 peaks top-left (in its box), class 1 top-left too (its box is bottom-right); sample 1: class 2
    # peaks bottom-right, in its box; sample 2 is never written and not counted
    maps = torch.stack([_peak(3, {0: (0, 0), 1: (0, 0)}), _peak(3, {2: (1, 1)})])
    buffer.write(torch.tensor([0, 1]), maps, momentum=0.5)
    boxes = [np.array([[0, 0., 0., .5, .5], [1, .5, .5, 1., 1.]]), np.array([[2, .5, .5, 1., 1.]]),
             np.array([[0, 0., 0., 1., 1.]])]
    observed = np.array([[1., 0, 0], [0, 0, 1.], [1., 0, 0]])
    result = buffer_localisation(buffer, boxes, observed)
    assert result == dict(buffer_observed=100., buffer_other=0., buffer_observed_maps=2, buffer_other_maps=1)
    with pytest.raises(ValueError, match='2 box lists'):
        buffer_localisation(buffer, boxes[:2], observed)


def test_crop_localisation_follows_the_crop_and_flip():
    """Class 2's box (x 0.5-0.75, y 0-0.5) in the crop x 0.5-1, flipped: the crop's top-right cell."""
    boxes = [np.array([[2, 0.5, 0.0, 0.75, 0.5], [1, 0.0, 0.0, 0.2, 0.2]])]
    observed = np.array([[0., 0, 1.]])
    tracker = CropLocalisation(boxes, observed)
    target = pack_target(observed[0], 0, (0.5, 0.0, 1.0, 1.0), flip=True)[None]
    tracker.update(_peak(3, {2: (0, 1)})[None], target)  # class 1's box is outside the crop: not counted
    assert tracker.result() == dict(crop_maps_observed=100., crop_maps_observed_maps=1, crop_maps_other_maps=0)
    tracker.update(_peak(3, {2: (0, 0)})[None], target)  # top-left: the unflipped position, a miss
    assert tracker.result()['crop_maps_observed'] == 50.
    tracker.reset()
    assert tracker.result() == dict(crop_maps_observed_maps=0, crop_maps_other_maps=0)


def test_train_py_records_the_localisation_of_spatial_runs(synthetic_dir, tmp_path):
    train = load_script('train')
    args = ['--data-dir', str(synthetic_dir), '--model', 'test_resnet', '--img-size', '64', '--batch-size', '16',
            '--workers', '0', '--no-progress', '--max-train-images', '48', '--max-val-images', '16', '--num-viz', '0',
            '--epochs', '2', '--loss', 'spatial', '--measure-localisation']
    result = train.main(args + ['--output', str(tmp_path / 'spatial')])
    records = [r['localisation'] for r in result['history'] if 'localisation' in r]
    assert len(records) == 2
    for record in records:
        # every training image has boxes: 38 of the 48 are in the protocol's training split, each stored once
        assert record['buffer_observed_maps'] + record['buffer_other_maps'] > 38
        assert 0 <= record['buffer_observed'] <= 100 and record['crop_maps_observed_maps'] > 0
    with pytest.raises(SystemExit):
        train.main(args[:-3] + ['--loss', 'an', '--measure-localisation', '--output', str(tmp_path / 'an')])


def test_visible_fractions_by_hand():
    box = np.array([[3, 0., 0., .5, .5]])
    assert visible_fractions(box, (0., 0., 1., 1.)) == pytest.approx([1.])
    assert visible_fractions(box, (.25, 0., 1., 1.)) == pytest.approx([.5])
    assert visible_fractions(box, (.6, .6, 1., 1.)) == pytest.approx([0.])
