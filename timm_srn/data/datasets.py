"""Multi-label datasets in their real on-disk formats, each returning (image, multi-hot float target).

Every dataset holds `samples` (image paths), `targets` (N, C) float32, `mask` (N, C) bool (False where a
label is ignored in evaluation: VOC 'difficult' in ignore mode) and `label_names`. Images are returned as
PIL images when `transform` is None, so timm transforms (or `PackedTargetDataset`) apply.
"""
import contextlib
import csv
import io
import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .flips import INVARIANT, ClassSwapFlip, LabelFlip, require_label_flip
from .geometry import GeometryRecordingTransform, horizontal_flip_prob
from .label_names import VOC_LABEL_NAMES

__all__ = ['find_unreadable', 'to_rgb', 'csv_label_names', 'MultiLabelDataset', 'CocoDataset', 'VocDataset', 'NpyDataset', 'RealDataset', 'CsvDataset']

_logger = logging.getLogger(__name__)


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB from any PIL mode. 16-bit greyscale (PNG 'I;16', or 'I' holding 0..65535) is scaled by
    255/65535 (PIL's own convert would clip it to white); other integer or float ranges are refused."""
    if img.mode.startswith('I;16') or img.mode == 'I':
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f'{path}: 32-bit integer image with values {values.min()}..{values.max()}; only 8- and '
                             f'16-bit images are supported.')
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    elif img.mode == 'F':
        raise ValueError(f'{path}: floating-point image (mode F) has no defined brightness range; convert it to '
                         f'8- or 16-bit first.')
    return img.convert('RGB')


def find_unreadable(paths: Sequence[Path], progress: bool = True) -> List[Tuple[int, Path, str]]:
    """(row, path, reason) of every image that cannot be fully decoded (missing, truncated, corrupt)."""
    unreadable = []
    for row, path in enumerate(tqdm(paths, desc='checking images', leave=False, disable=not progress)):
        try:
            with Image.open(path) as img:
                to_rgb(img, path).load()
        except (OSError, SyntaxError, ValueError) as e:
            unreadable.append((row, path, str(e)))
    return unreadable


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f'{what} not found: {path}')
    return path


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images + (N, C) multi-hot targets; the common base of every format.

    `label_flip` says what a horizontal flip does to the labels (`timm_srn.data.flips`); a training transform
    that flips is wrapped in a `GeometryRecordingTransform`, so every flipped image gets its flipped labels.
    `boxes` (optional, per sample (K, 5) arrays of column, x0, y0, x1, y1 in [0, 1]) feed box-based flip rules
    and localisation measurements.
    """

    def __init__(
            self,
            samples: Sequence[Path],
            targets: np.ndarray,
            label_names: Sequence[str],
            transform: Optional[Callable] = None,
            mask: Optional[np.ndarray] = None,
            skip_unreadable: bool = False,
            boxes: Optional[Sequence[np.ndarray]] = None,
            label_flip: Optional[LabelFlip] = INVARIANT,
    ):
        self.samples = [Path(s) for s in samples]
        self.targets = np.asarray(targets, dtype=np.float32)
        self.mask = np.ones_like(self.targets, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        self.label_names = list(label_names)
        self.boxes = None if boxes is None else list(boxes)
        self.label_flip = label_flip
        self.transform = transform
        self.num_skipped = 0
        if self.targets.shape != (len(self.samples), len(self.label_names)):
            raise ValueError(
                f'targets have shape {self.targets.shape}, expected ({len(self.samples)}, {len(self.label_names)}).')
        if self.boxes is not None and len(self.boxes) != len(self.samples):
            raise ValueError(f'boxes are given for {len(self.boxes)} images, expected {len(self.samples)}.')
        if skip_unreadable:
            self._drop_unreadable()

    @property
    def transform(self) -> Optional[Callable]:
        return self._transform

    @transform.setter
    def transform(self, transform: Optional[Callable]) -> None:
        """A flipping transform is checked against `label_flip` and, where labels can change, recorded."""
        flip_prob = horizontal_flip_prob(transform)
        require_label_flip(self, flip_prob)
        if flip_prob > 0 and self.label_flip is not INVARIANT and not isinstance(transform, GeometryRecordingTransform):
            transform = GeometryRecordingTransform(transform)
        self._transform = transform

    def flipped_labels(self, index: int, labels: np.ndarray, observed: bool = False) -> np.ndarray:
        """Labels of sample `index` once its image is flipped horizontally (`observed`: partial labels)."""
        require_label_flip(self, 1.)
        return self.label_flip(labels, None if self.boxes is None else self.boxes[index], observed=observed)

    def _drop_unreadable(self) -> None:
        unreadable = find_unreadable(self.samples)
        for _, path, reason in unreadable:
            _logger.warning(f'Skipping unreadable image {path}: {reason}')
        dropped = {row for row, _, _ in unreadable}
        keep = [i for i in range(len(self.samples)) if i not in dropped]
        self.num_skipped = len(unreadable)
        if self.num_skipped:
            _logger.warning(f'Skipped {self.num_skipped} unreadable images of {len(self.samples)}.')
        self.samples = [self.samples[i] for i in keep]
        self.targets, self.mask = self.targets[keep], self.mask[keep]
        if self.boxes is not None:
            self.boxes = [self.boxes[i] for i in keep]

    def subset(self, indices: Sequence[int]) -> 'MultiLabelDataset':
        """A dataset of the given rows (e.g. the single-positive protocol's train / val split)."""
        indices = list(indices)
        return MultiLabelDataset(
            [self.samples[i] for i in indices], self.targets[indices], self.label_names, self.transform,
            mask=self.mask[indices], boxes=None if self.boxes is None else [self.boxes[i] for i in indices],
            label_flip=self.label_flip)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index]
        try:
            with Image.open(path) as img:
                return to_rgb(img, path)
        except FileNotFoundError:
            raise FileNotFoundError(f'Image {index} not found: {path}') from None
        except (OSError, ValueError) as e:
            raise OSError(f'Image {index} is unreadable: {path} ({e}). Skip such files with skip_unreadable=True (train.py: --skip-unreadable).') from e

    def __getitem__(self, index: int) -> Tuple[object, torch.Tensor]:
        img, target = self.load_image(index), self.targets[index]
        if isinstance(self.transform, GeometryRecordingTransform):
            img, (_, flip) = self.transform(img)
            if flip:
                target = self.flipped_labels(index, target)
        elif self.transform is not None:
            img = self.transform(img)
        return img, torch.from_numpy(np.asarray(target, dtype=np.float32))


class CocoDataset(MultiLabelDataset):
    """COCO (2014) instances via pycocotools. Rows and columns follow the single-positive benchmark's formatting
    (format_coco.py of Cole et al.): images with at least one annotation, ordered by their id compared as text;
    categories in the order of the annotation file's category list (ascending id in the official files).

    Args:
        root: Image folder (e.g. train2014/).
        ann_file: instances_*.json.
        keep_unannotated: Keep images without annotations (all-negative); False is the peers' default.
        label_flip: What a horizontal flip does to the labels (COCO's objects: nothing).
    """

    def __init__(self, root, ann_file, transform=None, keep_unannotated: bool = False, skip_unreadable: bool = False,
                 label_flip: Optional[LabelFlip] = INVARIANT):
        from pycocotools.coco import COCO
        root = _require(Path(root), 'COCO image folder')
        ann_file = _require(Path(ann_file), 'COCO annotation file')
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(ann_file))
        cat_ids = coco.getCatIds()  # the file's order
        column = {cat_id: i for i, cat_id in enumerate(cat_ids)}
        samples, targets, boxes = [], [], []
        for image_id in sorted(coco.getImgIds(), key=str):  # text order, as the benchmark's formatting script
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
            if not anns and not keep_unannotated:
                continue
            info = coco.loadImgs(image_id)[0]
            target = np.zeros(len(cat_ids), dtype=np.float32)
            image_boxes = np.zeros((len(anns), 5))
            for row, ann in enumerate(anns):
                if ann['category_id'] not in column:
                    raise ValueError(f"{ann_file}: annotation {ann['id']} has unknown category_id {ann['category_id']}.")
                target[column[ann['category_id']]] = 1.
                x, y, w, h = ann.get('bbox') or (0, 0, info['width'], info['height'])
                image_boxes[row] = (column[ann['category_id']], x / info['width'], y / info['height'],
                                    (x + w) / info['width'], (y + h) / info['height'])
            samples.append(root / info['file_name'])
            targets.append(target)
            boxes.append(image_boxes)
        names = [coco.loadCats(c)[0]['name'] for c in cat_ids]
        super().__init__(samples, np.stack(targets) if targets else np.zeros((0, len(names))), names, transform,
                         skip_unreadable=skip_unreadable, boxes=boxes, label_flip=label_flip)


class VocDataset(MultiLabelDataset):
    """Pascal VOC 2007 / 2012 classification from ImageSets/Main/{class}_{split}.txt.

    Args:
        root: The VOC20XX folder (holding JPEGImages/ and ImageSets/Main/).
        split: 'train', 'val', 'trainval' or 'test'.
        difficult: How labels marked 0 (difficult) count: 'negative', 'positive' or 'ignore' (masked in evaluation).
        keep_without_positive: Keep images with no positive label (all their objects difficult). False is the
            single-positive benchmark's VOC 2012 rule (Cole et al.'s format_pascal.py); rows are in image id order.
    """

    DIFFICULT_MODES = ('negative', 'positive', 'ignore')

    def __init__(self, root, split: str = 'trainval', transform=None, difficult: str = 'negative',
                 skip_unreadable: bool = False, keep_without_positive: bool = True):
        if difficult not in self.DIFFICULT_MODES:
            raise ValueError(f'difficult must be one of {self.DIFFICULT_MODES}, got {difficult!r}.')
        root = _require(Path(root), 'VOC root')
        image_ids: Optional[List[str]] = None
        columns = []
        for name in VOC_LABEL_NAMES:
            path = _require(root / 'ImageSets' / 'Main' / f'{name}_{split}.txt', 'VOC image set file')
            ids, values = [], []
            for line_no, line in enumerate(path.read_text().split('\n'), 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or parts[1] not in ('1', '-1', '0'):
                    raise ValueError(f'{path}:{line_no}: expected "<image id> <1|-1|0>", got {line!r}.')
                ids.append(parts[0])
                values.append(int(parts[1]))
            if image_ids is None:
                image_ids = ids
            elif ids != image_ids:
                raise ValueError(f'{path} lists different images than {VOC_LABEL_NAMES[0]}_{split}.txt.')
            columns.append(values)
        raw = np.array(columns, dtype=np.int64).T
        order = sorted(range(len(image_ids)), key=lambda row: image_ids[row])
        if not keep_without_positive:
            order = [row for row in order if (raw[row] == 1).any()]
        raw, image_ids = raw[order], [image_ids[row] for row in order]
        targets = (raw == 1) | ((raw == 0) & (difficult == 'positive'))
        mask = (raw != 0) | (difficult != 'ignore')
        samples = [root / 'JPEGImages' / f'{i}.jpg' for i in image_ids]
        super().__init__(samples, targets, VOC_LABEL_NAMES, transform, mask=mask, skip_unreadable=skip_unreadable)


class NpyDataset(MultiLabelDataset):
    """NUS-WIDE / CUB in the single-positive benchmark's `formatted_{split}_{images,labels}.npy` convention.

    Args:
        root: Folder with the npy files.
        image_root: Folder the image paths in formatted_{split}_images.npy are relative to.
        split: 'train', 'val' or 'test'.
    """

    def __init__(self, root, image_root, split: str = 'train', label_names: Optional[Sequence[str]] = None,
                 transform=None, skip_unreadable: bool = False):
        root = Path(root)
        images = np.load(_require(root / f'formatted_{split}_images.npy', 'image list'), allow_pickle=False)
        labels = np.load(_require(root / f'formatted_{split}_labels.npy', 'label matrix'), allow_pickle=False)
        if len(images) != len(labels):
            raise ValueError(f'formatted_{split}_images.npy has {len(images)} rows but labels have {len(labels)}.')
        names = label_names or [f'class_{i}' for i in range(labels.shape[1])]
        super().__init__([Path(image_root) / str(p) for p in images], labels, names, transform,
                         skip_unreadable=skip_unreadable)


class RealDataset(MultiLabelDataset):
    """ImageNet-1K validation with the ReaL multi-label labels (a JSON list of label lists, in the order of
    the sorted ILSVRC2012_val_*.JPEG files). Images with an empty list are excluded from evaluation."""

    def __init__(self, root, real_json, label_names: Optional[Sequence[str]] = None, transform=None,
                 skip_unreadable: bool = False):
        root = _require(Path(root), 'ImageNet validation folder')
        labels = json.loads(_require(Path(real_json), 'ReaL labels file').read_text())
        files = sorted(root.glob('ILSVRC2012_val_*.JPEG'))
        if len(files) != len(labels):
            raise ValueError(f'{real_json} has {len(labels)} entries but {root} holds {len(files)} validation images.')
        num_classes = len(label_names) if label_names else 1000
        samples, targets = [], []
        for path, image_labels in zip(files, labels):
            if not image_labels:
                continue
            target = np.zeros(num_classes, dtype=np.float32)
            for label in image_labels:
                if not 0 <= label < num_classes:
                    raise ValueError(f'{real_json}: label {label} of {path.name} is outside 0..{num_classes - 1}.')
                target[label] = 1.
            samples.append(path)
            targets.append(target)
        self.num_excluded = len(files) - len(samples)
        super().__init__(samples, np.stack(targets), label_names or [str(i) for i in range(num_classes)], transform,
                         skip_unreadable=skip_unreadable)


def _read_csv_rows(csv_file) -> List[Tuple[str, List[str]]]:
    """(image, label names) of each row of a CsvDataset file."""
    with open(_require(Path(csv_file), 'CSV file'), newline='') as f:
        rows = list(csv.DictReader(f))
    if rows and not {'image', 'labels'} <= set(rows[0]):
        raise ValueError(f'{csv_file} needs the columns "image" and "labels", found {list(rows[0])}.')
    return [(row['image'], [l.strip() for l in (row['labels'] or '').split(';') if l.strip()]) for row in rows]


def csv_label_names(csv_file) -> List[str]:
    """The sorted label names used in a CsvDataset file: the class list every split of that data shares."""
    return sorted({label for _, labels in _read_csv_rows(csv_file) for label in labels})


class CsvDataset(MultiLabelDataset):
    """Users' own data: an image folder plus a CSV with columns `image` (path relative to root) and `labels`
    (label names separated by ';'). Label names come from `label_names` or, sorted, from the CSV; give every
    split the same `label_names` (e.g. `csv_label_names(train_csv)`) so their columns agree.

    What a horizontal flip does to the labels is unknown (flipping refused) unless `hflip_file` is given: one
    'A;B' pair of classes that swap under a flip per line, no line if no class depends on orientation."""

    def __init__(self, root, csv_file, label_names: Optional[Sequence[str]] = None, transform=None,
                 skip_unreadable: bool = False, hflip_file=None):
        root = _require(Path(root), 'image folder')
        parsed = _read_csv_rows(csv_file)
        names = list(label_names) if label_names else csv_label_names(csv_file)
        column = {name: i for i, name in enumerate(names)}
        targets = np.zeros((len(parsed), len(names)), dtype=np.float32)
        for i, (image, labels) in enumerate(parsed):
            for label in labels:
                if label not in column:
                    raise ValueError(f'{csv_file}, row {i + 2} ({image}): label {label!r} is not in the class list '
                                     f'({len(names)} labels: {", ".join(names[:10])}{"..." if len(names) > 10 else ""}).')
                targets[i, column[label]] = 1.
        label_flip = None if hflip_file is None else _read_hflip_file(Path(hflip_file), column)
        super().__init__([root / image for image, _ in parsed], targets, names, transform,
                         skip_unreadable=skip_unreadable, label_flip=label_flip)


def _read_hflip_file(path: Path, column: Dict[str, int]) -> ClassSwapFlip:
    """A CSV dataset's flip declaration: one 'A;B' pair of class names that swap per line."""
    pairs = []
    for line_no, line in enumerate(_require(path, 'flip declaration').read_text().splitlines(), 1):
        if not line.strip():
            continue
        names = [name.strip() for name in line.split(';')]
        unknown = [name for name in names if name not in column]
        if len(names) != 2 or unknown:
            raise ValueError(f"{path}:{line_no}: expected 'A;B' with two class names of the dataset, got {line!r}"
                             f"{f' (unknown: {unknown})' if unknown and len(names) == 2 else ''}.")
        pairs.append((column[names[0]], column[names[1]]))
    return ClassSwapFlip(pairs, len(column))
