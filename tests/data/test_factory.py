"""Datasets by name: each layout documented in create_dataset, for both splits."""
import json

import numpy as np
import pytest
from PIL import Image

from timm_srn.data import DATASET_NAMES, VOC_LABEL_NAMES, create_dataset


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (8, 8)).save(path)


def _coco(root):
    for split in ('train', 'val'):
        _image(root / f'{split}2014' / 'a.jpg')
        ann = dict(images=[dict(id=1, file_name='a.jpg', width=8, height=8)],
                   annotations=[dict(id=1, image_id=1, category_id=3, bbox=[0, 0, 1, 1], area=1, iscrowd=0)],
                   categories=[dict(id=3, name='car'), dict(id=1, name='person')])
        (root / 'annotations').mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / f'instances_{split}2014.json').write_text(json.dumps(ann))


def _voc(root, year, splits):
    voc = root / 'VOCdevkit' / f'VOC{year}'
    for split in splits:
        for name in VOC_LABEL_NAMES:
            path = voc / 'ImageSets' / 'Main' / f'{name}_{split}.txt'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{split}1 {'1' if name == 'cat' else '-1'}\n")
        _image(voc / 'JPEGImages' / f'{split}1.jpg')


def _npy(root):
    _image(root / 'img.jpg')
    for split in ('train', 'val'):
        np.save(root / f'formatted_{split}_images.npy', np.array(['img.jpg']))
        np.save(root / f'formatted_{split}_labels.npy', np.array([[0., 1., 1.]], dtype=np.float32))


def _real(root):
    _image(root / 'val' / 'ILSVRC2012_val_00000001.JPEG')
    (root / 'real.json').write_text(json.dumps([[7]]))


def _csv(root):
    _image(root / 'x.jpg')
    for split in ('train', 'val'):
        (root / f'{split}.csv').write_text('image,labels\nx.jpg,sky;sea\n')


@pytest.mark.parametrize('name,build,splits,expected', [
    ('coco', _coco, ('train', 'val'), [1., 0.]),  # the file's category order: car, person
    ('voc2007', lambda r: _voc(r, 2007, ('trainval', 'test')), ('train', 'val'), [float(n == 'cat') for n in VOC_LABEL_NAMES]),
    ('voc2012', lambda r: _voc(r, 2012, ('train', 'val')), ('train', 'val'), [float(n == 'cat') for n in VOC_LABEL_NAMES]),
    ('nuswide', _npy, ('train', 'val'), [0., 1., 1.]),
    ('cub', _npy, ('train', 'val'), [0., 1., 1.]),
    ('imagenet-real', _real, ('val',), None),
    ('csv', _csv, ('train', 'val'), [1., 1.]),
])
def test_create_dataset_by_name(tmp_path, name, build, splits, expected):
    build(tmp_path)
    for split in splits:
        dataset = create_dataset(name, tmp_path, split)
        assert len(dataset) == 1
        if expected is not None:
            assert dataset.targets[0].tolist() == expected
    if name == 'imagenet-real':
        assert dataset.targets[0, 7] == 1 and dataset.num_classes == 1000
        with pytest.raises(ValueError, match='evaluation'):
            create_dataset(name, tmp_path, 'train')


def test_factory_errors(tmp_path):
    assert set(DATASET_NAMES) == {'synthetic', 'coco', 'voc2007', 'voc2012', 'nuswide', 'cub', 'imagenet-real', 'csv'}
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        create_dataset('mnist', tmp_path)
    with pytest.raises(ValueError, match='needs --data-dir'):
        create_dataset('coco', None)
