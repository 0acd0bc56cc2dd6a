"""The single-positive protocol of the benchmark (Cole et al. 2021) shared by the peers.

- `sample_single_positive`: a RandomState(seed) per split; for each image in file order one of its positives,
  chosen uniformly. Rule for images with no positive: they keep no observed label (an all-zero row) and are
  counted in the result.
- `split_train_val`: 20% of the official train set becomes a fully labelled validation split (seed 1200).
"""
import os
from pathlib import Path
from typing import NamedTuple, Tuple, Union

import numpy as np

__all__ = ['SinglePositive', 'sample_single_positive', 'split_train_val', 'save_observed_labels', 'load_observed_labels']


class SinglePositive(NamedTuple):
    labels: np.ndarray  # (N, C) float32 with exactly one 1 per row (none for images without positives)
    num_without_positive: int


def sample_single_positive(labels: np.ndarray, seed: int = 1200) -> SinglePositive:
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.float32)
    missing = 0
    for i, row in enumerate(labels):
        positives = np.flatnonzero(row == 1)
        if len(positives) == 0:
            missing += 1
            continue
        observed[i, rng.choice(positives)] = 1.
    return SinglePositive(observed, missing)


def split_train_val(num_images: int, val_fraction: float = 0.2, seed: int = 1200) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), both sorted, from a RandomState(seed) permutation."""
    order = np.random.RandomState(seed).permutation(num_images)
    num_val = int(round(val_fraction * num_images))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def save_observed_labels(path: Union[str, Path], labels: np.ndarray) -> None:
    """Write atomically (temporary file + rename): a concurrent reader never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'wb') as f:
        np.save(f, np.asarray(labels, dtype=np.float32))
    os.replace(tmp, path)


def load_observed_labels(path: Union[str, Path], num_images: int, num_classes: int) -> np.ndarray:
    labels = np.load(path, allow_pickle=False)
    if labels.shape != (num_images, num_classes):
        raise ValueError(f'{path}: observed labels have shape {labels.shape}, expected ({num_images}, {num_classes}).')
    return labels
