"""Per-sample, per-class EMA heatmaps in the frame of the whole original image, keyed by dataset index.

Maps from a random crop are resampled (bilinear, `grid_sample` with align_corners=False) between the
crop's frame and the buffer frame using the crop box and flip. A buffer cell belongs to a crop when its
centre lies inside the crop box; only those cells are updated, and cells never seen are reported invalid.

Storage modes:
- dense (`classes_per_sample=None`): N x C x H x W in `dtype` (2 bytes per cell in float16).
- top-k (`classes_per_sample=K`): N x K x H x W plus the K class ids of each sample, fixed at the
  sample's first write (its observed positives first, then the highest-scoring classes). Classes outside
  a sample's set are never stored and always read as invalid. ImageNet-1K (1.28M x 1000 classes, 7x7)
  needs 126 GB dense but 1.0 GB with K=8.

Duplicate indices in one batch (repeated augmentation) are applied in batch order: the k-th occurrence
of an index is written after the (k-1)-th, as if they came in consecutive batches (in closed form, no loop).
Given `keep` (rows the caller validated on the device), read and write launch a fixed set of kernels and never
synchronise with the host, so a training step can be captured (CUDA graphs, torch.compile fullgraph).
Under torch.distributed every write is all-gathered and applied in rank order on every rank, so all
ranks hold identical contents, equal to one process fed the concatenated global batch.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.targets import FULL_BOX, MIN_BOX_SIDE, invalid_box_rows
from ..distributed import all_gather_rows, world_size

__all__ = ['CropFrames', 'EmaUpdate', 'HeatmapBuffer', 'RowGroups', 'StoredRows', 'crop_frames', 'crop_to_frame_grid',
           'frame_to_crop_grid', 'row_groups', 'write_ema']


_CELLS: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}
_EDGE = 1e-5  # a cell centre on a crop's edge lies inside it, whatever the rounding of the normalised coordinates


def _cells(size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """(h, w, 2) cell centres (x, y) of a size-(h, w) map in grid_sample's normalised coordinates ([-1, 1],
    align_corners=False); made once per size and device."""
    key = (*size, device)
    if key not in _CELLS:
        height, width = size
        x = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
        y = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
        _CELLS[key] = torch.stack(torch.meshgrid(x, y, indexing='xy'), -1)
    return _CELLS[key]


class CropFrames(NamedTuple):
    """Where each crop lies in the whole-image frame, as one affine map per row of normalised coordinates:
    frame = centre + crop * scale, with scale < 0 in x for a flipped crop. Made once per batch: both directions of
    resampling (`crop_to_frame_grid`, `frame_to_crop_grid`) use it."""
    centre: torch.Tensor  # (B, 1, 1, 2)
    scale: torch.Tensor  # (B, 1, 1, 2)


def crop_frames(boxes: torch.Tensor, flips: torch.Tensor) -> CropFrames:
    """`CropFrames` of crop boxes (B, 4) (x0, y0, x1, y1 in [0, 1]) and flips (B,): the crop's centre is
    x0 + x1 - 1 in normalised coordinates and its half-extent x1 - x0, negated in x when flipped."""
    boxes = boxes.float()
    lo, hi = boxes.narrow(1, 0, 2), boxes.narrow(1, 2, 2)
    extent = hi - lo
    flip_x = F.pad(flips.bool()[:, None], (0, 1))  # (flip, False) per row
    scale = torch.addcmul(extent, extent, flip_x, value=-2.)  # extent * (1 - 2 flip)
    return CropFrames((lo + hi - 1.).view(-1, 1, 1, 2), scale.view(-1, 1, 1, 2))


def crop_to_frame_grid(frames: CropFrames, size: Tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (B, h, w, 2) sampling the whole-image frame at the cell centres of each crop."""
    return torch.addcmul(frames.centre, _cells(size, frames.centre.device), frames.scale)


def frame_to_crop_grid(frames: CropFrames, size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """grid (B, H, W, 2) sampling each crop's maps at the buffer's cell centres, and the (B, H, W) mask
    of buffer cells whose centre lies inside the crop box (the inverse of `crop_to_frame_grid`)."""
    grid = (_cells(size, frames.centre.device) - frames.centre) / frames.scale
    return grid, (grid.abs() <= 1. + _EDGE).all(-1)


class StoredRows(NamedTuple):
    """The buffer rows of a batch, gathered once per step: the read and the write that follows share them."""
    maps: torch.Tensor  # (B, slots, H, W) float32
    seen: torch.Tensor  # (B, H, W) bool


class RowGroups(NamedTuple):
    """Rows of a batch holding the same sample (repeated augmentation), for the closed-form EMA of repeats."""
    same: torch.Tensor  # (B, B) bool: rows r and s hold one sample
    order: torch.Tensor  # (3, B, B) float: [s after r in r's group, s before r, s in r's group]


def row_groups(index: torch.Tensor) -> RowGroups:
    """`RowGroups` of a batch's sample indices (once per batch: every buffer written with them shares it)."""
    same = index.view(-1, 1) == index.view(1, -1)
    after = same.triu(1)
    return RowGroups(same, torch.stack([after, after.t(), same]).float())


class HeatmapBuffer(nn.Module):
    """EMA heatmaps for every training sample (see module docstring).

    Args:
        num_samples: Dataset size N; indices are 0..N-1.
        num_classes: C.
        size: (H, W) of the stored whole-image maps.
        dtype: Storage dtype (float16 default: 2 bytes per cell).
        device: Training device (the GPU when training on GPU).
        classes_per_sample: K for the top-k scale mode, None for dense storage.
    """

    def __init__(
            self,
            num_samples: int,
            num_classes: int,
            size: Tuple[int, int] = (7, 7),
            dtype: torch.dtype = torch.float16,
            device: Optional[torch.device] = None,
            classes_per_sample: Optional[int] = None,
    ):
        super().__init__()
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.size = tuple(size)
        self.classes_per_sample = classes_per_sample
        slots = classes_per_sample or num_classes
        self.register_buffer('maps', torch.zeros(num_samples, slots, *self.size, dtype=dtype, device=device))
        self.register_buffer('seen', torch.zeros(num_samples, *self.size, dtype=torch.bool, device=device))
        if classes_per_sample:
            if not 0 < classes_per_sample <= num_classes:
                raise ValueError(f'classes_per_sample must be in 1..{num_classes}, got {classes_per_sample}.')
            self.register_buffer('class_ids', torch.full(
                (num_samples, classes_per_sample), -1, dtype=torch.int32, device=device))
        else:
            self.class_ids = None
        self.register_buffer('skipped_rows', torch.zeros((), dtype=torch.int64, device=device))

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held per tensor and in total."""
        report = {name: t.numel() * t.element_size() for name, t in self.named_buffers()}
        report['total'] = sum(report.values())
        return report

    @classmethod
    def dense_bytes(cls, num_samples: int, num_classes: int, size=(7, 7), dtype=torch.float16, classes_per_sample=None) -> int:
        """Bytes a buffer of this configuration would hold, without allocating it (built on the meta device)."""
        return cls(num_samples, num_classes, size, dtype, 'meta', classes_per_sample).memory_bytes()['total']

    # --- validation: all before any indexing kernel, so bad input never becomes a device-side assert ---

    def validate(self, index: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                 maps: Optional[torch.Tensor] = None) -> None:
        """Raise on indices outside the buffer, invalid boxes or mis-shaped maps (callers validate before they
        change any state; `read` and `write` validate too)."""
        batch = index.shape[0]
        if index.ndim != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f'index must be a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}.')
        if boxes.shape != (batch, 4) or flips.shape != (batch,):
            raise ValueError(
                f'Expected boxes ({batch}, 4) and flips ({batch},), got {tuple(boxes.shape)} and {tuple(flips.shape)}.')
        if maps is not None and (maps.ndim != 4 or maps.shape[0] != batch or maps.shape[1] != self.num_classes):
            raise ValueError(
                f'Expected maps ({batch}, {self.num_classes}, h, w), got shape {tuple(maps.shape)}.')
        if batch == 0:
            return
        bad_index = (index < 0) | (index >= self.num_samples)
        bad_box = invalid_box_rows(boxes.float())
        if not bool((bad_index | bad_box).any()):
            return
        if bad_index.any():
            row = int(bad_index.nonzero()[0])
            raise IndexError(
                f'Sample index {int(index[row])} at batch row {row} is outside the buffer [0, {self.num_samples}).')
        row = int(bad_box.nonzero()[0])
        raise ValueError(
            f'Crop box {boxes[row].tolist()} at batch row {row} must be finite, lie in [0, 1] with x1 - x0 and y1 - y0 '
            f'of at least {MIN_BOX_SIDE:.3g}.')

    # --- read ---

    @torch.no_grad()
    def gather(self, index: torch.Tensor) -> StoredRows:
        """The rows of `index` as stored (maps in float32): one gather per step, shared by `read` and `write`
        (`stored=`). The caller has validated the index (`validate`, or a clamped index it refuses)."""
        return StoredRows(self.maps[index].float(), self.seen[index])

    @torch.no_grad()
    def read(
            self,
            index: torch.Tensor,
            boxes: Optional[torch.Tensor] = None,
            flips: Optional[torch.Tensor] = None,
            size: Optional[Tuple[int, int]] = None,
            checked: bool = False,
            frames: Optional[CropFrames] = None,
            stored: Optional[StoredRows] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stored maps resampled into each crop's frame: (maps (B, C, h, w) float32, valid (B, C, h, w) bool).
        `boxes` / `flips` None: the whole unflipped image, read as stored when `size` is the buffer's (the default).
        `checked`: the caller has validated index and boxes, or refuses the rows it has not and gives them an
        index inside the buffer (`validate` runs otherwise: one host synchronisation). `frames` / `stored`: the
        batch's `crop_frames` and `gather`, when the caller has them already."""
        size = tuple(size or self.size)
        if not checked:
            self.validate(index, *self._frame(index, boxes, flips))
        maps, seen = stored or self.gather(index)
        if boxes is not None or size != self.size:
            grid = crop_to_frame_grid(frames or crop_frames(*self._frame(index, boxes, flips)), size)
            sampled = F.grid_sample(torch.cat([maps, seen[:, None].float()], 1), grid, mode='bilinear',
                                    padding_mode='border', align_corners=False)
            maps, seen = sampled[:, :-1], sampled[:, -1] >= 1. - 1e-4  # every bilinear neighbour has been seen
        valid = seen[:, None].expand_as(maps)
        if self.class_ids is None:
            return maps, valid
        # top-k: slot k holds class class_ids[k]; untracked classes (-1) land in a spare column that is dropped
        ids = self.class_ids[index].long()
        columns = torch.where(ids >= 0, ids, self.num_classes)[:, :, None, None].expand_as(maps)
        full = maps.new_zeros(len(index), self.num_classes + 1, *size).scatter_(1, columns, maps)
        tracked = valid.new_zeros(len(index), self.num_classes + 1, *size).scatter_(1, columns, valid)
        return full[:, :-1], tracked[:, :-1]

    def _frame(self, index: torch.Tensor, boxes: Optional[torch.Tensor],
               flips: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(boxes, flips), the whole unflipped image where not given."""
        if boxes is None:
            boxes = index.new_tensor(FULL_BOX, dtype=torch.float32).expand(len(index), 4)
        if flips is None:
            flips = torch.zeros(len(index), dtype=torch.bool, device=index.device)
        return boxes, flips.bool()

    # --- write ---

    @torch.no_grad()
    def write(self, index: torch.Tensor, maps: torch.Tensor, boxes: Optional[torch.Tensor] = None,
              flips: Optional[torch.Tensor] = None, momentum: float = 0.5, **options) -> None:
        """EMA-update the buffer with crop maps (B, C, h, w): stored = momentum * stored + (1 - momentum) * new
        inside each crop box; cells seen for the first time take the new value. `boxes` / `flips` None: the maps
        cover the whole unflipped image. `options`: those of `prepare_write` (`write` is `write_ema` of one
        `prepare_write`; buffers written with one batch's rows can share one update that way)."""
        write_ema([self.prepare_write(index, maps, boxes, flips, **options)], momentum)

    @torch.no_grad()
    def prepare_write(
            self,
            index: torch.Tensor,
            maps: torch.Tensor,
            boxes: Optional[torch.Tensor] = None,
            flips: Optional[torch.Tensor] = None,
            class_scores: Optional[torch.Tensor] = None,
            positives: Optional[torch.Tensor] = None,
            keep: Optional[torch.Tensor] = None,
            groups: Optional[RowGroups] = None,
            frames: Optional[CropFrames] = None,
            stored: Optional[StoredRows] = None,
    ) -> 'EmaUpdate':
        """The `EmaUpdate` of `write` (its arguments, less the momentum), applied by `write_ema`. It changes nothing
        but the top-k class sets of samples written for the first time and the `skipped_rows` count.

        Rows with `keep` False write nothing; without `keep`, rows with non-finite maps write nothing and are counted
        in `skipped_rows`. `class_scores` / `positives` (B, C) choose a sample's classes in top-k mode at its first
        write (default scores: the maps' spatial mean). `keep` (B,) bool: the caller has validated the rows (finite
        maps included) on the device and keeps these (as `SpatialConsistencyLoss` does), giving refused rows an index
        inside the buffer: the call then runs no check and no host synchronisation. Without it, `validate` runs.
        Repeated samples are applied in batch order, computed in closed form (no loop over repeats). `groups`,
        `frames`, `stored`: the batch's `row_groups`, `crop_frames` and `gather` (before any write), when the caller
        has them already."""
        if keep is None:
            self.validate(index, *self._frame(index, boxes, flips), maps)
        gathered = self._gather(index, maps, boxes, flips, class_scores, positives, keep)
        if gathered[0] is not index:  # all ranks' rows: nothing the caller made for its own rows applies
            groups, frames, stored = None, None, None
        index, maps, boxes, flips, class_scores, positives, keep = gathered
        maps = maps.float()
        if keep is None:  # the caller checked nothing: rows with non-finite maps are skipped here and counted
            keep = (maps - maps).flatten(1).sum(1) == 0  # NaN for any non-finite value
            self.skipped_rows += (~keep).sum()
        if boxes is None and maps.shape[-2:] == self.size:
            current, region = maps, keep.view(-1, 1, 1).expand(-1, *self.size)
        else:
            grid, region = frame_to_crop_grid(frames or crop_frames(*self._frame(index, boxes, flips)), self.size)
            current = F.grid_sample(maps, grid, mode='bilinear', padding_mode='border', align_corners=False)
            region = region & keep.view(-1, 1, 1)
        groups = groups or row_groups(index)
        if self.class_ids is not None:
            current = self._select_slots(index, current, maps, class_scores, positives, keep, groups.same)
        return EmaUpdate(self, index, current, region, stored or self.gather(index), groups)

    def _select_slots(self, index, current, maps, class_scores, positives, keep, same) -> torch.Tensor:
        """Top-k mode: fix the class set of samples written for the first time (by their first kept row), return
        their slots' maps."""
        if class_scores is None:
            class_scores = maps.mean(dim=(2, 3))  # top-k default: the maps' spatial mean
        scores = class_scores.float()
        if positives is not None:
            scores = scores + positives.float() * 1e6  # observed positives first
        candidates = scores.topk(self.classes_per_sample, dim=1).indices
        same_kept = same & keep[None, :]
        first_kept = same_kept.int().argmax(1)
        ids = self.class_ids[index].long()
        fresh = (ids < 0).all(dim=1) & same_kept.any(1)
        ids = torch.where(fresh[:, None], candidates[first_kept], ids)
        self.class_ids[index] = ids.to(self.class_ids.dtype)
        # rows left without classes (never kept) gather slot 0; their region is empty
        return current.gather(1, ids.clamp(min=0)[:, :, None, None].expand(-1, -1, *current.shape[-2:]))

    def _gather(self, index, maps, boxes, flips, class_scores, positives, keep):
        """All ranks' writes in rank order (identity when not distributed), in one `all_gather_rows`."""
        if world_size() == 1:
            return index, maps, boxes, flips, class_scores, positives, keep
        boxes, flips = self._frame(index, boxes, flips)
        keep = torch.ones(len(index), dtype=torch.bool, device=index.device) if keep is None else keep
        options = [t for t in (class_scores, positives) if t is not None]
        index, maps, boxes, flips, keep, *options = all_gather_rows(index, maps, boxes, flips, keep, *options)
        class_scores = options.pop(0) if class_scores is not None else None
        positives = options.pop(0) if positives is not None else None
        return index, maps, boxes, flips, class_scores, positives, keep


class EmaUpdate(NamedTuple):
    """One buffer's share of an EMA write (`HeatmapBuffer.prepare_write`), applied by `write_ema`."""
    buffer: HeatmapBuffer
    index: torch.Tensor  # (B,) the rows' sample indices (every rank's rows under torch.distributed)
    current: torch.Tensor  # (B, slots, H, W) float32: the rows' maps in the buffer's frame
    region: torch.Tensor  # (B, H, W) bool: the cells each row writes
    stored: StoredRows  # the rows as stored before the write
    groups: RowGroups  # of `index`


@torch.no_grad()
def write_ema(updates: Sequence[EmaUpdate], momentum: float) -> None:
    """Apply the `EmaUpdate`s of buffers written with one batch's rows (the same indices, in the same order). Those with
    the same slots and dtype go side by side, as one closed-form update over all their cells (one set of kernels,
    whatever the number of buffers).

    The closed form of the sequential EMA of every row in batch order, per group of rows holding one sample
    (`row_groups`): stored m^n + sum_r c_r m^(later_r) new_r over the n rows whose region covers a cell, c_r = 1 for
    the first write of a never-seen cell and 1 - m otherwise (cells never seen hold 0, so stored m^n is right for them
    too, and n = 0 leaves a cell as it is). Every row of a group writes the same result."""
    if len({len(update.index) for update in updates}) > 1:
        raise ValueError(f'write_ema takes the updates of one batch, got {[len(u.index) for u in updates]} rows.')
    alike: Dict[Tuple[int, torch.dtype], List[EmaUpdate]] = {}
    for update in updates:
        alike.setdefault((update.current.shape[1], update.buffer.maps.dtype), []).append(update)
    for (_, dtype), group in alike.items():
        current = _side_by_side([u.current for u in group])
        region = _side_by_side([u.region for u in group])
        seen = _side_by_side([u.stored.seen for u in group])
        order = group[0].groups.order
        # per row and cell: covering repeats after it, before it, and in its whole group (one batched product)
        counts = order @ region.float()
        powers = torch.pow(momentum, counts)  # m^later, (unused: one kernel, no slicing view), m^n
        held = seen | (counts[1] > 0)  # the cell holds a value before this row's write
        weight = torch.addcmul(powers[0], powers[0], held, value=-momentum)  # m^later (1 - m held)
        # outside its region a row adds nothing, even where its maps are not finite (a refused or skipped row)
        contribution = torch.where(region.unsqueeze(1), weight.unsqueeze(1) * current, 0.)
        # every row of a group gets its group's sum, as one product with the group matrix
        contribution = (order[2] @ contribution.flatten(1)).view_as(contribution)
        updated = torch.addcmul(contribution, powers[2].unsqueeze(1), _side_by_side([u.stored.maps for u in group]))
        cells = [u.region.shape[1:].numel() for u in group]
        parts = zip(group, updated.to(dtype).split(cells, -1), (seen | (counts[2] > 0)).split(cells, -1))
        for update, maps, update_seen in parts:
            update.buffer.maps[update.index] = maps.unflatten(-1, update.region.shape[1:])
            update.buffer.seen[update.index] = update_seen.unflatten(-1, update.region.shape[1:])


def _side_by_side(parts: List[torch.Tensor]) -> torch.Tensor:
    """Per-row tensors (B, ..., H, W), cells flattened and concatenated along the last axis."""
    parts = [part.flatten(-2) for part in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
