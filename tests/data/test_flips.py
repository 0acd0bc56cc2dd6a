"""Horizontal flips keep labels true: box-recomputed relations, swapped classes, refused unknowns."""
import numpy as np
import pytest
from timm.data import create_transform

from timm_srn.data import (
    INVARIANT, ClassSwapFlip, CsvDataset, PackedTargetDataset, create_dataset, protocol_split, unpack_target)
from timm_srn.data.synthetic import SYNTHETIC_LABEL_NAMES

BALL, DOG, LEFT = (SYNTHETIC_LABEL_NAMES.index(n) for n in ('ball', 'dog', 'ball left of dog'))
KITE, HOUSE, ABOVE = (SYNTHETIC_LABEL_NAMES.index(n) for n in ('kite', 'house', 'kite above house'))


def _labels_from_boxes(boxes: np.ndarray, flipped: bool) -> np.ndarray:
    """The scenes' labels written out by hand from (column, x0, y0, x1, y1) boxes, mirrored if `flipped`."""
    boxes = boxes.copy()
    if flipped:
        boxes[:, [1, 3]] = 1 - boxes[:, [3, 1]]
    labels = np.zeros(len(SYNTHETIC_LABEL_NAMES), dtype=np.float32)
    objects = {int(b[0]): b[1:] for b in boxes if b[0] < ABOVE}  # one box per object class in these scenes
    labels[list(objects)] = 1
    if BALL in objects and DOG in objects:
        (bx0, by0, bx1, by1), (dx0, dy0, dx1, dy1) = objects[BALL], objects[DOG]
        labels[LEFT] = float(bx0 + bx1 < dx0 + dx1 and by0 < dy1 and dy0 < by1)
    if KITE in objects and HOUSE in objects:
        (kx0, ky0, kx1, ky1), (hx0, hy0, hx1, hy1) = objects[KITE], objects[HOUSE]
        labels[ABOVE] = float(ky0 + ky1 < hy0 + hy1 and kx0 < hx1 and hx0 < kx1)
    return labels


def _always_flip():
    return create_transform(64, is_training=True, hflip=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))


def test_flipped_training_targets_equal_labels_of_the_flipped_boxes(synthetic_dir):
    dataset = create_dataset('synthetic', synthetic_dir, 'train')
    samples = range(len(dataset))  # every training scene, each flipped
    assert all(np.array_equal(_labels_from_boxes(dataset.boxes[i], False), dataset.targets[i]) for i in samples)
    dataset.transform = _always_flip()
    changed = 0
    for index in samples:
        _, target = dataset[index]
        expected = _labels_from_boxes(dataset.boxes[index], True)
        assert np.array_equal(target.numpy(), expected), index
        changed += not np.array_equal(expected, dataset.targets[index])
    assert changed > 100  # 'ball left of dog' mirrored: these would have been wrong labels


def test_unflipped_samples_keep_their_labels(synthetic_dir):
    dataset = create_dataset('synthetic', synthetic_dir, 'train')
    dataset.transform = create_transform(64, is_training=True, hflip=0.0)
    assert all(np.array_equal(dataset[i][1].numpy(), dataset.targets[i]) for i in range(50))


def test_single_positive_packed_targets_follow_the_flip(synthetic_dir):
    train, _, observed, _ = protocol_split(create_dataset('synthetic', synthetic_dir, 'train'))
    packed = PackedTargetDataset(train, _always_flip(), observed)
    rows = [i for i in range(len(train)) if observed[i, LEFT] == 1][:20]
    assert rows
    for index in rows + list(range(40)):
        _, target = packed[index]
        labels = unpack_target(target[None], len(SYNTHETIC_LABEL_NAMES)).labels[0].numpy()
        truth = _labels_from_boxes(train.boxes[index], True)
        assert np.all(labels <= truth), index  # an observed positive always holds in the flipped image
        assert np.array_equal(labels[:LEFT], observed[index][:LEFT]), index  # objects: unchanged
        assert labels[LEFT] == observed[index][LEFT] * truth[LEFT]


def test_real_datasets_are_flip_invariant(synthetic_dir):
    # the synthetic files are real COCO json: read as 'coco' data their (object) labels are declared invariant
    from timm_srn.data import CocoDataset
    dataset = CocoDataset(synthetic_dir / 'train', synthetic_dir / 'annotations' / 'instances_train.json')
    assert dataset.label_flip is INVARIANT
    dataset.transform = _always_flip()
    assert np.array_equal(dataset[3][1].numpy(), dataset.targets[3])


def _csv(root, hflip=None):
    from PIL import Image
    for name in ('a.jpg', 'b.jpg'):
        Image.new('RGB', (8, 8)).save(root / name)
    (root / 'train.csv').write_text('image,labels\na.jpg,cat;left\nb.jpg,right\n')
    if hflip is not None:
        (root / 'hflip.txt').write_text(hflip)
    return root


def test_csv_without_declaration_refuses_flips_with_one_clear_line(tmp_path):
    dataset = CsvDataset(_csv(tmp_path), tmp_path / 'train.csv')
    dataset.transform = create_transform(32, is_training=True, hflip=0.0)  # no flip: fine
    with pytest.raises(ValueError, match=r'does not declare what a horizontal flip does.*--hflip 0.*hflip.txt'):
        dataset.transform = _always_flip()
    dataset.transform = None
    with pytest.raises(ValueError, match='does not declare'):
        PackedTargetDataset(dataset, _always_flip())


def test_csv_class_swap_declaration(tmp_path):
    dataset = create_dataset('csv', _csv(tmp_path, 'left;right\n'), 'train')
    assert isinstance(dataset.label_flip, ClassSwapFlip)
    dataset.transform = _always_flip()
    names = dataset.label_names
    _, target = dataset[0]
    assert {names[i] for i in np.flatnonzero(target.numpy())} == {'cat', 'right'}
    with pytest.raises(ValueError, match=r"hflip.txt:1: expected 'A;B'.*unknown: \['up'\]"):
        create_dataset('csv', _csv(tmp_path, 'left;up\n'), 'train')


def test_train_refuses_hflip_for_undeclared_data_before_any_work(tmp_path, train_script, capsys):
    root = tmp_path / 'data'
    root.mkdir()
    _csv(root)
    (root / 'val.csv').write_text('image,labels\na.jpg,cat\n')
    with pytest.raises(SystemExit):
        train_script.main(['--dataset', 'csv', '--data-dir', str(root), '--output', str(tmp_path / 'out'),
                           '--model', 'test_resnet', '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error: --hflip 0.5: dataset csv: the dataset does not declare'), err
    assert not (tmp_path / 'out' / 'metrics.jsonl').exists()
