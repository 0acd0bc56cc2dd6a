"""What a horizontal flip does to a dataset's labels, so that a flipped training image keeps true labels.

Every dataset declares a `label_flip`:
- `INVARIANT`: no class depends on left / right (COCO, VOC, NUS-WIDE, CUB and ImageNet objects and attributes);
- `ClassSwapFlip`: pairs of classes that trade places ('left of' <-> 'right of');
- `BoxRelationFlip`: classes recomputed from the flipped boxes (the built-in scenes' 'ball left of dog');
- None: unknown (a user's CSV without `hflip.txt`): flipping is refused with `require_label_flip`'s message.

Observed (single-positive) labels follow the same rule but never gain a positive: a recomputed class stays
observed only where it still holds in the flipped image.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ['LabelFlip', 'INVARIANT', 'ClassSwapFlip', 'BoxRelationFlip', 'flip_boxes', 'require_label_flip']

# a sample's boxes: (K, 5) float array of (column, x0, y0, x1, y1), coordinates in [0, 1] of the image
Boxes = np.ndarray
Relation = Callable[[Dict[int, np.ndarray]], bool]


def flip_boxes(boxes: Boxes) -> Boxes:
    """The same boxes in the horizontally flipped image (x -> 1 - x)."""
    flipped = np.array(boxes, dtype=np.float64).reshape(-1, 5)
    flipped[:, [1, 3]] = 1. - flipped[:, [3, 1]]
    return flipped


class LabelFlip:
    """Identity: flipping changes no label."""

    def __call__(self, labels: np.ndarray, boxes: Optional[Boxes] = None, observed: bool = False) -> np.ndarray:
        """Labels of the flipped image. `observed`: the labels are a partial observation (single positive)."""
        return labels

    def __repr__(self) -> str:
        return type(self).__name__


INVARIANT = LabelFlip()


class ClassSwapFlip(LabelFlip):
    """Columns that trade places under a flip, e.g. ('person left of car', 'person right of car')."""

    def __init__(self, pairs: Sequence[Tuple[int, int]], num_classes: int):
        self.permutation = np.arange(num_classes)
        for a, b in pairs:
            self.permutation[a], self.permutation[b] = b, a

    def __call__(self, labels, boxes=None, observed=False):
        return np.asarray(labels)[..., self.permutation]

    def __repr__(self) -> str:
        swapped = [(int(a), int(b)) for a, b in enumerate(self.permutation) if a < b]
        return f'ClassSwapFlip({swapped})'


class BoxRelationFlip(LabelFlip):
    """Classes defined by an arrangement of boxes, recomputed from the flipped boxes by their own rule.

    Args:
        relations: column -> rule(boxes by column) -> whether the class holds; every box of the sample is passed
            as {column: (M, 4) array}.
    """

    def __init__(self, relations: Dict[int, Relation]):
        self.relations = dict(relations)

    def __call__(self, labels, boxes=None, observed=False):
        if boxes is None:
            raise ValueError('BoxRelationFlip needs the sample\'s boxes to recompute its relation classes.')
        flipped = flip_boxes(boxes)
        by_column = {int(c): flipped[flipped[:, 0] == c, 1:] for c in np.unique(flipped[:, 0])}
        labels = np.array(labels, dtype=np.float32, copy=True)
        for column, holds in self.relations.items():
            value = float(holds(by_column))
            labels[column] = min(labels[column], value) if observed else value
        return labels

    def __repr__(self) -> str:
        return f'BoxRelationFlip(columns={sorted(self.relations)})'


def require_label_flip(dataset, flip_prob: float) -> None:
    """Refuse horizontal flips on a dataset that does not say what a flip does to its labels."""
    if flip_prob > 0 and getattr(dataset, 'label_flip', None) is None:
        raise ValueError(
            f'the dataset does not declare what a horizontal flip does to its labels (classes such as '
            f"'left of' would be corrupted): set hflip to 0 (train.py: --hflip 0), or declare it (CSV data: an "
            f"hflip.txt beside the CSV files, one 'A;B' pair of classes that swap per line, empty if none does).")
