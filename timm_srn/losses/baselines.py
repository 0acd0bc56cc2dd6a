"""Single-positive baselines, each a criterion called as `criterion(output, target)`.

Targets are plain (B, C) observed labels (1 = observed positive, 0 = unknown) or packed targets
(`timm_srn.data.pack_target`); criteria with per-sample state (ROLE, LL-Cp) need packed targets.
Every loss is averaged over batch x classes.

- AN: unobserved labels are negatives (Cole et al. 2021).
- AN-LS: AN with label smoothing: targets (1 - eps) * y + eps / 2, eps = 0.1.
- WAN: AN with negatives weighted 1 / (C - 1).
- EPR: positives + (sum of probabilities - k)^2 / C^2, k the expected positive count per image.
- ROLE: learned per-sample label estimates (Cole et al. 2021): BCE of the model against the
  estimates and of the estimates against the model, each with EPR.
- LL-R / LL-Ct / LL-Cp (Kim et al. 2022): AN, where the unobserved labels with the largest losses in
  the batch (a fraction growing by `delta_rel` percent per epoch) are rejected (R), treated as positives
  for this step (Ct), or flipped to positive permanently for that sample (Cp).
- EM (Zhou et al. 2022): unobserved labels maximise prediction entropy, weight alpha.
- EM + APL: EM plus asymmetric pseudo-labels: unobserved labels predicted below `apl_threshold`
  become weighted negatives (weight beta) after warm-up.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.targets import unpack_observed

__all__ = [
    'AssumeNegativeLoss', 'WeakAssumeNegativeLoss', 'ExpectedPositiveLoss', 'RoleLoss', 'LargeLossLoss',
    'EntropyMaximizationLoss', 'EXPECTED_POSITIVES', 'create_single_positive_loss',
]

# expected positives per image (k) of EPR / ROLE, from the single-positive benchmark
EXPECTED_POSITIVES = {'voc': 1.5, 'coco': 2.9, 'nuswide': 1.9, 'cub': 31.4}


class _SinglePositiveLoss(nn.Module):
    """Splits packed or plain targets into observed labels (and sample indices)."""

    needs_index = False

    def _labels(self, output: torch.Tensor, target: torch.Tensor):
        packed = unpack_observed(output, target, self.needs_index, type(self).__name__)
        return packed.labels, packed.index

    def set_epoch(self, epoch: float) -> None:
        self.epoch = epoch


class AssumeNegativeLoss(_SinglePositiveLoss):
    """AN, or AN-LS with `smoothing=0.1`."""

    def __init__(self, smoothing: float = 0.):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        labels = labels * (1. - self.smoothing) + self.smoothing / 2.
        return F.binary_cross_entropy_with_logits(output.float(), labels)


class WeakAssumeNegativeLoss(_SinglePositiveLoss):
    """WAN: negatives weighted 1 / (C - 1)."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        weight = torch.where(labels > 0.5, 1., 1. / (output.shape[1] - 1))
        return F.binary_cross_entropy_with_logits(output.float(), labels, weight=weight)


def _epr(probs: torch.Tensor, k: float) -> torch.Tensor:
    num_classes = probs.shape[1]
    return ((probs.sum(dim=1) - k) ** 2 / num_classes ** 2).mean()


class ExpectedPositiveLoss(_SinglePositiveLoss):
    """EPR: observed positives + (expected positive count - k)^2 / C^2."""

    def __init__(self, expected_positives: float = 2.9):
        super().__init__()
        self.expected_positives = expected_positives

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        logits = output.float()
        positive = (F.softplus(-logits) * labels).mean()
        return positive + _epr(logits.sigmoid(), self.expected_positives)


class RoleLoss(_SinglePositiveLoss):
    """ROLE: per-sample label estimates (learnable logits, optimise them with the model)."""

    needs_index = True

    def __init__(self, num_samples: int, num_classes: int, expected_positives: float = 2.9):
        super().__init__()
        self.expected_positives = expected_positives
        self.label_logits = nn.Parameter(torch.zeros(num_samples, num_classes))

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, index = self._labels(output, target)
        estimates = self.label_logits[index].float()
        observed = labels > 0.5
        # observed positives are fixed to 1 in the estimates
        est_probs = torch.where(observed, torch.ones_like(estimates), estimates.sigmoid())
        logits = output.float()
        model_term = F.binary_cross_entropy_with_logits(logits, est_probs.detach()) + \
            _epr(logits.sigmoid(), self.expected_positives)
        estimate_term = F.binary_cross_entropy(est_probs.clamp(1e-6, 1 - 1e-6), logits.sigmoid().detach()) + \
            _epr(est_probs, self.expected_positives)
        return model_term + estimate_term


class LargeLossLoss(_SinglePositiveLoss):
    """LL-R ('reject'), LL-Ct ('correct_temporary') or LL-Cp ('correct_permanent')."""

    MODES = ('reject', 'correct_temporary', 'correct_permanent')

    def __init__(self, mode: str = 'reject', delta_rel: float = 0.2, num_samples: Optional[int] = None,
                 num_classes: Optional[int] = None):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f'mode must be one of {self.MODES}, got {mode!r}.')
        self.mode = mode
        self.delta_rel = delta_rel
        self.epoch = 0.
        self.needs_index = mode == 'correct_permanent'
        if self.needs_index:
            if num_samples is None or num_classes is None:
                raise ValueError('LL-Cp needs num_samples and num_classes for its permanent label flips.')
            self.register_buffer('flipped', torch.zeros(num_samples, num_classes, dtype=torch.bool))

    def rate(self) -> float:
        """Fraction of unobserved labels modified at the current epoch (0 in the first epoch)."""
        return min(1., self.epoch * self.delta_rel / 100.)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, index = self._labels(output, target)
        logits = output.float()
        if self.mode == 'correct_permanent':
            labels = torch.maximum(labels, self.flipped[index].float())
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
        unobserved = labels < 0.5
        count = int(self.rate() * int(unobserved.sum()))
        weight = torch.ones_like(losses)
        if count > 0:
            candidate = torch.where(unobserved, losses.detach(), torch.full_like(losses, -1.))
            largest = torch.zeros_like(unobserved).flatten()
            largest[candidate.flatten().topk(count).indices] = True
            largest = largest.view_as(unobserved)
            if self.mode == 'reject':
                weight = (~largest).float()
            else:
                labels = torch.where(largest, torch.ones_like(labels), labels)
                losses = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
                if self.mode == 'correct_permanent' and self.training:
                    self.flipped[index] |= largest
        return (losses * weight).mean()


class EntropyMaximizationLoss(_SinglePositiveLoss):
    """EM; with `apl_beta > 0`, EM + APL (asymmetric pseudo-labelled negatives after `warmup_epochs`)."""

    def __init__(self, alpha: float = 0.1, apl_beta: float = 0., apl_threshold: float = 0.05,
                 warmup_epochs: float = 1.):
        super().__init__()
        self.alpha = alpha
        self.apl_beta = apl_beta
        self.apl_threshold = apl_threshold
        self.warmup_epochs = warmup_epochs
        self.epoch = 0.

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        logits = output.float()
        probs = logits.sigmoid()
        observed = labels > 0.5
        positive = F.softplus(-logits) * observed
        entropy = -(probs * F.logsigmoid(logits) + (1 - probs) * F.logsigmoid(-logits))
        loss = positive - self.alpha * entropy * ~observed
        if self.apl_beta > 0 and self.epoch >= self.warmup_epochs:
            pseudo_negative = ~observed & (probs.detach() < self.apl_threshold)
            loss = loss + self.apl_beta * F.softplus(logits) * pseudo_negative
        return loss.mean()


def create_single_positive_loss(name: str, num_samples: int, num_classes: int, dataset: str = 'coco', **kwargs) -> nn.Module:
    """Criterion by name: an, an-ls, wan, epr, role, ll-r, ll-ct, ll-cp, em, em-apl, consistency, en, spatial."""
    from .spatial_consistency import SpatialConsistencyLoss
    k = EXPECTED_POSITIVES.get(dataset, 2.9)
    factories = {
        'an': lambda: AssumeNegativeLoss(**kwargs),
        'an-ls': lambda: AssumeNegativeLoss(smoothing=kwargs.pop('smoothing', 0.1), **kwargs),
        'wan': lambda: WeakAssumeNegativeLoss(**kwargs),
        'epr': lambda: ExpectedPositiveLoss(expected_positives=kwargs.pop('expected_positives', k), **kwargs),
        'role': lambda: RoleLoss(num_samples, num_classes, expected_positives=kwargs.pop('expected_positives', k), **kwargs),
        'll-r': lambda: LargeLossLoss('reject', **kwargs),
        'll-ct': lambda: LargeLossLoss('correct_temporary', **kwargs),
        'll-cp': lambda: LargeLossLoss('correct_permanent', num_samples=num_samples, num_classes=num_classes, **kwargs),
        'em': lambda: EntropyMaximizationLoss(**kwargs),
        'em-apl': lambda: EntropyMaximizationLoss(apl_beta=kwargs.pop('apl_beta', 1.0), **kwargs),
        'consistency': lambda: SpatialConsistencyLoss(num_samples, num_classes, spatial_weight=0., **kwargs),
        'en': lambda: SpatialConsistencyLoss(num_samples, num_classes, negatives='en', spatial_weight=0., **kwargs),
        'spatial': lambda: SpatialConsistencyLoss(num_samples, num_classes, **kwargs),
    }
    if name not in factories:
        raise ValueError(f"Unknown single-positive loss '{name}'; choose from {sorted(factories)}.")
    return factories[name]()
