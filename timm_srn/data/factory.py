"""Datasets by name for the training and evaluation scripts: one place maps names to folder layouts."""
from pathlib import Path
from typing import Callable, Optional, Union

from .datasets import CocoDataset, CsvDataset, csv_label_names, MultiLabelDataset, NpyDataset, RealDataset, VocDataset
from .geometry import PackedTargetDataset
from .single_positive import protocol_split
from .synthetic import SYNTHETIC_LABEL_NAMES, generate_synthetic_coco, synthetic_label_flip

__all__ = ['DATASET_NAMES', 'create_dataset', 'DEFAULT_SYNTHETIC_DIR']

DATASET_NAMES = ('synthetic', 'coco', 'voc2007', 'voc2012', 'nuswide', 'cub', 'imagenet-real', 'csv')
DEFAULT_SYNTHETIC_DIR = Path('data') / 'synthetic'
SYNTHETIC_SIZES = {'train': (2000, 0), 'val': (500, 1)}  # (images, seed)
# timm's split names and ours -> the folder split ('test' is the official validation set)
SPLIT_NAMES = {'train': 'train', 'training': 'train', 'validation': 'val', 'val': 'val', 'eval': 'val', 'test': 'val'}


def _voc_root(root: Path, year: str) -> Path:
    for candidate in (root / 'VOCdevkit' / f'VOC{year}', root / f'VOC{year}', root):
        if (candidate / 'ImageSets').exists():
            return candidate
    return root


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'validation',
        search_split: bool = True,
        class_map: Optional[dict] = None,
        load_bytes: bool = False,
        is_training: bool = False,
        download: bool = False,
        batch_size: int = 1,
        num_samples: Optional[int] = None,
        seed: int = 42,
        repeats: int = 0,
        input_img_mode: str = 'RGB',
        trust_remote_code: bool = False,
        transform: Optional[Callable] = None,
        single_positive: bool = False,
        synthetic_image_size: int = 160,
        **kwargs,
) -> Union[MultiLabelDataset, PackedTargetDataset]:
    """A dataset by name and split, with the signature of `timm.data.create_dataset` so that swapping the import
    in timm's train.py is the only change for data. Splits: 'train' / 'training'; 'validation' / 'val' / 'eval' /
    'test' (the official validation set). timm's reader options that do not apply to these formats (search_split,
    is_training, batch_size, seed, trust_remote_code, input_key, target_key) are accepted and ignored; options
    that would change the data (class_map, load_bytes, a mode other than RGB, repeats, num_samples, download of
    non-synthetic data) raise.

    With `single_positive=True` the protocol applies (80/20 split of official train, one observed positive per
    training image, seed 1200): 'train' gives a `PackedTargetDataset` of the 80% (transform assigned later, e.g.
    by timm's `create_loader`), 'validation' the fully labelled 20%, 'test' the official validation set.

    Layouts under `root`:

    - synthetic: generated on first use (2000 train / 500 val scenes) as COCO json + JPEGs.
    - coco: {train,val}2014/ and annotations/instances_{train,val}2014.json.
    - voc2007: VOCdevkit/VOC2007 (train = trainval, val = test); voc2012: VOCdevkit/VOC2012 (train / val).
    - nuswide, cub: formatted_{train,val}_{images,labels}.npy with image paths relative to root.
    - imagenet-real: val/ (ILSVRC2012_val_*.JPEG) and real.json; evaluation only.
    - csv: {train,val}.csv (columns image, labels) with image paths relative to root; the class list of every
      split is classes.txt (one name a line) if present, else the sorted labels of train.csv; hflip.txt (one
      'A;B' pair of classes that swap under a horizontal flip per line) declares flips safe, else they are refused.

    Every dataset declares what a horizontal flip does to its labels (`label_flip`): the synthetic scenes
    recompute 'ball left of dog' from the flipped boxes; COCO, VOC, NUS-WIDE, CUB and ImageNet are unchanged.
    """
    for option, value, default in (('class_map', class_map, None), ('load_bytes', load_bytes, False),
                                   ('input_img_mode', input_img_mode, 'RGB'), ('repeats', repeats, 0),
                                   ('num_samples', num_samples, None)):
        if value not in (default, '', {}):
            raise ValueError(f'{option}={value!r} is not supported by timm_srn datasets.')
    if download and name != 'synthetic':
        raise ValueError(f"Dataset '{name}' cannot be downloaded: place its files under root ({root}).")
    for ignored in ('input_key', 'target_key'):
        kwargs.pop(ignored, None)
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}.")
    if not single_positive or split == 'test':
        return _create(name, root, SPLIT_NAMES[split], transform, synthetic_image_size, **kwargs)
    # the protocol draws both its splits from the official train set
    if SPLIT_NAMES[split] == 'train':
        train, _, observed, _ = protocol_split(_create(name, root, 'train', None, synthetic_image_size, **kwargs))
        return PackedTargetDataset(train, transform, observed)
    return protocol_split(_create(name, root, 'train', transform, synthetic_image_size, **kwargs))[1]


def _create(name: str, root: Optional[str], split: str, transform: Optional[Callable], synthetic_image_size: int,
            **kwargs) -> MultiLabelDataset:
    """A dataset by name and split ('train' or 'val')."""
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset '{name}'; choose from {', '.join(DATASET_NAMES)}.")
    if name == 'synthetic':
        root = Path(root or DEFAULT_SYNTHETIC_DIR)
        ann_file = root / 'annotations' / f'instances_{split}.json'
        if not ann_file.exists():
            num_images, seed = SYNTHETIC_SIZES[split]
            generate_synthetic_coco(root, num_images, synthetic_image_size, seed=seed, split=split)
        return CocoDataset(root / split, ann_file, transform, label_flip=synthetic_label_flip(SYNTHETIC_LABEL_NAMES),
                           **kwargs)
    if root is None:
        raise ValueError(f"Dataset '{name}' needs --data-dir pointing at its files.")
    root = Path(root)
    if name == 'coco':
        return CocoDataset(root / f'{split}2014', root / 'annotations' / f'instances_{split}2014.json', transform, **kwargs)
    if name == 'voc2007':
        return VocDataset(_voc_root(root, '2007'), 'trainval' if split == 'train' else 'test', transform, **kwargs)
    if name == 'voc2012':
        # the single-positive benchmark's VOC 2012: images with at least one positive (Cole et al.)
        return VocDataset(_voc_root(root, '2012'), split, transform, **dict(dict(keep_without_positive=False), **kwargs))
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
    hflip_file = root / 'hflip.txt'
    return CsvDataset(root, root / f'{split}.csv', label_names=kwargs.pop('label_names', label_names),
                      transform=transform, hflip_file=hflip_file if hflip_file.exists() else None, **kwargs)
