"""Datasets by name for the training and evaluation scripts: one place maps names to folder layouts."""
from pathlib import Path
from typing import Callable, Optional

from .datasets import CocoDataset, CsvDataset, csv_label_names, MultiLabelDataset, NpyDataset, RealDataset, VocDataset
from .synthetic import generate_synthetic_coco

__all__ = ['DATASET_NAMES', 'create_dataset', 'DEFAULT_SYNTHETIC_DIR']

DATASET_NAMES = ('synthetic', 'coco', 'voc2007', 'voc2012', 'nuswide', 'cub', 'imagenet-real', 'csv')
DEFAULT_SYNTHETIC_DIR = Path('data') / 'synthetic'
SYNTHETIC_SIZES = {'train': (2000, 0), 'val': (500, 1)}  # (images, seed)


def _voc_root(root: Path, year: str) -> Path:
    for candidate in (root / 'VOCdevkit' / f'VOC{year}', root / f'VOC{year}', root):
        if (candidate / 'ImageSets').exists():
            return candidate
    return root


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        transform: Optional[Callable] = None,
        synthetic_image_size: int = 160,
        **kwargs,
) -> MultiLabelDataset:
    """A dataset by name and split ('train' or 'val'). Layouts under `root`:

    - synthetic: generated on first use (2000 train / 500 val scenes) as COCO json + JPEGs.
    - coco: {train,val}2014/ and annotations/instances_{train,val}2014.json.
    - voc2007: VOCdevkit/VOC2007 (train = trainval, val = test); voc2012: VOCdevkit/VOC2012 (train / val).
    - nuswide, cub: formatted_{train,val}_{images,labels}.npy with image paths relative to root.
    - imagenet-real: val/ (ILSVRC2012_val_*.JPEG) and real.json; evaluation only.
    - csv: {train,val}.csv (columns image, labels) with image paths relative to root; the class list of every
      split is classes.txt (one name a line) if present, else the sorted labels of train.csv.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset '{name}'; choose from {', '.join(DATASET_NAMES)}.")
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    if name == 'synthetic':
        root = Path(root or DEFAULT_SYNTHETIC_DIR)
        ann_file = root / 'annotations' / f'instances_{split}.json'
        if not ann_file.exists():
            num_images, seed = SYNTHETIC_SIZES[split]
            generate_synthetic_coco(root, num_images, synthetic_image_size, seed=seed, split=split)
        return CocoDataset(root / split, ann_file, transform, **kwargs)
    if root is None:
        raise ValueError(f"Dataset '{name}' needs --data-dir pointing at its files.")
    root = Path(root)
    if name == 'coco':
        return CocoDataset(root / f'{split}2014', root / 'annotations' / f'instances_{split}2014.json', transform, **kwargs)
    if name == 'voc2007':
        return VocDataset(_voc_root(root, '2007'), 'trainval' if split == 'train' else 'test', transform, **kwargs)
    if name == 'voc2012':
        return VocDataset(_voc_root(root, '2012'), split, transform, **kwargs)
    if name in ('nuswide', 'cub'):
        return NpyDataset(root, kwargs.pop('image_root', root), split, transform=transform, **kwargs)
    if name == 'imagenet-real':
        if split == 'train':
            raise ValueError('imagenet-real holds ReaL validation labels only: use it for evaluation.')
        return RealDataset(root / 'val', root / 'real.json', transform=transform, **kwargs)
    # one class list for every split: classes.txt (one name a line) if present, else the labels of train.csv
    classes_file = root / 'classes.txt'
    label_names = [l.strip() for l in classes_file.read_text().splitlines() if l.strip()] if classes_file.exists() \
        else csv_label_names(root / 'train.csv')
    return CsvDataset(root, root / f'{split}.csv', label_names=kwargs.pop('label_names', label_names),
                      transform=transform, **kwargs)
