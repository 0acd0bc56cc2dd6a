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
of an index is written after the (k-1)-th, exactly as if they came in consecutive batches.
Under torch.distributed every write is all-gathered and applied in rank order on every rank, so all
ranks hold identical contents, equal to one process fed the concatenated global batch.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.task.evaluator import _gather_rows

from ..data.targets import invalid_box_rows

__all__ = ['HeatmapBuffer', 'crop_to_frame_grid', 'frame_to_crop_grid']


def _centres(n: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def crop_to_frame_grid(boxes: torch.Tensor, flips: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (B, h, w, 2) sampling the whole-image frame at the cell centres of each crop."""
    height, width = size
    u = _centres(width, boxes.device).expand(len(boxes), -1)
    u = torch.where(flips[:, None], 1. - u, u)
    v = _centres(height, boxes.device).expand(len(boxes), -1)
    x = boxes[:, 0:1] + u * (boxes[:, 2:3] - boxes[:, 0:1])
    y = boxes[:, 1:2] + v * (boxes[:, 3:4] - boxes[:, 1:2])
    return torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1) * 2. - 1.


def frame_to_crop_grid(boxes: torch.Tensor, flips: torch.Tensor, size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """grid (B, H, W, 2) sampling each crop's maps at the buffer's cell centres, and the (B, H, W) mask
    of buffer cells whose centre lies inside the crop box."""
    height, width = size
    x = _centres(width, boxes.device)[None]
    y = _centres(height, boxes.device)[None]
    u = (x - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1])
    v = (y - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2])
    inside_x = (u >= 0) & (u <= 1)
    inside_y = (v >= 0) & (v <= 1)
    u = torch.where(flips[:, None], 1. - u, u)
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1) * 2. - 1.
    return grid, inside_y[:, :, None] & inside_x[:, None, :]


def _occurrence_rank(index: torch.Tensor) -> torch.Tensor:
    """For each row, how many earlier rows of the batch hold the same index (0 for the first)."""
    same = index[:, None] == index[None, :]
    return torch.tril(same, diagonal=-1).sum(dim=1)


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
            f'Crop box {boxes[row].tolist()} at batch row {row} must be finite, lie in [0, 1] with x1 > x0 and y1 > y0.')

    # --- read ---

    @torch.no_grad()
    def read(
            self,
            index: torch.Tensor,
            boxes: torch.Tensor,
            flips: torch.Tensor,
            size: Tuple[int, int],
            host_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stored maps resampled into each crop's frame: (maps (B, C, h, w) float32, valid (B, C, h, w) bool).
        `host_index`: see `write`."""
        flips = flips.bool()
        if host_index is None:
            self.validate(index, boxes, flips)
        grid = crop_to_frame_grid(boxes.float(), flips, size)
        stored = F.grid_sample(self.maps[index].float(), grid, mode='bilinear', padding_mode='border', align_corners=False)
        seen = F.grid_sample(self.seen[index][:, None].float(), grid, mode='bilinear', padding_mode='border', align_corners=False)
        valid = seen >= 1. - 1e-4  # every bilinear neighbour has been seen
        if self.class_ids is None:
            return stored, valid.expand_as(stored)
        maps = stored.new_zeros(len(index), self.num_classes, *size)
        ids = self.class_ids[index].long()
        tracked = ids >= 0
        rows = torch.arange(len(index), device=index.device)[:, None].expand_as(ids)
        maps[rows[tracked], ids[tracked]] = stored[tracked]
        valid_classes = torch.zeros(len(index), self.num_classes, dtype=torch.bool, device=index.device)
        valid_classes[rows[tracked], ids[tracked]] = True
        return maps, valid_classes[:, :, None, None] & valid

    # --- write ---

    @torch.no_grad()
    def write(
            self,
            index: torch.Tensor,
            maps: torch.Tensor,
            boxes: torch.Tensor,
            flips: torch.Tensor,
            momentum: float,
            class_scores: Optional[torch.Tensor] = None,
            positives: Optional[torch.Tensor] = None,
            host_index: Optional[torch.Tensor] = None,
    ) -> None:
        """EMA-update the buffer with crop maps (B, C, h, w): stored = momentum * stored + (1 - momentum) * new
        inside each crop box; cells seen for the first time take the new value. Rows with non-finite maps are
        skipped and counted in `skipped_rows`. `class_scores` / `positives` (B, C) choose a sample's classes
        in top-k mode at its first write (default scores: the maps' spatial mean).

        `host_index`: a CPU copy of `index` whose rows (index and boxes) the caller has checked with `validate`,
        as `SpatialConsistencyLoss` does on its one host copy of the target: the call then needs no GPU
        synchronisation (single process)."""
        flips = flips.bool()
        if host_index is None:
            self.validate(index, boxes, flips, maps)
        gathered = self._gather(index, maps, boxes, flips, class_scores, positives)
        if gathered[0] is not index:  # all ranks' rows: the host copy no longer describes them
            host_index = None
        index, maps, boxes, flips, class_scores, positives = gathered
        finite = torch.isfinite(maps).flatten(1).all(1)
        self.skipped_rows += (~finite).sum()
        if self.class_ids is not None and class_scores is None:
            class_scores = maps.float().mean(dim=(2, 3))  # top-k default: the maps' spatial mean
        maps = torch.where(finite[:, None, None, None], maps.float(), 0.)  # skipped rows write nothing (region)
        grid, region = frame_to_crop_grid(boxes.float(), flips, self.size)
        region = region & finite[:, None, None]
        current = F.grid_sample(maps, grid, mode='bilinear', padding_mode='border', align_corners=False)
        # repeated samples are counted on the host copy when there is one (no GPU synchronisation)
        rank = _occurrence_rank(index if host_index is None else host_index)
        num_occurrences = int(rank.max()) + 1 if len(rank) else 0
        if num_occurrences == 1:  # no repeated sample: one update of all rows, no boolean row selection
            self._ema_update(index, current, region, momentum, class_scores, positives, finite)
            return
        rank = rank.to(index.device)
        for occurrence in range(num_occurrences):
            rows = rank == occurrence
            self._ema_update(index[rows], current[rows], region[rows], momentum,
                             None if class_scores is None else class_scores[rows],
                             None if positives is None else positives[rows], finite[rows])

    def _ema_update(self, index, current, region, momentum, class_scores, positives, finite):
        """One EMA update for unique indices."""
        if self.class_ids is not None:
            current = self._select_slots(index, current, class_scores, positives, finite)
        stored = self.maps[index].float()
        seen = self.seen[index]
        region_c = region[:, None]
        updated = torch.where(seen[:, None], momentum * stored + (1. - momentum) * current, current)
        self.maps[index] = torch.where(region_c, updated, stored).to(self.maps.dtype)
        self.seen[index] = seen | region

    def _select_slots(self, index, current, class_scores, positives, finite) -> torch.Tensor:
        """Top-k mode: fix the class set of samples written for the first time (with finite maps), return their
        slots' maps."""
        ids = self.class_ids[index].long()
        new = (ids < 0).all(dim=1) & finite
        if new.any():
            scores = class_scores[new].float()
            if positives is not None:
                scores = scores + positives[new].float() * 1e6  # observed positives first
            ids[new] = scores.topk(self.classes_per_sample, dim=1).indices
            self.class_ids[index[new]] = ids[new].to(self.class_ids.dtype)
        # rows left without classes (non-finite first writes) gather slot 0; their region is empty
        return current.gather(1, ids.clamp(min=0)[:, :, None, None].expand(-1, -1, *current.shape[-2:]))

    def _gather(self, index, maps, boxes, flips, class_scores, positives):
        """All ranks' writes in rank order (identity when not distributed): the index as int64, the rest as
        one float32 payload per row."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return index, maps, boxes, flips, class_scores, positives
        h, w = maps.shape[-2:]
        fields = [maps.float().flatten(1), boxes.float(), flips.float()[:, None]]
        fields += [t.float() for t in (class_scores, positives) if t is not None]
        payload = torch.cat(fields, dim=1)
        index = _gather_rows(index.long()[:, None], index.device).to(index.device)[:, 0]
        payload = _gather_rows(payload, payload.device).to(payload.device)
        maps, boxes, flips, rest = payload.split([self.num_classes * h * w, 4, 1, payload.shape[1] - self.num_classes * h * w - 5], dim=1)
        extra = iter(rest.split(self.num_classes, dim=1))
        class_scores = next(extra) if class_scores is not None else None
        positives = next(extra) if positives is not None else None
        return index, maps.reshape(-1, self.num_classes, h, w), boxes, flips[:, 0] > 0.5, class_scores, positives

