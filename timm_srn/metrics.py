"""Multi-label metrics with the SRN paper's definitions and the common variants (percentages).

- mAP: per-class AP over the whole set, mean over classes. 'noninterp' (default) is timm's exact AP
  (same as sklearn's average_precision_score); 'voc' is VOC-2012 all-point interpolated AP (SRN's code).
- CP / CR: mean over classes of TP / predicted and TP / ground truth; CF1 is SRN's mean of per-class F1,
  CF1_harmonic is 2 * CP * CR / (CP + CR) as later papers report. OP / OR / OF1 pool all image-label pairs.
- Predicted labels: probability > threshold. top_k=k: the k highest scores of each image, and (COCO rule,
  `top_k_threshold=True`) also above the threshold.
- Rule for classes without positives (among unmasked entries): excluded from every per-class mean
  (mAP, CP, CR, CF1), counted in `classes_without_positives`; they still count in OP / OR / OF1.
  A class with positives but no predictions has precision 0 (`precision_rule='zero'`, the default, as
  sklearn's zero_division=0). `precision_rule='eps'` is SRN's Matlab code (tools/precision_recall_f1.m): eps
  (2.2e-16) added to every count, so a class with no predictions gets precision 1 and recall gains eps.
- AP ranks with a stable sort: tied scores keep their row order, as Matlab's sort does.
- `METRIC_PRESETS['srn']`: SRN's evaluate.m (VOC-2012 AP, threshold 0.5, the eps rule). Remaining deviation:
  classes without positives are excluded from the means (SRN's code would average a NaN AP).
- `mask` (N, C) marks entries that count (False: VOC 'difficult' in ignore mode, padding).
"""
import sys
from typing import Dict, Optional

import torch
from timm.task.evaluator import _average_precision

from .distributed import all_gather_rows, world_size

__all__ = ['multilabel_metrics', 'average_precision', 'MultilabelMetricAccumulator', 'METRIC_PRESETS']

PRECISION_RULES = ('zero', 'eps')
MATLAB_EPS = sys.float_info.epsilon  # Matlab's eps
METRIC_PRESETS = {
    'default': dict(ap='noninterp', threshold=0.5, precision_rule='zero'),
    'srn': dict(ap='voc', threshold=0.5, precision_rule='eps'),  # zhufengx/SRN_multilabel evaluate.m
}


def _voc_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VOC-2012 AP of one class: area under the monotone precision envelope."""
    order = scores.argsort(descending=True, stable=True)  # ties in row order, as Matlab's sort
    hits = targets[order].double()
    tp = hits.cumsum(0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = tp / hits.sum()
    precision = torch.cat([torch.zeros(1, dtype=torch.float64), precision, torch.zeros(1, dtype=torch.float64)])
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), recall, torch.ones(1, dtype=torch.float64)])
    envelope = precision.flip(0).cummax(0).values.flip(0)
    steps = (recall[1:] != recall[:-1]).nonzero().flatten()
    return ((recall[steps + 1] - recall[steps]) * envelope[steps + 1]).sum()


def average_precision(scores: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      ap: str = 'noninterp') -> torch.Tensor:
    """Per-class AP (C,) in [0, 1]; NaN for classes without positives."""
    if ap not in ('noninterp', 'voc'):
        raise ValueError(f"ap must be 'noninterp' or 'voc', got {ap!r}.")
    targets = targets.bool()
    result = torch.full((scores.shape[1],), float('nan'), dtype=torch.float64)
    for c in range(scores.shape[1]):
        keep = slice(None) if mask is None else mask[:, c]
        s, t = scores[keep, c].double(), targets[keep, c]
        if not t.any():
            continue
        result[c] = _voc_average_precision(s, t) if ap == 'voc' else _average_precision(s[:, None], t[:, None])[0]
    return result


def _threshold_metrics(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, has_pos: torch.Tensor,
                       prefix: str = '', precision_rule: str = 'zero') -> Dict[str, float]:
    tp = (pred & targets & mask).sum(0).double()
    predicted = (pred & mask).sum(0).double()
    truth = (targets & mask).sum(0).double()
    if precision_rule == 'eps':  # SRN's precision_recall_f1.m: eps on every count (and on recall)
        precision = (tp + MATLAB_EPS) / (predicted + MATLAB_EPS)
        recall = (tp + MATLAB_EPS) / (truth + MATLAB_EPS) + MATLAB_EPS
        precision, recall = precision[has_pos], recall[has_pos]
        pooled_tp = tp.sum() + MATLAB_EPS
        op = (pooled_tp / (predicted.sum() + MATLAB_EPS)).item()
        orr = (pooled_tp / (truth.sum() + MATLAB_EPS)).item() + MATLAB_EPS
    else:
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))[has_pos]
        recall = (tp / truth.clamp(min=1))[has_pos]
        op = (tp.sum() / predicted.sum()).item() if predicted.sum() > 0 else 0.
        orr = (tp.sum() / truth.sum()).item() if truth.sum() > 0 else 0.
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    cp, cr = precision.mean().item(), recall.mean().item()
    return {
        f'{prefix}CP': 100 * cp,
        f'{prefix}CR': 100 * cr,
        f'{prefix}CF1': 100 * f1.mean().item(),
        f'{prefix}CF1_harmonic': 100 * (2 * cp * cr / (cp + cr) if cp + cr > 0 else 0.),
        f'{prefix}OP': 100 * op,
        f'{prefix}OR': 100 * orr,
        f'{prefix}OF1': 100 * (2 * op * orr / (op + orr) if op + orr > 0 else 0.),
    }


def multilabel_metrics(
        scores: torch.Tensor,
        targets: torch.Tensor,
        threshold: float = 0.5,
        top_k: Optional[int] = None,
        ap: str = 'noninterp',
        from_logits: bool = False,
        mask: Optional[torch.Tensor] = None,
        top_k_threshold: bool = True,
        precision_rule: str = 'zero',
) -> Dict[str, float]:
    """All metrics for (N, C) probabilities (or logits with `from_logits=True`) and binary targets."""
    if precision_rule not in PRECISION_RULES:
        raise ValueError(f'precision_rule must be one of {PRECISION_RULES}, got {precision_rule!r}.')
    scores = torch.as_tensor(scores).detach().cpu().double()
    targets = torch.as_tensor(targets).detach().cpu() > 0.5
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f'scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, C).')
    if from_logits:
        scores = scores.sigmoid()
    mask = torch.ones_like(targets) if mask is None else torch.as_tensor(mask).cpu().bool()
    has_pos = (targets & mask).any(0)
    per_class_ap = average_precision(scores, targets, mask, ap)
    metrics = {'mAP': 100 * per_class_ap[has_pos].mean().item() if has_pos.any() else 0.}
    metrics.update(_threshold_metrics(scores > threshold, targets, mask, has_pos, precision_rule=precision_rule))
    if top_k:
        top = torch.zeros_like(targets)
        top.scatter_(1, scores.topk(min(top_k, scores.shape[1]), dim=1).indices, True)
        if top_k_threshold:
            top &= scores > threshold
        metrics.update(_threshold_metrics(top, targets, mask, has_pos, f'top{top_k}_', precision_rule))
    metrics['classes_without_positives'] = int((~has_pos).sum())
    metrics['num_images'] = int(scores.shape[0])
    return metrics


class MultilabelMetricAccumulator:
    """Gathers scores across batches and DDP ranks; `compute` equals one `multilabel_metrics` call on the whole set.

    Args:
        max_samples: Dataset size; rows beyond it (DistributedSampler padding) are dropped after the gather.
        **metric_kwargs: Passed to `multilabel_metrics`.
    """

    def __init__(self, max_samples: Optional[int] = None, **metric_kwargs):
        self.max_samples = max_samples
        self.metric_kwargs = metric_kwargs
        self.reset()

    def reset(self) -> None:
        self.scores, self.targets, self.masks, self.indices = [], [], [], []

    @torch.no_grad()
    def update(self, scores: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
               index: Optional[torch.Tensor] = None) -> None:
        """Add a batch; `index` (dataset indices) orders the gathered rows and drops duplicates from padding."""
        self.scores.append(scores.detach().float().cpu())
        self.targets.append(targets.detach().cpu() > 0.5)
        self.masks.append(torch.ones_like(self.targets[-1]) if mask is None else mask.detach().cpu().bool())
        if index is not None:
            self.indices.append(index.detach().cpu().long())

    def compute(self, distributed: bool = False, device: Optional[torch.device] = None) -> Dict[str, float]:
        scores, targets, masks = self.gathered(distributed, device)
        return multilabel_metrics(scores, targets, mask=masks, **self.metric_kwargs)

    def gathered(self, distributed: bool = False, device: Optional[torch.device] = None):
        """(scores, targets, masks) of the whole set: across ranks, one row per dataset index, in dataset order."""
        scores, targets, masks = torch.cat(self.scores), torch.cat(self.targets), torch.cat(self.masks)
        index = torch.cat(self.indices) if self.indices else None
        if distributed and world_size() > 1:  # on `device`: the backend's (nccl: the GPU)
            device = device or torch.device('cpu')
            known = [t.to(device) for t in (scores, targets, masks, index) if t is not None]
            scores, targets, masks, *known = (t.cpu() for t in all_gather_rows(*known))
            index = known[0] if index is not None else None
        if index is not None:  # one row per dataset index, in dataset order
            order = torch.argsort(index, stable=True)
            index, scores, targets, masks = index[order], scores[order], targets[order], masks[order]
            first = torch.ones_like(index, dtype=torch.bool)
            first[1:] = index[1:] != index[:-1]
            scores, targets, masks = scores[first], targets[first], masks[first]
        elif self.max_samples is not None:
            scores, targets, masks = scores[:self.max_samples], targets[:self.max_samples], masks[:self.max_samples]
        return scores, targets, masks
