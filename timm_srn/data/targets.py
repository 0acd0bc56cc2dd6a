"""Packed targets: labels plus sample index and crop geometry in one float tensor.

timm's training loop calls `loss_fn(output, target)` with a tensor target moved by `.to(device)`,
so the per-sample information the spatial consistency loss needs travels inside the target:

    [labels (C)..., index_hi, index_lo, x0, y0, x1, y1, flip]

The index is split base 2**16 into two float32 fields, each exact, so indices stay exact up to
2**40 (float32 alone is exact only to 2**24). The box is the crop in [0, 1] coordinates of the
original image and `flip` marks a horizontal flip applied after the crop.
"""
from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = ['PackedTarget', 'pack_target', 'unpack_target', 'unpack_observed', 'NUM_PACKED_FIELDS', 'FULL_BOX']

NUM_PACKED_FIELDS = 7
FULL_BOX = (0., 0., 1., 1.)
_INDEX_BASE = 2 ** 16


class PackedTarget(NamedTuple):
    labels: torch.Tensor  # (B, C) observed labels
    index: Optional[torch.Tensor]  # (B,) int64 dataset indices, None for plain targets
    boxes: Optional[torch.Tensor]  # (B, 4) crop boxes (x0, y0, x1, y1) in [0, 1]
    flips: Optional[torch.Tensor]  # (B,) bool, horizontal flip after the crop


def pack_target(
        labels: Union[torch.Tensor, Sequence[float]],
        index: int,
        box: Sequence[float] = FULL_BOX,
        flip: bool = False,
) -> torch.Tensor:
    """One sample's float32 target `[labels..., index_hi, index_lo, x0, y0, x1, y1, flip]`."""
    index = int(index)
    if not 0 <= index < _INDEX_BASE ** 2 * _INDEX_BASE:
        raise ValueError(f'Sample index {index} is outside [0, 2**48).')
    labels = torch.as_tensor(labels, dtype=torch.float32).flatten()
    extra = torch.tensor([index // _INDEX_BASE, index % _INDEX_BASE, *box, float(flip)], dtype=torch.float32)
    return torch.cat([labels, extra])


def unpack_target(target: torch.Tensor, num_classes: int) -> PackedTarget:
    """Split a (B, C) plain or (B, C + 7) packed target."""
    if target.ndim != 2:
        raise ValueError(f'Expected a (batch, classes) target, got shape {tuple(target.shape)}.')
    width = target.shape[1]
    if width == num_classes:
        return PackedTarget(target, None, None, None)
    if width != num_classes + NUM_PACKED_FIELDS:
        raise ValueError(
            f'Target has {width} columns; expected {num_classes} (plain labels) or '
            f'{num_classes + NUM_PACKED_FIELDS} (labels packed with index and crop geometry by pack_target).')
    extra = target[:, num_classes:].float()
    index = extra[:, 0].long() * _INDEX_BASE + extra[:, 1].long()
    return PackedTarget(target[:, :num_classes], index, extra[:, 2:6], extra[:, 6] > 0.5)


def unpack_observed(target: torch.Tensor, num_classes: int, needs_index: bool, criterion_name: str) -> PackedTarget:
    """`unpack_target` for single-positive criteria: float 0/1 observed labels, and the sample index when the
    criterion keeps per-sample state. Soft labels mean Mixup/CutMix, which mixes samples: rejected."""
    packed = unpack_target(target, num_classes)
    labels = packed.labels.float()
    if not torch.all((labels == 0) | (labels == 1)):
        raise ValueError(
            'Targets are soft (values other than 0 and 1): Mixup/CutMix mix samples and cannot be combined with '
            'per-sample buffers or single-positive labels. Disable mixup/cutmix for this criterion.')
    if needs_index and packed.index is None:
        raise ValueError(
            f'{criterion_name} keeps per-sample state and needs targets packed with the sample index (packed targets '
            'from timm_srn.data.pack_target / PackedTargetDataset); got plain (batch, classes) targets.')
    return packed._replace(labels=labels)
