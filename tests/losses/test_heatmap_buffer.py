"""HeatmapBuffer: alignment, EMA arithmetic, masks, duplicates, errors, state, scale mode."""
import pytest
import torch
from torchvision.ops import roi_align

from timm_srn.losses import HeatmapBuffer, write_ema

FULL = torch.tensor([[0., 0., 1., 1.]])


def _buffer(n=4, c=3, size=(8, 8), **kwargs):
    return HeatmapBuffer(n, c, size, dtype=torch.float32, **kwargs)


def _crop_reference(full_map, box, size):
    """Direct bilinear crop of a whole-image map (torchvision roi_align, aligned, one sample per bin)."""
    _, _, h, w = full_map.shape
    roi = torch.tensor([[0., box[0] * w, box[1] * h, box[2] * w, box[3] * h]])
    return roi_align(full_map, roi, size, spatial_scale=1., sampling_ratio=1, aligned=True)


@pytest.mark.parametrize('box', [(0., 0., 1., 1.), (0.1, 0.2, 0.7, 0.9), (0.5, 0.0, 1.0, 0.5), (0.3, 0.3, 0.6, 0.8)])
@pytest.mark.parametrize('flip', [False, True])
def test_read_equals_direct_bilinear_crop(box, flip):
    buf = _buffer()
    full = torch.randn(1, 3, 8, 8)
    buf.write(torch.tensor([2]), full, FULL, torch.tensor([False]), momentum=0.9)
    maps, valid = buf.read(torch.tensor([2]), torch.tensor([box]), torch.tensor([flip]), (5, 4))
    expected = _crop_reference(full, box, (5, 4))
    if flip:
        expected = expected.flip(-1)
    assert valid.all()
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)


def test_write_then_read_same_box_round_trips():
    # the crop's cells coincide with buffer cells (box of 4x4 cells of an 8x8 buffer): resampling is exact
    buf = _buffer(size=(8, 8))
    maps = torch.randn(1, 3, 4, 4)
    box, flip = torch.tensor([[0.25, 0.25, 0.75, 0.75]]), torch.tensor([True])
    buf.write(torch.tensor([0]), maps, box, flip, momentum=0.5)
    back, valid = buf.read(torch.tensor([0]), box, flip, (4, 4))
    assert valid.all()
    torch.testing.assert_close(back, maps, rtol=1e-5, atol=1e-5)


def test_ema_arithmetic_and_first_write_takes_value():
    buf = _buffer(size=(2, 2))
    a, b = torch.full((1, 3, 2, 2), 2.), torch.full((1, 3, 2, 2), 4.)
    idx, flip = torch.tensor([1]), torch.tensor([False])
    buf.write(idx, a, FULL, flip, momentum=0.75)
    torch.testing.assert_close(buf.maps[1], a[0])
    buf.write(idx, b, FULL, flip, momentum=0.75)
    torch.testing.assert_close(buf.maps[1], torch.full((3, 2, 2), 0.75 * 2 + 0.25 * 4))


def test_only_the_crop_region_is_written_and_unseen_cells_are_invalid():
    buf = _buffer(size=(4, 4))
    buf.write(torch.tensor([0]), torch.ones(1, 3, 2, 2), torch.tensor([[0., 0., 0.5, 0.5]]), torch.tensor([False]), 0.9)
    assert buf.seen[0].sum() == 4 and buf.seen[0, :2, :2].all()
    assert (buf.maps[0, :, 2:, :] == 0).all()
    _, valid = buf.read(torch.tensor([0]), FULL, torch.tensor([False]), (4, 4))
    assert valid[0, :, :1, :1].all() and not valid[0, :, 3:, 3:].any()
    _, valid = buf.read(torch.tensor([3]), FULL, torch.tensor([False]), (4, 4))
    assert not valid.any()


def test_duplicate_indices_apply_in_batch_order():
    buf = _buffer(size=(1, 1))
    maps = torch.tensor([1., 2., 3.]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    buf.write(torch.tensor([0, 0, 0]), maps, FULL.expand(3, 4), torch.zeros(3, dtype=torch.bool), momentum=0.5)
    # 1 (first), then 0.5*1 + 0.5*2 = 1.5, then 0.5*1.5 + 0.5*3 = 2.25
    torch.testing.assert_close(buf.maps[0, :, 0, 0], torch.full((3,), 2.25))


@pytest.mark.parametrize('index', [[0, 0, 0], [2, 0, 2, 2, 0], [1, 3, 2]])
@pytest.mark.parametrize('classes_per_sample', [None, 2])
def test_one_batch_with_repeats_equals_its_rows_written_one_by_one(index, classes_per_sample):
    """The closed-form update of repeated samples (no loop, no host sync) equals writing the rows in batch order as
    separate batches, with crops that cover different cells, flips, and unkept rows that write nothing."""
    generator = torch.Generator().manual_seed(len(index))
    index = torch.tensor(index)
    batch = len(index)
    maps = torch.randn(batch, 3, 3, 3, generator=generator)
    lo = torch.rand(batch, 2, generator=generator) * 0.5
    boxes = torch.cat([lo, lo + 0.3 + torch.rand(batch, 2, generator=generator) * 0.2], 1)
    flips = torch.rand(batch, generator=generator) < 0.5
    keep = torch.ones(batch, dtype=torch.bool)
    keep[-1] = batch < 4  # the last row of the longer batch is refused by the caller
    together, one_by_one = (HeatmapBuffer(4, 3, (5, 5), torch.float32, classes_per_sample=classes_per_sample)
                            for _ in range(2))
    together.write(index, maps, boxes, flips, momentum=0.7, keep=keep)
    for row in range(batch):
        if keep[row]:
            one_by_one.write(index[row:row + 1], maps[row:row + 1], boxes[row:row + 1], flips[row:row + 1], 0.7)
    torch.testing.assert_close(together.maps, one_by_one.maps)
    assert torch.equal(together.seen, one_by_one.seen)
    if classes_per_sample:
        assert torch.equal(together.class_ids, one_by_one.class_ids)
    assert int(together.skipped_rows) == 0  # refused rows are the caller's to report


@pytest.mark.parametrize('classes_per_sample', [None, 2])
def test_buffers_updated_side_by_side_equal_each_written_alone(classes_per_sample):
    """`write_ema` of several buffers' `prepare_write`s (one update over all their cells: the criterion's predictions
    and heatmaps) equals writing each buffer on its own, whatever their sizes, dtypes and slots."""
    generator = torch.Generator().manual_seed(0)
    index, keep = torch.tensor([2, 0, 2, 1]), torch.tensor([True, True, True, False])
    maps = torch.rand(4, 3, 4, 4, generator=generator)
    boxes, flips = torch.tensor([[0., 0., 1., 1.], [0.1, 0.2, 0.7, 0.9], [0.3, 0., 1., 0.6], [0., 0., 1., 1.]]), \
        torch.tensor([False, True, False, True])
    configs = [((1, 1), torch.float32, None), ((5, 5), torch.float32, classes_per_sample),
               ((3, 3), torch.float16, None)]
    alone, together = ([HeatmapBuffer(3, 3, size, dtype, classes_per_sample=k) for size, dtype, k in configs]
                       for _ in range(2))
    arguments = [(maps.mean((2, 3), keepdim=True), None, None), (maps, boxes, flips), (maps, boxes, flips)]
    for buffer, (rows, row_boxes, row_flips) in zip(alone, arguments):
        buffer.write(index, rows, row_boxes, row_flips, momentum=0.6, keep=keep)
    write_ema([buffer.prepare_write(index, rows, row_boxes, row_flips, keep=keep)
               for buffer, (rows, row_boxes, row_flips) in zip(together, arguments)], momentum=0.6)
    for expected, actual in zip(alone, together):
        for (name, value), other in zip(expected.state_dict().items(), actual.state_dict().values()):
            torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-6, msg=name)


def test_bad_input_raises_before_any_write():
    buf = _buffer()
    maps, flip = torch.zeros(1, 3, 2, 2), torch.tensor([False])
    with pytest.raises(IndexError, match='Sample index 4 at batch row 0'):
        buf.write(torch.tensor([4]), maps, FULL, flip, 0.9)
    with pytest.raises(IndexError, match='Sample index -1'):
        buf.read(torch.tensor([-1]), FULL, flip, (2, 2))
    with pytest.raises(ValueError, match='Crop box'):
        buf.write(torch.tensor([0]), maps, torch.tensor([[0.5, 0., 0.5, 1.]]), flip, 0.9)
    with pytest.raises(ValueError, match='Crop box'):
        buf.write(torch.tensor([0]), maps, torch.tensor([[-0.1, 0., 0.5, 1.]]), flip, 0.9)
    with pytest.raises(ValueError, match='Expected maps'):
        buf.write(torch.tensor([0]), torch.zeros(1, 5, 2, 2), FULL, flip, 0.9)
    assert not buf.seen.any()


def test_non_finite_rows_are_skipped_and_counted():
    buf = _buffer(size=(2, 2))
    maps = torch.ones(2, 3, 2, 2)
    maps[1, 0, 0, 0] = float('nan')
    buf.write(torch.tensor([0, 1]), maps, FULL.expand(2, 4), torch.zeros(2, dtype=torch.bool), 0.9)
    assert int(buf.skipped_rows) == 1 and buf.seen[0].all() and not buf.seen[1].any()


def test_state_dict_round_trip_is_bit_exact():
    buf = HeatmapBuffer(5, 3, (4, 4))
    buf.write(torch.arange(3), torch.randn(3, 3, 2, 2), torch.tensor([[0., 0., 1., 1.], [0.2, 0.1, 0.9, 0.8], [0.5, 0.5, 1., 1.]]),
              torch.tensor([False, True, False]), 0.9)
    other = HeatmapBuffer(5, 3, (4, 4))
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.maps, buf.maps) and torch.equal(other.seen, buf.seen)
    assert buf.maps.dtype == torch.float16 and buf.memory_bytes()['maps'] == 5 * 3 * 16 * 2


def test_top_k_mode_keeps_the_positive_and_top_scores():
    buf = HeatmapBuffer(2, 6, (2, 2), dtype=torch.float32, classes_per_sample=2)
    maps = torch.arange(6.).view(1, 6, 1, 1).expand(1, 6, 2, 2).clone()
    positives = torch.tensor([[1., 0, 0, 0, 0, 0]])
    buf.write(torch.tensor([0]), maps, FULL, torch.tensor([False]), 0.9, positives=positives)
    assert sorted(buf.class_ids[0].tolist()) == [0, 5]
    read, valid = buf.read(torch.tensor([0]), FULL, torch.tensor([False]), (2, 2))
    assert valid[0, [0, 5]].all() and not valid[0, 1:5].any()
    torch.testing.assert_close(read[0, 5], torch.full((2, 2), 5.))
    assert HeatmapBuffer.dense_bytes(1_281_167, 1000, classes_per_sample=8) < 1.2e9
    assert HeatmapBuffer.dense_bytes(82_783, 80) == 82_783 * 80 * 49 * 2 + 82_783 * 49 + 8
