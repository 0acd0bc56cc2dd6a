"""The single-positive protocol of the benchmark (Cole et al. 2021) shared by the peers.

Equal, draw for draw, to the public code that produced the published numbers (preproc/generate_observed_labels.py
and datasets.py of elijahcole/single-positive-multi-label):

- `sample_single_positive`: one RandomState(seed) for the whole official train set, before any split. For every
  row in file order, its positives are shuffled and the first is observed; its negatives are then shuffled too
  (none is observed), so the random stream advances exactly as the reference generator's. A row without positives
  observes nothing (an all-zero row) and is counted.
- `split_train_val`: a RandomState(seed) permutation; the first 80% (sorted) are train, the last 20% (sorted) the
  fully labelled validation split.
"""
from pathlib import Path
from typing import NamedTuple, Tuple, Union

import numpy as np

from ..checkpoint import write_atomic

__all__ = [
    'SinglePositive', 'sample_single_positive', 'split_train_val', 'protocol_split', 'save_observed_labels',
    'load_observed_labels']


class SinglePositive(NamedTuple):
    labels: np.ndarray  # (N, C) float32 with exactly one 1 per row (none for images without positives)
    num_without_positive: int


def sample_single_positive(labels: np.ndarray, seed: int = 1200) -> SinglePositive:
    """One observed positive per row of the (N, C) 0/1 `labels`, as the reference generator draws it."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.float32)
    missing = 0
    for i, row in enumerate(labels):
        positives = np.flatnonzero(row == 1)
        rng.shuffle(positives)
        if len(positives):
            observed[i, positives[0]] = 1.
        else:
            missing += 1
        rng.shuffle(np.flatnonzero(row != 1))  # the reference shuffles the negatives too (observing none of them)
    return SinglePositive(observed, missing)


def split_train_val(num_images: int, val_fraction: float = 0.2, seed: int = 1200) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), both sorted: the head and the tail of a RandomState(seed) permutation."""
    order = np.random.RandomState(seed).permutation(num_images)
    num_val = int(np.round(val_fraction * num_images))
    num_train = num_images - num_val
    return np.sort(order[:num_train]), np.sort(order[num_train:])


def protocol_split(dataset, seed: int = 1200):
    """The protocol on an official train set (a timm_srn dataset): (train subset, fully labelled val subset,
    observed labels of the train subset, images of the train subset without a positive). The positives are drawn
    over the whole official train set first, then split, as in the reference code."""
    train_idx, val_idx = split_train_val(len(dataset), seed=seed)
    observed = sample_single_positive(dataset.targets, seed=seed).labels[train_idx]
    num_without_positive = int((observed.sum(axis=1) == 0).sum())
    return dataset.subset(train_idx), dataset.subset(val_idx), observed, num_without_positive


def save_observed_labels(path: Union[str, Path], labels: np.ndarray) -> None:
    """Write atomically (`write_atomic`): a concurrent reader never sees a partial file."""
    write_atomic(path, lambda f: np.save(f, np.asarray(labels, dtype=np.float32)))


def load_observed_labels(path: Union[str, Path], true_labels: np.ndarray) -> np.ndarray:
    """Observed labels saved for the images whose full labels are `true_labels` (N, C). Labels saved for other data
    (another dataset, subset or class list) are refused: shape, 0/1 values, and every observed positive must be a
    true positive of its image."""
    true_labels = np.asarray(true_labels)
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable observed-label file ({e}).') from e
    if labels.shape != true_labels.shape:
        raise ValueError(f'{path}: observed labels have shape {labels.shape}, expected {true_labels.shape}: they were '
                         f'saved for other data. Use another output folder or delete the file.')
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f'{path}: observed labels must be 0 or 1.')
    wrong = np.argwhere((labels == 1) & (true_labels != 1))
    if len(wrong):
        row, column = wrong[0]
        raise ValueError(
            f'{path} is from another run: row {row} observes class {column}, which that image does not have '
            f'({len(wrong)} such rows). Use another output folder or delete the file.')
    return labels.astype(np.float32)
