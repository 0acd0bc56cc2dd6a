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
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'PackedTarget', 'pack_target', 'unpack_target', 'check_target_shape', 'unpack_observed', 'check_observed', 'PackedTargetCheck',
    'invalid_box_rows', 'NUM_PACKED_FIELDS', 'FULL_BOX', 'MIN_BOX_SIDE']

NUM_PACKED_FIELDS = 7
FULL_BOX = (0., 0., 1., 1.)
_INDEX_BASE = 2 ** 16
MIN_BOX_SIDE = torch.finfo(torch.float32).tiny  # a narrower crop (a subnormal width) scales its maps to infinity


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


def invalid_box_rows(boxes: torch.Tensor) -> torch.Tensor:
    """(B,) bool: float32 boxes that are not finite, outside [0, 1] or narrower than `MIN_BOX_SIDE` (x1 - x0 or
    y1 - y0; empty boxes included). `PackedTargetCheck` applies the same bounds on the device."""
    outside = ~torch.isfinite(boxes).all(1) | ((boxes < 0) | (boxes > 1)).any(1)
    return outside | ((boxes[:, 2:] - boxes[:, :2]) < MIN_BOX_SIDE).any(1)


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
            f'x1 - x0 and y1 - y0 of at least {MIN_BOX_SIDE:.3g}.')
    row = _first_row(bad_flip)
    raise ValueError(f'Packed target row {row}: flip field is {flips[row].item()}, expected 0 or 1.')


def unpack_target(target: torch.Tensor, num_classes: int) -> PackedTarget:
    """Split a (B, C) plain or (B, C + 7) packed target; packed fields are validated (see `_check_packed_fields`)."""
    packed = _split(target, num_classes)
    if packed.index is not None:
        _check_packed_fields(target[:, num_classes:].float())
    return packed


def _split(target: torch.Tensor, num_classes: int, fields: bool = True, geometry: bool = True) -> PackedTarget:
    """`unpack_target` without the value checks: shapes only, no host synchronisation. `fields=False`: the labels
    alone (index, boxes and flips left None); `geometry=False`: labels and index (boxes and flips left None)."""
    if target.ndim != 2:
        raise ValueError(f'Expected a (batch, classes) target, got shape {tuple(target.shape)}.')
    width = target.shape[1]
    if width == num_classes:
        return PackedTarget(target, None, None, None)
    if width != num_classes + NUM_PACKED_FIELDS:
        raise ValueError(
            f'Target has {width} columns; expected {num_classes} (plain labels) or '
            f'{num_classes + NUM_PACKED_FIELDS} (labels packed with index and crop geometry by pack_target).')
    if not fields:
        return PackedTarget(target.narrow(1, 0, num_classes), None, None, None)
    extra = target.narrow(1, num_classes, NUM_PACKED_FIELDS).float()
    halves = extra.narrow(1, 0, 2).long()
    index = torch.add(halves[:, 1], halves[:, 0], alpha=_INDEX_BASE)
    if not geometry:
        return PackedTarget(target.narrow(1, 0, num_classes), index, None, None)
    return PackedTarget(target.narrow(1, 0, num_classes), index, extra.narrow(1, 2, 4), extra[:, 6] > 0.5)


def check_target_shape(output: torch.Tensor, target: torch.Tensor, needs_index: bool, criterion_name: str) -> None:
    """The shape checks of `unpack_observed`, from tensor metadata alone (no device work)."""
    if output.ndim != 2:
        raise ValueError(f'{criterion_name} expects (batch, classes) logits, got shape {tuple(output.shape)}.')
    num_classes = output.shape[1]
    if target.ndim != 2:
        raise ValueError(f'Expected a (batch, classes) target, got shape {tuple(target.shape)}.')
    if target.shape[1] not in (num_classes, num_classes + NUM_PACKED_FIELDS):
        raise ValueError(
            f'Target has {target.shape[1]} columns; expected {num_classes} (plain labels) or '
            f'{num_classes + NUM_PACKED_FIELDS} (labels packed with index and crop geometry by pack_target).')
    if len(target) != len(output):
        raise ValueError(f'{criterion_name}: {len(output)} rows of logits but {len(target)} rows of targets.')
    if needs_index and target.shape[1] == num_classes:
        raise ValueError(
            f'{criterion_name} keeps per-sample state and needs targets packed with the sample index (packed targets '
            'from timm_srn.data.pack_target / PackedTargetDataset); got plain (batch, classes) targets.')


def unpack_observed(output: torch.Tensor, target: torch.Tensor, needs_index: bool, criterion_name: str,
                    geometry: bool = True) -> PackedTarget:
    """`unpack_target` for single-positive criteria, from shapes alone (`check_target_shape`): no device work beyond
    slicing and no host synchronisation (a training step stays capturable). Float observed labels, and the sample
    index when the criterion keeps per-sample state, with the boxes and flips unless `geometry` is False. Values are
    checked by `PackedTargetCheck` (on the device, inside the step) and described by `check_observed` (on the host)."""
    check_target_shape(output, target, needs_index, criterion_name)
    packed = _split(target, output.shape[1], fields=needs_index, geometry=geometry)
    return packed._replace(labels=packed.labels.float())


class PackedTargetCheck(nn.Module):
    """Whether a batch of packed targets holds only what `check_observed` accepts, and the sums it is given are
    finite, found on the device without synchronisation: labels of 0 / 1, index fields that make an exact index below
    `num_samples`, flips of 0 / 1, boxes in [0, 1] (with positive widths when `geometry`: the caller reads them) and
    finite sums of what enters the step (the loss, the maps). One table of bounds serves every column, the widths and the sums
    included: the batch passes when rounding its integer columns and clamping every column to its bounds changes
    nothing (NaN never compares equal, an infinite sum is clamped to the largest float, a width to `MIN_BOX_SIDE`,
    the bound of `invalid_box_rows`).
    A handful of kernels, whatever the batch; `check_observed` names the row."""

    def __init__(self, num_classes: int, num_samples: int, geometry: bool = True, num_sums: int = 1):
        super().__init__()
        self.num_classes, self.num_samples, self.geometry, self.num_sums = num_classes, num_samples, geometry, num_sums
        # columns: labels (C), index high and low halves, x0 y0 x1 y1, flip, [box width and height], the sums
        upper = [1.] * num_classes + [float((num_samples - 1) // _INDEX_BASE), _INDEX_BASE - 1., 1., 1., 1., 1., 1.]
        if num_samples <= _INDEX_BASE:  # the low half alone is the index: its bound is the exact one
            upper[num_classes + 1] = num_samples - 1.
        lower = [0.] * len(upper)
        widths = 2 if geometry else 0
        largest = torch.finfo(torch.float32).max
        upper += [1.] * widths + [largest] * num_sums
        lower += [MIN_BOX_SIDE] * widths + [-largest] * num_sums
        integer = [True] * (num_classes + 2) + [False] * 4 + [True] + [False] * (widths + num_sums)
        self.register_buffer('lower', torch.tensor(lower), persistent=False)
        self.register_buffer('upper', torch.tensor(upper), persistent=False)
        self.register_buffer('integer', torch.tensor(integer), persistent=False)

    def forward(self, target: torch.Tensor, index: torch.Tensor, *sums: torch.Tensor) -> torch.Tensor:
        """0-dim bool: every row passes and every one of the `num_sums` 0-dim `sums` is finite (a sum is finite when
        every value that enters it is). `index`: the rows' sample indices as unpacked (`unpack_observed`)."""
        if len(sums) != self.num_sums:
            raise ValueError(f'{type(self).__name__} was built for {self.num_sums} sums, got {len(sums)}.')
        values = target.float()
        columns = [values]
        if self.geometry:
            columns.append(values.narrow(1, self.num_classes + 4, 2) - values.narrow(1, self.num_classes + 2, 2))
        columns = torch.cat(columns + [value.float().expand(len(values), 1) for value in sums], dim=1)
        bounded = torch.where(self.integer, columns.round(), columns).clamp(self.lower, self.upper)
        passes = (bounded == columns).all()
        if self.num_samples > _INDEX_BASE:
            passes = passes & (index < self.num_samples).all()
        return passes


def check_observed(output: torch.Tensor, target: torch.Tensor, needs_index: bool, criterion_name: str,
                   num_samples: Optional[int] = None) -> PackedTarget:
    """`unpack_observed` plus every value check, on one host copy of the target and of which logit rows are finite
    (a GPU synchronisation): raises naming the first bad row. Soft labels mean Mixup/CutMix, which mixes samples;
    non-finite logits raise `FloatingPointError` naming the rows (and sample indices); an index outside
    [0, num_samples) raises `IndexError`. Returns the host copy, validated."""
    packed = unpack_observed(output, target, needs_index, criterion_name)
    num_classes = output.shape[1]
    finite_rows = torch.isfinite(output.detach()).all(1, keepdim=True)
    host = torch.cat([target.detach().float(), finite_rows.float()], dim=1).cpu()
    host_packed = unpack_target(host[:, :-1], num_classes)
    nonfinite = host[:, -1] == 0
    if bool(nonfinite.any()):
        rows = nonfinite.nonzero()[:, 0].tolist()
        samples = f' (dataset indices {host_packed.index[rows].tolist()[:8]})' if host_packed.index is not None else ''
        raise FloatingPointError(
            f'{criterion_name}: non-finite logits (NaN or Inf) in batch rows {rows[:8]}{samples}. The model diverged '
            f'or overflowed (lower the learning rate, or use --amp bf16 instead of fp16); no state was updated.')
    if not torch.all((host_packed.labels == 0) | (host_packed.labels == 1)):
        raise ValueError(
            'Targets are soft (values other than 0 and 1): Mixup/CutMix mix samples and cannot be combined with '
            'per-sample buffers or single-positive labels. Disable mixup/cutmix for this criterion.')
    if num_samples is not None and host_packed.index is not None:
        outside = (host_packed.index >= num_samples).nonzero()[:, 0]
        if len(outside):
            row = int(outside[0])
            raise IndexError(f'Sample index {int(host_packed.index[row])} at batch row {row} is outside the buffer '
                             f'[0, {num_samples}).')
    return host_packed
