"""Bad data and bad targets: refused with a message naming the problem, before any state changes."""
import numpy as np
import pytest
import torch
from PIL import Image

from timm_srn.data import CsvDataset, create_dataset, find_unreadable, pack_target, unpack_target
from timm_srn.losses import SpatialConsistencyLoss, create_single_positive_loss

C = 4


def _write_csv(path, rows):
    path.write_text('image,labels\n' + ''.join(f'{image},{labels}\n' for image, labels in rows))


def _image(path, mode='RGB', value=128):
    Image.new(mode, (8, 8), value).save(path)


def test_csv_splits_share_one_class_list(tmp_path):
    for name in ('a.png', 'b.png', 'c.png'):
        _image(tmp_path / name)
    _write_csv(tmp_path / 'train.csv', [('a.png', 'cat;dog'), ('b.png', 'zebra')])
    _write_csv(tmp_path / 'val.csv', [('c.png', 'zebra')])  # 'cat' and 'dog' absent from val
    train = create_dataset('csv', tmp_path, 'train')
    val = create_dataset('csv', tmp_path, 'val')
    assert train.label_names == val.label_names == ['cat', 'dog', 'zebra']
    assert val.targets.tolist() == [[0, 0, 1]]  # zebra stays in column 2, not column 0
    _write_csv(tmp_path / 'val.csv', [('c.png', 'zebra;okapi')])
    with pytest.raises(ValueError, match=r"val.csv, row 2 \(c.png\): label 'okapi' is not in the class list"):
        create_dataset('csv', tmp_path, 'val')
    (tmp_path / 'classes.txt').write_text('okapi\nzebra\ncat\ndog\n')  # an explicit list wins
    assert create_dataset('csv', tmp_path, 'val').label_names == ['okapi', 'zebra', 'cat', 'dog']


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    path = tmp_path / 'deep.png'
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(path)  # 32896 / 65535 * 255 = 128
    assert Image.open(path).mode.startswith('I')
    _write_csv(tmp_path / 'train.csv', [('deep.png', 'x')])
    image = CsvDataset(tmp_path, tmp_path / 'train.csv').load_image(0)
    assert image.mode == 'RGB' and np.asarray(image).min() == np.asarray(image).max() == 128
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / 'float.tiff')
    _write_csv(tmp_path / 'train.csv', [('float.tiff', 'x')])
    with pytest.raises(OSError, match=r'float.tiff.*floating-point image'):
        CsvDataset(tmp_path, tmp_path / 'train.csv').load_image(0)


def test_truncated_images_found_up_front_and_skipped(tmp_path):
    _image(tmp_path / 'good.jpg')
    Image.new('RGB', (64, 64), 'red').save(tmp_path / 'full.jpg')
    data = (tmp_path / 'full.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
    found = find_unreadable([tmp_path / 'good.jpg', tmp_path / 'cut.jpg', tmp_path / 'gone.jpg'], progress=False)
    assert [(row, path.name) for row, path, _ in found] == [(1, 'cut.jpg'), (2, 'gone.jpg')]
    _write_csv(tmp_path / 'train.csv', [('good.jpg', 'x'), ('cut.jpg', 'x')])
    dataset = CsvDataset(tmp_path, tmp_path / 'train.csv', skip_unreadable=True)
    assert len(dataset) == 1 and dataset.num_skipped == 1 and dataset.samples[0].name == 'good.jpg'


def _target(index=0, box=(0., 0., 1., 1.), flip=False):
    return pack_target(torch.eye(C)[index % C], index, box, flip)[None]


@pytest.mark.parametrize('column,value,message', [
    (C, 0.5, r'index fields \(hi=0.5'),             # non-integer high half
    (C + 1, 2.5, r'index fields .*lo=2.5'),        # index 2.5
    (C + 1, 65536 + 3, 'index fields'),           # low half aliasing index 65539 onto hi=0
    (C + 1, -1, 'index fields'),
    (C + 2, float('nan'), r'crop box \[nan'),
    (C + 4, float('inf'), 'crop box'),
    (C + 6, float('nan'), 'flip field is nan'),
    (C + 6, 0.5, 'flip field is 0.5'),
])
def test_packed_targets_that_would_address_the_wrong_sample_are_refused(column, value, message):
    target = _target(3)
    target[0, column] = value
    with pytest.raises(ValueError, match=f'Packed target row 0: {message}'):
        unpack_target(target, C)


def _criterion(**kwargs):
    return SpatialConsistencyLoss(num_samples=8, num_classes=C, heatmap_dtype=torch.float32, **kwargs)


class _FixedMaps:
    """Stands in for an attached model: the heatmaps its latest forward produced."""

    def __init__(self, maps):
        self.maps = maps

    def latest(self):
        return self.maps

    def remove(self):
        pass


def _state(criterion):
    return {k: v.clone() for k, v in criterion.state_dict().items()}


@pytest.mark.parametrize('case', ['bad_box', 'empty_box', 'sliver_box', 'mis_shaped_maps', 'index_outside',
                                  'nan_logits', 'inf_maps'])
def test_a_bad_batch_changes_no_state_and_is_reported_even_during_warmup(case):
    """Shapes raise at the call; values are found on the device (no host sync in the step): the batch changes no
    state and `raise_if_invalid` (train.py calls it after every step) names the row."""
    criterion = _criterion(warmup_epochs=5)  # warm-up: no reads, only writes
    criterion._source = _FixedMaps(torch.rand(2, C, 3, 3))
    logits, target = torch.randn(2, C), torch.cat([_target(0), _target(1, (0.1, 0.1, 0.9, 0.9), True)])
    criterion(logits, target)
    before = _state(criterion)
    if case == 'bad_box':
        target = torch.cat([_target(2), _target(3)])
        target[1, C + 2:C + 6] = torch.tensor([0.6, 0.2, 0.4, 0.9])  # x1 < x0
        error, message = ValueError, 'row 1: crop box'
    elif case == 'empty_box':
        target = torch.cat([_target(2), _target(3, (0.3, 0.2, 0.3, 0.9))])  # zero width
        error, message = ValueError, 'row 1: crop box'
    elif case == 'sliver_box':  # a subnormal width: refused on the device and named on the host alike
        target = torch.cat([_target(2), _target(3, (0., 0.2, 1e-39, 0.9))])
        error, message = ValueError, 'row 1: crop box'
    elif case == 'mis_shaped_maps':
        criterion._source = _FixedMaps(torch.rand(2, C + 1, 3, 3))
        error, message = ValueError, r'Expected maps \(2, 4, h, w\)'
    elif case == 'index_outside':
        target = torch.cat([_target(2), _target(9)])
        error, message = IndexError, 'Sample index 9 at batch row 1 is outside the buffer'
    elif case == 'nan_logits':
        logits = logits.clone()
        logits[1, 2] = float('nan')
        error, message = FloatingPointError, r'non-finite logits .* rows \[1\] \(dataset indices \[1\]\)'
    else:
        maps = torch.rand(2, C, 3, 3)
        maps[1, 0, 0, 0] = float('inf')
        criterion._source = _FixedMaps(maps)
        error, message = FloatingPointError, r'non-finite heatmaps .* rows \[1\]'
    with pytest.raises(error, match=message):
        criterion(logits, target)
        criterion.raise_if_invalid()
    for key, value in _state(criterion).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('name', ['role', 'll-cp', 'em-apl', 'spatial'])
def test_every_single_positive_loss_with_state_refuses_nan_logits(name):
    criterion = create_single_positive_loss(name, 8, C)
    if name == 'spatial':
        criterion._source = _FixedMaps(torch.rand(2, C, 3, 3))
    logits = torch.randn(2, C)
    logits[0, 0] = float('inf')
    with pytest.raises(FloatingPointError, match=r'non-finite logits \(NaN or Inf\) in batch rows \[0\]'):
        criterion(logits, torch.cat([_target(0), _target(1)]))
        getattr(criterion, 'raise_if_invalid', lambda: None)()


def test_stateless_losses_return_the_non_finite_loss_they_compute():
    """AN keeps no state and checks nothing on the device: non-finite logits give a non-finite loss."""
    logits = torch.randn(2, C)
    logits[0, 0] = float('inf')
    assert not torch.isfinite(create_single_positive_loss('an', 8, C)(logits, torch.cat([_target(0), _target(1)])))
