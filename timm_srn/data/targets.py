"""Packed targets: labels plus sample index and crop geometry in one float tensor.

timm's training loop calls `loss_fn(output, target)` with a tensor target moved by `.to(device)`,
so the per-sample information the spatial consistency loss needs travels inside the target:

    [labels (C)..., index_hi, index_lo, x0, y0, x1, y1, flip]

The index is split base 2**16 into two float32 fields, each exact, so indices stay exact up to
2**40 (float32 alone is exact only to 2**24). The box is the crop in [0, 1] coordinates of the
original image and `flip` marks a horizontal flip applied after the crop.
"""
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch

__all__ = [
    'PackedTarget', 'pack_target', 'unpack_target', 'unpack_observed', 'invalid_box_rows', 'NUM_PACKED_FIELDS', 'FULL_BOX']

NUM_PACKED_FIELDS = 7
FULL_BOX = (0., 0., 1., 1.)
_INDEX_BASE = 2 ** 16


class PackedTarget(NamedTuple):
    labels: torch.Tensor  # (B, C) observed labels
    index: Optional[torch.Tensor]  # (B,) int64 dataset indices, None for plain targets
    boxes: Optional[torch.Tensor]  # (B, 4) crop boxes (x0, y0, x1, y1) in [0, 1]
    flips: Optional[torch.Tensor]  # (B,) bool, horizontal flip after the crop
    host: Optional[Any] = None  # the same PackedTarget on the CPU, already validated (`unpack_observed`)


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


def invalid_box_rows(boxes: torch.Tensor) -> torch.Tensor:
    """(B,) bool: boxes that are not finite, outside [0, 1] or empty (x1 <= x0 or y1 <= y0)."""
    outside = ~torch.isfinite(boxes).all(1) | ((boxes < 0) | (boxes > 1)).any(1)
    return outside | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def _first_row(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0])


def _check_packed_fields(extra: torch.Tensor) -> None:
    """Reject packed fields that would address the wrong sample or a wrong region: index halves that are not
    integers in [0, 2**16) (a fraction or an out-of-range low half aliases another sample), non-finite or
    invalid boxes, flips other than 0 / 1. One host sync when everything is valid."""
    hi, lo, boxes, flips = extra[:, 0], extra[:, 1], extra[:, 2:6], extra[:, 6]
    bad_index = ~torch.isfinite(hi) | ~torch.isfinite(lo) | (hi != hi.floor()) | (lo != lo.floor()) | \
        (hi < 0) | (hi >= _INDEX_BASE ** 2) | (lo < 0) | (lo >= _INDEX_BASE)
    bad_box = invalid_box_rows(boxes)
    bad_flip = (flips != 0) & (flips != 1)
    if not bool((bad_index | bad_box | bad_flip).any()):
        return
    if bad_index.any():
        row = _first_row(bad_index)
        raise ValueError(
            f'Packed target row {row}: index fields (hi={hi[row].item()}, lo={lo[row].item()}) are not an exact '
            f'sample index (integers, 0 <= lo < {_INDEX_BASE}): pack targets with timm_srn.data.pack_target.')
    if bad_box.any():
        row = _first_row(bad_box)
        raise ValueError(
            f'Packed target row {row}: crop box {boxes[row].tolist()} must be finite, lie in [0, 1] and have '
            f'x1 > x0 and y1 > y0.')
    row = _first_row(bad_flip)
    raise ValueError(f'Packed target row {row}: flip field is {flips[row].item()}, expected 0 or 1.')


def unpack_target(target: torch.Tensor, num_classes: int) -> PackedTarget:
    """Split a (B, C) plain or (B, C + 7) packed target; packed fields are validated (see `_check_packed_fields`)."""
    packed = _split(target, num_classes)
    if packed.index is not None:
        _check_packed_fields(target[:, num_classes:].float())
    return packed


def _split(target: torch.Tensor, num_classes: int) -> PackedTarget:
    """`unpack_target` without the value checks: shapes only, no host synchronisation."""
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


def unpack_observed(
        output: torch.Tensor, target: torch.Tensor, needs_index: bool, criterion_name: str) -> PackedTarget:
    """`unpack_target` for single-positive criteria: float 0/1 observed labels, and the sample index when the
    criterion keeps per-sample state. Soft labels mean Mixup/CutMix, which mixes samples: rejected. Non-finite
    logits raise `FloatingPointError` naming the rows (and sample indices), before the criterion changes any
    state: a NaN loss is never returned silently.

    Every check reads one host copy of the target and of which logit rows are finite: a single GPU
    synchronisation per call. That copy, validated, is returned as `host` for the criterion's own checks."""
    if output.ndim != 2:
        raise ValueError(f'{criterion_name} expects (batch, classes) logits, got shape {tuple(output.shape)}.')
    num_classes = output.shape[1]
    packed = _split(target, num_classes)
    if len(target) != len(output):
        raise ValueError(f'{criterion_name}: {len(output)} rows of logits but {len(target)} rows of targets.')
    finite_rows = torch.isfinite(output.detach()).all(1, keepdim=True)
    host = torch.cat([target.detach().float(), finite_rows.float()], dim=1).cpu()
    host_packed = unpack_target(host[:, :-1], num_classes)
    nonfinite = host[:, -1] == 0
    if bool(nonfinite.any()):
        rows = nonfinite.nonzero()[:, 0].tolist()
        samples = f' (dataset indices {host_packed.index[rows].tolist()[:8]})' if packed.index is not None else ''
        raise FloatingPointError(
            f'{criterion_name}: non-finite logits (NaN or Inf) in batch rows {rows[:8]}{samples}. The model diverged '
            f'or overflowed (lower the learning rate, or use --amp bf16 instead of fp16); no state was updated.')
    if not torch.all((host_packed.labels == 0) | (host_packed.labels == 1)):
        raise ValueError(
            'Targets are soft (values other than 0 and 1): Mixup/CutMix mix samples and cannot be combined with '
            'per-sample buffers or single-positive labels. Disable mixup/cutmix for this criterion.')
    if needs_index and packed.index is None:
        raise ValueError(
            f'{criterion_name} keeps per-sample state and needs targets packed with the sample index (packed targets '
            'from timm_srn.data.pack_target / PackedTargetDataset); got plain (batch, classes) targets.')
    return packed._replace(labels=packed.labels.float(), host=host_packed)
