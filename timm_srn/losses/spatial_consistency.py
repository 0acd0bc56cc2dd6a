"""Consistency and spatial consistency losses for single-positive multi-label training (Verelst et al., WACV 2023).

Called as `criterion(output, target)` like any timm loss. Terms, each averaged over batch x classes:
- positive: -log sigmoid(z) on the observed positives;
- negatives ('an' | 'en' | 'none'): 'an' treats every unobserved label as negative; 'en' (expected
  negatives) treats as negative only the unobserved labels whose EMA prediction is below `en_threshold`
  and ignores the rest (before a sample's first EMA update, and during warm-up, it acts as 'an');
- consistency: BCE of the unobserved labels against the sample's EMA predictions (soft targets);
- spatial: mean squared distance between the current heatmaps (sigmoid of the class maps by default) and the
  sample's EMA heatmaps resampled into the current crop, over the cells seen before (unseen cells are not
  penalised).
After the loss, the EMA predictions and the heatmap buffer are updated with the current (detached) values.

A call launches a fixed set of kernels and never waits for the device: bad input (soft labels, an index outside
the buffer, an invalid crop box, non-finite logits or heatmaps) is found on the device, the whole batch then leaves
every buffer unchanged, and `raise_if_invalid` raises naming the problem. train.py calls it after every step (when it
reads the loss anyway); `set_epoch`, `last_terms` and `state_dict` (checkpoints) call it too, so an invalid batch
never passes unreported into saved state. Each buffer's rows are gathered once per call and shared by its read and
its write. `compile_backend` runs the call under torch.compile(fullgraph=True).
The consistency and spatial terms start after `warmup_epochs` (from `set_epoch`, or, when the training
loop never calls it, from the number of samples seen divided by `num_samples`).
"""
import functools
import operator
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.targets import PackedTarget, PackedTargetCheck, check_observed, check_target_shape, unpack_observed
from ..distributed import world_size
from .heatmap_buffer import CropFrames, HeatmapBuffer, RowGroups, StoredRows, crop_frames, row_groups, write_ema
from .heatmap_source import HeatmapSource

__all__ = ['SpatialConsistencyLoss']

NEGATIVE_MODES = ('an', 'en', 'none')
SPATIAL_SPACES = ('prob', 'logit')


class SpatialConsistencyLoss(nn.Module):
    """Single-positive criterion: observed positives + negatives + consistency + spatial consistency.

    Args:
        num_samples: Training set size (buffers are keyed by dataset index).
        num_classes: Number of labels C.
        negatives: 'an' (assume negative, default), 'en' (expected negatives) or 'none'.
        en_threshold: EMA probability below which an unobserved label is an expected negative.
        consistency_weight: Weight of the consistency term (0 disables it and its buffer).
        spatial_weight: Weight of the spatial consistency term (0 disables it and the heatmap buffer).
        momentum: EMA momentum of both buffers (stored = momentum * stored + (1 - momentum) * new). A sample is
            seen once per epoch, so 0.5 lets the targets follow a model that improves over a 10-epoch schedule.
        warmup_epochs: Epochs before the consistency and spatial terms start.
        heatmap_size: (H, W) of the whole-image heatmaps in the buffer.
        heatmap_dtype: Storage dtype of the buffers (float16: 2 bytes per cell).
        classes_per_sample: Top-k scale mode of the heatmap buffer (None: dense).
        heatmap_source: SRN maps to use: 'class_maps', 'attention' or 'confidence'.
        spatial_space: Where heatmaps are stored and compared: 'prob' (sigmoid of the maps, bounded like the
            predictions; default) or 'logit' (the raw maps, unbounded: needs a much smaller spatial_weight).
        align_crops: Locate each crop's maps in the stored whole-image maps by its crop box and flip (the paper).
            False stores and compares them as if every crop were the whole unflipped image: an ablation only.
        compile_backend: Run each call under torch.compile(fullgraph=True) with this backend ('inductor' on a
            GPU; 'eager' / 'aot_eager' check the graph without code generation). None: eager.
        device: Device of the buffers (the training device).
    """

    def __init__(
            self,
            num_samples: int,
            num_classes: int,
            negatives: str = 'an',
            en_threshold: float = 0.1,
            consistency_weight: float = 1.0,
            spatial_weight: float = 1.0,
            momentum: float = 0.5,
            warmup_epochs: float = 1.0,
            heatmap_size: Tuple[int, int] = (7, 7),
            heatmap_dtype: torch.dtype = torch.float16,
            classes_per_sample: Optional[int] = None,
            heatmap_source: str = 'class_maps',
            spatial_space: str = 'prob',
            align_crops: bool = True,
            compile_backend: Optional[str] = None,
            device: Optional[torch.device] = None,
    ):
        super().__init__()
        if spatial_space not in SPATIAL_SPACES:
            raise ValueError(f'spatial_space must be one of {SPATIAL_SPACES}, got {spatial_space!r}.')
        if not 0. < en_threshold <= 1.:  # a never-seen sample's stored 0 must count as below it
            raise ValueError(f'en_threshold must be in (0, 1], got {en_threshold}.')
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f'negatives must be one of {NEGATIVE_MODES}, got {negatives!r}.')
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.negatives = negatives
        self.en_threshold = en_threshold
        self.consistency_weight = consistency_weight
        self.spatial_weight = spatial_weight
        self.momentum = momentum
        self.warmup_epochs = warmup_epochs
        self.heatmap_source = heatmap_source
        self.spatial_space = spatial_space
        self.align_crops = align_crops
        self.needs_index = consistency_weight > 0 or spatial_weight > 0 or negatives == 'en'
        # per-sample EMA predictions: a 1x1 "heatmap" of probabilities, always written with the full box
        self.predictions = HeatmapBuffer(num_samples, num_classes, (1, 1), heatmap_dtype, device) \
            if consistency_weight > 0 or negatives == 'en' else None
        self.heatmaps = HeatmapBuffer(num_samples, num_classes, heatmap_size, heatmap_dtype, device, classes_per_sample) \
            if spatial_weight > 0 else None
        self.register_buffer('epoch', torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer('samples_seen', torch.zeros((), dtype=torch.int64, device=device))
        # batches refused since the last `raise_if_invalid` (not saved: a checkpoint is taken after a check)
        self.register_buffer('invalid_batches', torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._latest_batch: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
        self._geometry = self.heatmaps is not None and align_crops  # the crop boxes and flips are read
        self.target_check = PackedTargetCheck(num_classes, num_samples, self._geometry,
                                              1 + (self.heatmaps is not None)).to(device)
        self._step = torch.compile(self._loss_and_update, fullgraph=True, backend=compile_backend) \
            if compile_backend else self._loss_and_update
        self._epoch_set = False
        # host mirrors of the two counters: the warm-up test reads them every step without a GPU synchronisation
        self._host_epoch, self._host_samples_seen = 0., 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._mirror_counters())
        self._source: Optional[HeatmapSource] = None
        self._last_terms: Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]] = ((), ())

    @property
    def last_terms(self) -> Dict[str, float]:
        """The weighted terms of the latest call (converted on access, so logging costs no sync per step)."""
        self.raise_if_invalid()
        names, values = self._last_terms
        return dict(zip(names, torch.stack(values).detach().tolist())) if values else {}

    def raise_if_invalid(self) -> None:
        """Raise if a call since the last check met bad input (its batch changed no state): the error of
        `check_observed` on the latest batch when that is the bad one. One host synchronisation."""
        count = int(self.invalid_batches)
        if not count:
            return
        self.invalid_batches.zero_()
        if self._latest_batch is not None:
            output, target, maps = self._latest_batch
            check_observed(output, target, self.needs_index, type(self).__name__, self.num_samples)
            if maps is not None and not bool(torch.isfinite(maps).all()):
                rows = (~torch.isfinite(maps.flatten(1)).all(1)).nonzero()[:, 0].tolist()
                raise FloatingPointError(
                    f'{type(self).__name__}: non-finite heatmaps (NaN or Inf) in batch rows {rows[:8]} with finite '
                    f'logits (the class maps overflowed: use --amp bf16 instead of fp16); no state was updated.')
        raise ValueError(f'{type(self).__name__}: {count} earlier batches had invalid packed targets or non-finite '
                         f'logits or heatmaps; those batches changed no state. Call raise_if_invalid() after each '
                         f'step to get the row named.')

    def state_dict(self, *args, **kwargs):
        self.raise_if_invalid()
        return super().state_dict(*args, **kwargs)

    def attach(self, model: nn.Module) -> 'SpatialConsistencyLoss':
        """Capture the model's heatmaps during its forward (needed by the spatial term). Returns self."""
        if self._source is not None:
            self._source.remove()
        self._source = HeatmapSource(model, self.heatmap_source) if self.heatmaps is not None else None
        return self

    def set_epoch(self, epoch: float) -> None:
        self.raise_if_invalid()
        self.epoch.fill_(epoch)
        self._host_epoch = float(epoch)
        self._epoch_set = True

    def current_epoch(self) -> float:
        if self._epoch_set:
            return self._host_epoch
        return self._host_samples_seen / self.num_samples

    def _mirror_counters(self) -> None:
        self._host_epoch, self._host_samples_seen = float(self.epoch), int(self.samples_seen)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_target_shape(output, target, self.needs_index, type(self).__name__)
        maps = self.latest_maps()
        self._check_shapes(output, maps)
        if self.needs_index:
            self._latest_batch = (output, target, maps)  # described by `raise_if_invalid` (no copy, no op)
        loss, terms = self._step(output, target, maps, self.current_epoch() >= self.warmup_epochs)
        self._last_terms = terms
        if self.training:
            seen = len(output) * world_size()
            self._host_samples_seen += seen
        return loss

    def _loss_and_update(self, output: torch.Tensor, target: torch.Tensor, maps: Optional[torch.Tensor],
                         warm: bool) -> Tuple[torch.Tensor, Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]]]:
        """The loss terms and the buffer updates of one call: device work only (what `compile_backend` compiles)."""
        packed = unpack_observed(output, target, self.needs_index, type(self).__name__, geometry=self._geometry)
        logits = output.float()
        observed = packed.labels  # 0 / 1 (checked), used as float masks
        unobserved = 1. - observed
        if packed.index is not None:  # refused rows read a row of the buffer: no index outside it reaches a kernel
            packed = packed._replace(index=packed.index.clamp(0, self.num_samples - 1))
        rows = self._batch_rows(packed, warm)
        terms = {'positive': (F.softplus(-logits) * observed).mean()}  # -log sigmoid(z) on positives
        ema = rows.predictions if warm else None
        if ema is not None:
            ema_probs, ema_valid = ema.maps.flatten(1), ema.seen.flatten(1)  # (B, C) and (B, 1): seen per sample
        negatives = unobserved
        if self.negatives == 'en' and ema is not None:  # never-seen samples read 0 < en_threshold: all negative
            negatives = unobserved * (ema_probs < self.en_threshold)
        if self.negatives != 'none':
            terms['negative'] = (F.softplus(logits) * negatives).mean()  # -log(1 - sigmoid(z))
        if self.consistency_weight > 0 and ema is not None:
            soft = F.binary_cross_entropy_with_logits(logits, ema_probs, reduction='none')
            terms['consistency'] = _weighted(self.consistency_weight, (soft * (unobserved * ema_valid)).mean())
        raw_maps = maps
        if maps is not None:
            maps = maps.float()
            if self.spatial_space == 'prob':
                maps = maps.sigmoid()
            if warm:
                stored, valid = self.heatmaps.read(packed.index, packed.boxes, packed.flips, tuple(maps.shape[-2:]),
                                                   checked=True, frames=rows.frames, stored=rows.heatmaps)
                squared = F.mse_loss(maps, stored, reduction='none')
                terms['spatial'] = _weighted(self.spatial_weight, (squared * valid).mean())
        loss = functools.reduce(operator.add, terms.values())
        if self.training:
            self._update(packed, logits, observed, maps, self._keep(loss, target, packed, raw_maps), rows)
        return loss, (tuple(terms), tuple(terms.values()))

    def _keep(self, loss: torch.Tensor, target: torch.Tensor, packed: PackedTarget,
              maps: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """0-dim bool: whether the batch may change state. Refused when a packed field is invalid
        (`PackedTargetCheck`) or a logit or map is not finite (every logit enters the loss, every map the maps' sum: a
        non-finite one makes its sum non-finite); counted in `invalid_batches` for `raise_if_invalid`."""
        if packed.index is None:
            return None
        finite = (loss,) if maps is None else (loss, maps.sum())
        passes = self.target_check(target, packed.index, *finite)
        self.invalid_batches += ~passes
        return passes

    def _batch_rows(self, packed: PackedTarget, warm: bool) -> '_BatchRows':
        """What the read and the write of one call share: each buffer's rows gathered once, the crops' frames and
        the repeated samples' groups, each made only when something reads or writes it."""
        if packed.index is None or not (warm or self.training):
            return _BatchRows(None, None, None, None)
        predictions = self.predictions.gather(packed.index) if self.predictions is not None else None
        heatmaps = self.heatmaps.gather(packed.index) if self.heatmaps is not None else None
        frames = crop_frames(packed.boxes, packed.flips) if packed.boxes is not None else None
        return _BatchRows(predictions, heatmaps, frames, row_groups(packed.index) if self.training else None)

    def latest_maps(self) -> Optional[torch.Tensor]:
        """The attached model's heatmaps of its latest forward, as the model gives them (None without the spatial
        term)."""
        if self.heatmaps is None:
            return None
        if self._source is None:
            raise RuntimeError('The spatial term needs the model heatmaps: call criterion.attach(model) first.')
        return self._source.latest()

    def _check_shapes(self, output: torch.Tensor, maps: Optional[torch.Tensor]) -> None:
        """Shapes only (host metadata, no device work)."""
        if output.shape[1] != self.num_classes:
            raise ValueError(f'{type(self).__name__} was built for {self.num_classes} classes, got logits of shape '
                             f'{tuple(output.shape)}.')
        if maps is not None and (maps.ndim != 4 or maps.shape[0] != len(output) or maps.shape[1] != self.num_classes):
            raise ValueError(
                f'Expected maps ({len(output)}, {self.num_classes}, h, w), got shape {tuple(maps.shape)}.')

    @torch.no_grad()
    def _update(self, packed: PackedTarget, logits: torch.Tensor, observed: torch.Tensor, maps: Optional[torch.Tensor],
                verdict: Optional[torch.Tensor], rows: '_BatchRows'):
        """Count the samples and write both buffers in one EMA update, when the batch passed (`verdict`, `_keep`)."""
        if packed.index is None:
            self.samples_seen += len(logits) * world_size()
            return
        self.samples_seen.add_(verdict, alpha=len(logits) * world_size())
        keep = verdict.expand(len(logits))
        probs = logits.sigmoid()
        updates = []  # both buffers in one EMA update (`write_ema`)
        if self.predictions is not None:
            updates.append(self.predictions.prepare_write(packed.index, probs[:, :, None, None], keep=keep,
                                                          groups=rows.groups, stored=rows.predictions))
        if self.heatmaps is not None:
            updates.append(self.heatmaps.prepare_write(
                packed.index, maps.detach(), packed.boxes, packed.flips, class_scores=probs, positives=observed,
                keep=keep, groups=rows.groups, frames=rows.frames, stored=rows.heatmaps))
        write_ema(updates, self.momentum)


class _BatchRows(NamedTuple):
    """The per-call state one criterion call shares between its reads and its writes (`_batch_rows`)."""
    predictions: Optional[StoredRows]
    heatmaps: Optional[StoredRows]
    frames: Optional[CropFrames]
    groups: Optional[RowGroups]


def _weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    """weight * term, without an op for the default weight 1."""
    return term if weight == 1 else weight * term
