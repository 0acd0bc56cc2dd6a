"""Training transforms that record their crop box and flip, and a dataset that packs them into targets."""
import random
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from .flips import require_label_flip
from .targets import FULL_BOX, pack_target

__all__ = ['GeometryRecordingTransform', 'PackedTargetDataset', 'horizontal_flip_prob']

Geometry = Tuple[Tuple[float, float, float, float], bool]


def _steps(transform: Callable) -> list:
    return list(getattr(transform, 'transforms', [transform]))


def _flip_step(steps: list) -> Optional[T.RandomHorizontalFlip]:
    return next((s for s in steps if isinstance(s, T.RandomHorizontalFlip)), None)


def horizontal_flip_prob(transform: Optional[Callable]) -> float:
    """Probability that `transform` (a timm / torchvision Compose, or a recording wrapper) flips horizontally."""
    if transform is None:
        return 0.
    if isinstance(transform, GeometryRecordingTransform):
        return transform.flip_prob
    flip = _flip_step(_steps(transform))
    return flip.p if flip is not None else 0.


class GeometryRecordingTransform:
    """Wraps a timm training transform: its RandomResizedCrop and horizontal flip are applied here with
    their parameters recorded; every other step of the timm transform runs unchanged.

    Returns (tensor, ((x0, y0, x1, y1), flip)) with the box in [0, 1] coordinates of the original image.
    A transform without RandomResizedCrop (evaluation) records the full image box.
    """

    def __init__(self, timm_transform: Callable):
        steps = _steps(timm_transform)
        self.crop = next((s for s in steps if isinstance(s, (RandomResizedCropAndInterpolation, T.RandomResizedCrop))), None)
        flip = _flip_step(steps)
        self.flip_prob = flip.p if flip is not None else 0.
        self.rest = T.Compose([s for s in steps if s is not self.crop and s is not flip])

    def __call__(self, img: Image.Image) -> Tuple[Any, Geometry]:
        box = FULL_BOX
        if self.crop is not None:
            img_w, img_h = TF.get_image_size(img)
            top, left, height, width = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
            interpolation = self.crop.interpolation
            if isinstance(interpolation, (list, tuple)):
                interpolation = random.choice(interpolation)
            size = self.crop.size if isinstance(self.crop.size, (list, tuple)) else (self.crop.size, self.crop.size)
            img = TF.resized_crop(img, top, left, height, width, list(size), interpolation)
            box = (left / img_w, top / img_h, (left + width) / img_w, (top + height) / img_h)
        flip = random.random() < self.flip_prob
        if flip:
            img = TF.hflip(img)
        return self.rest(img), (box, flip)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(crop={self.crop}, flip_prob={self.flip_prob}, rest={self.rest})'


class PackedTargetDataset(torch.utils.data.Dataset):
    """Yields (image, packed target) for per-sample criteria: the dataset index, the crop box and flip
    recorded by `GeometryRecordingTransform`, and the observed labels (e.g. single positives).

    Assigning `dataset.transform = t` (as timm's `create_loader` does) wraps `t` in a
    `GeometryRecordingTransform`, the pattern of timm's AugMixDataset, so the geometry keeps being recorded.
    A flipped image gets the wrapped dataset's `flipped_labels` (observed labels never gain a positive).

    Args:
        dataset: A timm_srn dataset returning (PIL image, multi-hot target); its own transform must be None.
        transform: A timm transform (wrapped in `GeometryRecordingTransform`), or None to assign one later.
        observed_labels: (N, C) labels to train on instead of the dataset's (single-positive protocol).
    """

    def __init__(self, dataset, transform: Optional[Callable] = None, observed_labels: Optional[np.ndarray] = None):
        if getattr(dataset, 'transform', None) is not None:
            raise ValueError('PackedTargetDataset applies the transform itself: create the dataset with transform=None.')
        if observed_labels is not None and len(observed_labels) != len(dataset):
            raise ValueError(
                f'observed_labels has {len(observed_labels)} rows but the dataset has {len(dataset)} images.')
        self.dataset = dataset
        self.transform = transform
        self.observed_labels = observed_labels

    @property
    def transform(self) -> Optional[GeometryRecordingTransform]:
        return self._transform

    @transform.setter
    def transform(self, transform: Optional[Callable]) -> None:
        if transform is not None and not isinstance(transform, GeometryRecordingTransform):
            transform = GeometryRecordingTransform(transform)
        require_label_flip(self.dataset, horizontal_flip_prob(transform))
        self._transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # label_names, targets, mask, num_classes ... of the wrapped dataset
        if name.startswith('_') or name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Tuple[Any, torch.Tensor]:
        if self._transform is None:
            raise RuntimeError('PackedTargetDataset has no transform: assign one (timm\'s create_loader does).')
        img, labels = self.dataset[index]
        if self.observed_labels is not None:
            labels = self.observed_labels[index]
        img, (box, flip) = self._transform(img)
        if flip:
            labels = self.dataset.flipped_labels(index, labels, observed=self.observed_labels is not None)
        return img, pack_target(labels, index, box, flip)
