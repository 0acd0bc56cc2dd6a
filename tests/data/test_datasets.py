"""Datasets in their real formats (tiny files built here), single positives and synthetic scenes."""
import json

import numpy as np
import pytest
from PIL import Image

from timm_srn.data import (
    VOC_LABEL_NAMES, CocoDataset, CsvDataset, MultiLabelDataset, NpyDataset, RealDataset, VocDataset,
    generate_synthetic_coco, load_observed_labels, protocol_split, sample_single_positive, save_observed_labels,
    split_train_val)
from timm_srn.data.synthetic import CATEGORY_IDS, SYNTHETIC_LABEL_NAMES


def _image(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, (10, 20, 30)).save(path)


def test_synthetic_coco_is_deterministic_and_read_by_pycocotools(tmp_path):
    image_dir, ann = generate_synthetic_coco(tmp_path / 'a', num_images=40, image_size=96, seed=3)
    _, ann_b = generate_synthetic_coco(tmp_path / 'b', num_images=40, image_size=96, seed=3)
    assert ann.read_text() == ann_b.read_text()
    ds = CocoDataset(image_dir, ann)
    assert ds.label_names == list(SYNTHETIC_LABEL_NAMES) and len(ds) == 40
    img, target = ds[0]
    assert img.size == (96, 96) and target.shape == (10,)
    # relation labels only where both objects are present
    kite, house, rel = (SYNTHETIC_LABEL_NAMES.index(n) for n in ('kite', 'house', 'kite above house'))
    assert np.all(ds.targets[:, rel] <= ds.targets[:, kite] * ds.targets[:, house])
    assert sorted(CATEGORY_IDS.values())[1] - sorted(CATEGORY_IDS.values())[0] == 2  # ids with gaps


def test_coco_keeps_or_drops_unannotated(tmp_path):
    _image(tmp_path / 'img' / 'a.jpg')
    _image(tmp_path / 'img' / 'b.jpg')
    ann = dict(images=[dict(id=1, file_name='a.jpg', width=20, height=16), dict(id=2, file_name='b.jpg', width=20, height=16)],
               annotations=[dict(id=1, image_id=1, category_id=90, bbox=[0, 0, 2, 2], area=4, iscrowd=0)],
               categories=[dict(id=90, name='toothbrush'), dict(id=1, name='person')])
    (tmp_path / 'ann.json').write_text(json.dumps(ann))
    ds = CocoDataset(tmp_path / 'img', tmp_path / 'ann.json')
    # columns in the file's category order, as the benchmark's format_coco.py
    assert len(ds) == 1 and ds.label_names == ['toothbrush', 'person'] and ds.targets.tolist() == [[1., 0.]]
    assert len(CocoDataset(tmp_path / 'img', tmp_path / 'ann.json', keep_unannotated=True)) == 2


def test_coco_rows_in_the_benchmark_order(tmp_path):
    ids = (9, 10, 100, 2)
    for i in ids:
        _image(tmp_path / 'img' / f'{i}.jpg')
    ann = dict(images=[dict(id=i, file_name=f'{i}.jpg', width=20, height=16) for i in ids],
               annotations=[dict(id=n, image_id=i, category_id=1, bbox=[0, 0, 2, 2], area=4, iscrowd=0)
                            for n, i in enumerate(ids, 1)],
               categories=[dict(id=1, name='person')])
    (tmp_path / 'ann.json').write_text(json.dumps(ann))
    ds = CocoDataset(tmp_path / 'img', tmp_path / 'ann.json')
    assert [p.stem for p in ds.samples] == ['10', '100', '2', '9']  # image ids compared as text
    with pytest.raises(FileNotFoundError, match='COCO annotation file not found'):
        CocoDataset(tmp_path / 'img', tmp_path / 'missing.json')


def _voc(root):
    main = root / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    for name in VOC_LABEL_NAMES:
        values = {'aeroplane': ['1', '0'], 'dog': ['-1', '1']}.get(name, ['-1', '-1'])
        (main / f'{name}_val.txt').write_text(f'000001 {values[0]}\n000002 {values[1]}\n')
    for i in ('000001', '000002'):
        _image(root / 'JPEGImages' / f'{i}.jpg')


@pytest.mark.parametrize('difficult,plane_2,mask_2', [('negative', 0, True), ('positive', 1, True), ('ignore', 0, False)])
def test_voc_difficult_modes(tmp_path, difficult, plane_2, mask_2):
    _voc(tmp_path)
    ds = VocDataset(tmp_path, 'val', difficult=difficult)
    assert ds.targets[0, 0] == 1 and ds.targets[1, 0] == plane_2 and ds.mask[1, 0] == mask_2
    assert ds.targets[1, VOC_LABEL_NAMES.index('dog')] == 1


def test_voc2012_benchmark_rows_keep_images_with_a_positive_in_id_order(tmp_path):
    main = tmp_path / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    rows = {'000003': '1', '000001': '0', '000002': '-1'}  # 000001: difficult only; 000002: no object of any class
    for name in VOC_LABEL_NAMES:
        text = ''.join(f'{i} {v if name == "cat" else "-1"}\n' for i, v in rows.items())
        (main / f'{name}_train.txt').write_text(text)
    for i in rows:
        _image(tmp_path / 'JPEGImages' / f'{i}.jpg')
    everything = VocDataset(tmp_path, 'train')
    assert [p.stem for p in everything.samples] == ['000001', '000002', '000003']
    benchmark = VocDataset(tmp_path, 'train', keep_without_positive=False)  # what create_dataset('voc2012') uses
    assert [p.stem for p in benchmark.samples] == ['000003']


def test_voc_bad_line_names_file(tmp_path):
    _voc(tmp_path)
    (tmp_path / 'ImageSets' / 'Main' / 'cat_val.txt').write_text('000001 2\n')
    with pytest.raises(ValueError, match=r'cat_val.txt:1'):
        VocDataset(tmp_path, 'val')


def test_npy_real_csv(tmp_path):
    for i in range(3):
        _image(tmp_path / 'images' / f'{i}.jpg')
    np.save(tmp_path / 'formatted_train_images.npy', np.array([f'{i}.jpg' for i in range(3)]))
    np.save(tmp_path / 'formatted_train_labels.npy', np.eye(3, dtype=np.float32))
    assert NpyDataset(tmp_path, tmp_path / 'images', 'train').targets.tolist() == np.eye(3).tolist()

    val = tmp_path / 'val'
    for i in range(1, 4):
        _image(val / f'ILSVRC2012_val_{i:08d}.JPEG')
    (tmp_path / 'real.json').write_text(json.dumps([[1, 5], [], [999]]))
    real = RealDataset(val, tmp_path / 'real.json')
    assert len(real) == 2 and real.num_excluded == 1 and real.targets[0, [1, 5]].tolist() == [1, 1]
    (tmp_path / 'bad.json').write_text(json.dumps([[1], [1000], [2]]))
    with pytest.raises(ValueError, match='label 1000 of ILSVRC2012_val_00000002.JPEG'):
        RealDataset(val, tmp_path / 'bad.json')

    (tmp_path / 'labels.csv').write_text('image,labels\n0.jpg,cat;dog\n1.jpg,dog\n')
    ds = CsvDataset(tmp_path / 'images', tmp_path / 'labels.csv')
    assert ds.label_names == ['cat', 'dog'] and ds.targets.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match=r"row 2 \(0.jpg\): label 'dog' is not in the class list"):
        CsvDataset(tmp_path / 'images', tmp_path / 'labels.csv', label_names=['cat'])


def test_missing_and_unreadable_images(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'bad.jpg').write_bytes(b'not an image')
    _image(tmp_path / 'images' / 'ok.jpg')
    (tmp_path / 'labels.csv').write_text('image,labels\nbad.jpg,a\nok.jpg,a\nmissing.jpg,a\n')
    ds = CsvDataset(tmp_path / 'images', tmp_path / 'labels.csv')
    with pytest.raises(OSError, match='Image 0 is unreadable: .*bad.jpg'):
        ds[0]
    with pytest.raises(FileNotFoundError, match='Image 2 not found: .*missing.jpg'):
        ds[2]
    skipped = CsvDataset(tmp_path / 'images', tmp_path / 'labels.csv', skip_unreadable=True)
    assert len(skipped) == 1 and skipped.num_skipped == 2
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        CsvDataset(tmp_path / 'nope', tmp_path / 'labels.csv')


def _reference_observed(labels, seed):
    """The benchmark generator's rule, written out plainly: per row, shuffle the positive indices and observe the
    first, then shuffle the negative indices (observing none), all from one RandomState."""
    rng = np.random.RandomState(seed)
    picks = []
    for row in labels:
        positives, negatives = np.where(row == 1)[0], np.where(row != 1)[0]
        rng.shuffle(positives)
        rng.shuffle(negatives)
        picks.append(int(positives[0]) if len(positives) else None)
    return picks


def test_single_positive_protocol_equals_the_reference_generator(tmp_path):
    labels = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    result = sample_single_positive(labels, seed=1200)
    assert [np.flatnonzero(row).tolist() for row in result.labels] == [[0], [], [1], [0], [0]]
    assert result.num_without_positive == 1 and np.all(result.labels <= labels)
    rng = np.random.RandomState(0)
    for seed in (1200, 1, 7):
        random_labels = (rng.rand(300, 20) < 0.15).astype(np.float32)
        picks = [int(np.flatnonzero(row)[0]) if row.any() else None
                 for row in sample_single_positive(random_labels, seed=seed).labels]
        assert picks == _reference_observed(random_labels, seed)  # pick by pick
        # the negatives' shuffles matter: drawing positives alone gives other picks
        alone, draw = np.random.RandomState(seed), []
        for row in random_labels:
            positives = np.where(row == 1)[0]
            alone.shuffle(positives)
            draw.append(int(positives[0]) if len(positives) else None)
        assert draw != picks
    # split: head of the permutation is train, tail is val (RandomState(1200).permutation(10) = 9 4 6 1 8 5 2 0 7 3)
    train, val = split_train_val(10)
    assert train.tolist() == [0, 1, 2, 4, 5, 6, 8, 9] and val.tolist() == [3, 7]


def test_protocol_draws_over_the_whole_train_set_before_the_split(tmp_path):
    labels = (np.random.RandomState(3).rand(50, 6) < 0.3).astype(np.float32)
    base = MultiLabelDataset([tmp_path / f'{i}.jpg' for i in range(50)], labels, list('abcdef'))
    train, val, observed, missing = protocol_split(base)
    train_idx, val_idx = split_train_val(50)
    assert np.array_equal(observed, sample_single_positive(labels).labels[train_idx])
    assert np.array_equal(train.targets, labels[train_idx]) and np.array_equal(val.targets, labels[val_idx])
    assert missing == int((labels[train_idx].sum(1) == 0).sum())


def test_observed_label_files(tmp_path):
    labels = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 1], [1, 0, 0]])
    result = sample_single_positive(labels, seed=1200)
    save_observed_labels(tmp_path / 'obs.npy', result.labels)
    assert np.array_equal(load_observed_labels(tmp_path / 'obs.npy', labels), result.labels)
    with pytest.raises(ValueError, match=r'expected \(5, 3\)'):
        load_observed_labels(tmp_path / 'obs.npy', np.ones((5, 3)))
