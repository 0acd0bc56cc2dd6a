"""Single-positive baselines, each a criterion called as `criterion(output, target)`.

Targets are plain (B, C) observed labels (1 = observed positive, 0 = unknown) or packed targets
(`timm_srn.data.pack_target`); criteria with per-sample state (ROLE, LL-Cp) need packed targets.
Every loss is averaged over batch x classes.

- AN: unobserved labels are negatives (Cole et al. 2021).
- AN-LS: AN with label smoothing as Cole et al.'s loss_an_ls: targets 1 - eps for observed positives and eps for
  the rest, eps = 0.1 (their ls_coef).
- WAN: AN with negatives weighted 1 / (C - 1).
- EPR: observed positives + (batch mean of the per-image probability sums - k)^2 / C^2 (Cole et al.'s
  expected_positive_regularizer: one batch-level term), k the expected positive count per image.
- ROLE (Cole et al. 2021): learned per-sample, per-class label estimates (all entries, observed positives too,
  initialised at 0.995 / uniform in [0.4, 0.6]); loss 0.5 (positives of model and estimates) + 0.5 (BCE of the model
  against the detached estimates + BCE of the estimates against the detached model) + 0.5 (EPR of both). The
  estimates train at `lr_multiplier` (10) times the model's learning rate (train.py applies it).
- Under torch.distributed the per-sample state is the same on every rank: ROLE computes its estimates' half of the
  loss on every rank's rows (rank 0's random start), LL-Cp applies every rank's flips, EM+APL pseudo-labels from
  predictions gathered over the whole training set. LL's k counts the entries of a rank's batch.
- Numerics: Cole et al. compute -log(p + 1e-5) on probabilities; these losses use exact log-sigmoid of the logits
  (the same values up to that 1e-5 offset).
- LL-R / LL-Ct / LL-Cp (Kim et al. 2022): AN, where the unobserved labels with the largest losses in the batch
  (ceil(B C rate) entries, rate growing by `delta_rel` percent per epoch; LL-Cp a constant `delta_rel` percent)
  are rejected (R), treated as positives for this step (Ct), or flipped to positive permanently (Cp).
- EM (Zhou et al. 2022): unobserved labels maximise prediction entropy, weight alpha (per dataset, EM_DEFAULTS).
- EM + APL: EM plus asymmetric pseudo-labels, per epoch and per class after warm-up, permanent soft targets
  (see EntropyMaximizationLoss); alpha, beta and warm-up per dataset as the reference runs them.
"""
import inspect
import math
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data.targets import check_observed, unpack_observed
from ..distributed import all_gather_rows, world_size

__all__ = [
    'AssumeNegativeLoss', 'WeakAssumeNegativeLoss', 'ExpectedPositiveLoss', 'RoleLoss', 'LargeLossLoss',
    'EntropyMaximizationLoss', 'EXPECTED_POSITIVES', 'EM_DEFAULTS', 'create_single_positive_loss', 'loss_options',
    'SINGLE_POSITIVE_LOSSES',
]

# expected positives per image (k) of EPR / ROLE, from the single-positive benchmark
# (Cole et al.'s train.py lookup; COCO's is 2.5 there, though their paper's table gives 2.9)
EXPECTED_POSITIVES = {'voc': 1.5, 'coco': 2.5, 'nuswide': 1.9, 'cub': 31.4}


class _SinglePositiveLoss(nn.Module):
    """Splits packed or plain targets into observed labels (and sample indices).

    Stateless criteria read the target's shape only: no value checks, no host synchronisation (soft targets are
    used as given; non-finite logits give a non-finite loss, which the training loop sees). Criteria with
    per-sample state (`needs_index`) check every value on one host copy first (`check_observed`), so bad input
    never reaches their state."""

    needs_index = False
    num_samples: Optional[int] = None  # rows of the per-sample state (criteria with `needs_index`)

    def _labels(self, output: torch.Tensor, target: torch.Tensor):
        packed = unpack_observed(output, target, self.needs_index, type(self).__name__)
        if self.needs_index:
            check_observed(output, target, True, type(self).__name__, self.num_samples)
        return packed.labels, packed.index

    def set_epoch(self, epoch: float) -> None:
        self.epoch = epoch


class AssumeNegativeLoss(_SinglePositiveLoss):
    """AN, or AN-LS with `smoothing=0.1` (targets 1 - smoothing and smoothing)."""

    def __init__(self, smoothing: float = 0.):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        labels = labels * (1. - 2. * self.smoothing) + self.smoothing
        return F.binary_cross_entropy_with_logits(output.float(), labels)


class WeakAssumeNegativeLoss(_SinglePositiveLoss):
    """WAN: negatives weighted 1 / (C - 1)."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        weight = torch.where(labels > 0.5, 1., 1. / (output.shape[1] - 1))
        return F.binary_cross_entropy_with_logits(output.float(), labels, weight=weight)


def _epr(probs: torch.Tensor, k: float) -> torch.Tensor:
    """(batch mean of the per-image expected positive counts - k)^2 / C^2: one term per batch."""
    return (probs.sum(dim=1).mean() - k) ** 2 / probs.shape[1] ** 2


class ExpectedPositiveLoss(_SinglePositiveLoss):
    """EPR: observed positives + (expected positive count - k)^2 / C^2."""

    def __init__(self, expected_positives: float = 2.5):
        super().__init__()
        self.expected_positives = expected_positives

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, _ = self._labels(output, target)
        logits = output.float()
        positive = (F.softplus(-logits) * labels).mean()
        return positive + _epr(logits.sigmoid(), self.expected_positives)


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Element-wise BCE of sigmoid(logits) against probabilities `targets`."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction='none')


class RoleLoss(_SinglePositiveLoss):
    """ROLE: per-sample label estimates (learnable logits, trained with the model at `lr_multiplier` x its lr)."""

    needs_index = True
    lr_multiplier = 10.  # Cole et al.'s lr_mult for the label estimator

    def __init__(self, num_samples: int, num_classes: int, expected_positives: float = 2.5):
        super().__init__()
        self.expected_positives = expected_positives
        # unobserved entries start uniform in [logit(0.4), logit(0.6)]; observed positives are set to logit(0.995)
        # the first time their sample is seen (the observed labels arrive with the targets)
        spread = math.log(0.6 / 0.4)
        self.num_samples = num_samples
        self.label_logits = nn.Parameter(spread * (2 * torch.rand(num_samples, num_classes) - 1))
        self.register_buffer('initialised', torch.zeros(num_samples, dtype=torch.bool))
        self._shared = False  # the estimates are rank 0's on every rank (set by the first call)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The model's half of the loss on this rank's rows and the estimates' half on every rank's rows
        (`all_gather_rows`; the same rows outside torch.distributed), so that under DDP every rank computes the same
        estimate gradients and holds the same estimates, as DDP keeps the model alike."""
        labels, index = self._labels(output, target)
        logits = output.float()
        observed = labels > 0.5
        all_index, all_observed, all_probs = all_gather_rows(index, observed, logits.detach().sigmoid())
        self._initialise(all_index, all_observed)
        estimate_logits = self.label_logits[all_index].float()
        model_half = F.softplus(-logits) * observed + _bce(logits, self.label_logits[index].detach().float().sigmoid())
        estimates_half = F.softplus(-estimate_logits) * all_observed + _bce(estimate_logits, all_probs)
        regulariser = _epr(logits.sigmoid(), self.expected_positives) + \
            _epr(estimate_logits.sigmoid(), self.expected_positives)
        return 0.5 * (model_half.mean() + estimates_half.mean()) + 0.5 * regulariser

    @torch.no_grad()
    def _initialise(self, index: torch.Tensor, observed: torch.Tensor) -> None:
        """Observed positives of samples seen for the first time start at 0.995. Under torch.distributed the first
        call first gives every rank rank 0's estimates (ranks draw their random start from different seeds)."""
        if world_size() > 1 and not self._shared:
            dist.broadcast(self.label_logits.data, src=0)
        self._shared = True
        fresh = ~self.initialised[index]
        if fresh.any():
            rows = self.label_logits[index[fresh]]
            rows[observed[fresh]] = math.log(0.995 / 0.005)
            self.label_logits[index[fresh]] = rows
            self.initialised[index[fresh]] = True


class LargeLossLoss(_SinglePositiveLoss):
    """LL-R ('reject'), LL-Ct ('correct_temporary') or LL-Cp ('correct_permanent'), as snucml/LargeLossMatters.

    From the second epoch, k = ceil(B * C * rate) entries of the batch are modified (rate = epoch * delta_rel %, in
    the reference's floating-point accumulation;
    LL-Cp: the constant delta_rel %, the rule its code intends): the unobserved labels whose AN loss is at least the
    k-th largest masked loss are rejected (R) or counted as positives (Ct, Cp); LL-Cp also flips those strictly
    above it to positive for good. (The published script picks LL-Cp's rule with `is` on a string, which Python
    does not guarantee to match; we apply the intended rule. We never modify observed positives, which the
    reference would do only when the k-th largest masked loss is 0.)
    """

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
            self.num_samples = num_samples
            self.register_buffer('flipped', torch.zeros(num_samples, num_classes, dtype=torch.bool))

    def rate(self) -> float:
        """Fraction of the batch's entries modified at the current epoch (0 in the first epoch): 1 less the
        reference's clean rate, which starts at 1 and loses delta_rel / 100 after every epoch, accumulated in floating
        point as its train.py does, so that ceil(B * C * rate) picks the same count (e.g. 33, not 32, of 16 x 80
        entries at epoch 5 with delta_rel 0.5)."""
        clean_rate, step = 1., self.delta_rel / 100.
        for _ in range(int(self.epoch)):
            clean_rate -= step
        return min(1., 1. - clean_rate)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, index = self._labels(output, target)
        logits = output.float()
        if self.mode == 'correct_permanent':
            labels = torch.maximum(labels, self.flipped[index].float())
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
        unobserved = labels < 0.5
        if self.rate() > 0:
            fraction = self.delta_rel / 100. if self.mode == 'correct_permanent' else self.rate()
            count = min(math.ceil(losses.numel() * fraction), losses.numel())
            masked = losses.detach() * unobserved
            threshold = masked.flatten().topk(count).values[-1]
            modified = unobserved & (masked >= threshold)
            if self.mode == 'reject':
                losses = losses * ~modified
            else:
                losses = torch.where(modified, F.softplus(-logits), losses)  # BCE against 1
                if self.mode == 'correct_permanent' and self.training:  # every rank's flips, on every rank
                    all_index, flips = all_gather_rows(index, unobserved & (masked > threshold))
                    rows, classes = flips.nonzero(as_tuple=True)
                    self.flipped[all_index[rows], classes] = True  # a repeated sample keeps every row's flips
        return losses.mean()


class EntropyMaximizationLoss(_SinglePositiveLoss):
    """EM; with `apl_beta > 0`, EM + APL as Correr-Zhou/SPML-AckTheUnknown runs it.

    APL: at the end of every epoch from `warmup_epochs` on, the training loop passes the model's probabilities on the
    whole training set to `pseudo_label`; per class, the int(negative_proportion * U_c / (num_epochs - warmup_epochs))
    unobserved, not yet pseudo-labelled entries with the lowest probability get that probability as a permanent soft
    target (U_c: the class's unobserved count). Pseudo-labelled entries leave the entropy term and add
    apl_beta * BCE(p, target).
    """

    def __init__(self, alpha: float = 0.1, apl_beta: float = 0., warmup_epochs: int = 5, num_epochs: int = 10,
                 negative_proportion: float = 0.9, num_samples: Optional[int] = None,
                 num_classes: Optional[int] = None):
        super().__init__()
        self.alpha = alpha
        self.apl_beta = apl_beta
        self.warmup_epochs = warmup_epochs
        self.num_epochs = num_epochs
        self.negative_proportion = negative_proportion
        self.epoch = 0.
        self.needs_index = apl_beta > 0
        if self.needs_index:
            if num_samples is None or num_classes is None:
                raise ValueError('EM+APL needs num_samples and num_classes for its per-sample pseudo-labels.')
            if num_epochs <= warmup_epochs:
                raise ValueError(f'EM+APL needs num_epochs ({num_epochs}) > warmup_epochs ({warmup_epochs}).')
            self.num_samples = num_samples
            self.register_buffer('pseudo_labelled', torch.zeros(num_samples, num_classes, dtype=torch.bool))
            self.register_buffer('pseudo_targets', torch.zeros(num_samples, num_classes))

    def pseudo_labels_due(self, epoch: int) -> bool:
        """Whether to pseudo-label after training epoch `epoch` (0-based; the reference counts from 1)."""
        return self.apl_beta > 0 and epoch + 1 >= self.warmup_epochs

    @torch.no_grad()
    def pseudo_label(self, probs: torch.Tensor, observed: torch.Tensor) -> int:
        """Add this epoch's pseudo-labels from (N, C) probabilities and observed labels of the training set; returns
        how many were added."""
        probs, observed = probs.to(self.pseudo_targets.device).float(), observed.to(probs.device) > 0.5
        per_epoch = (self.negative_proportion * (~observed).sum(0).double() /
                     (self.num_epochs - self.warmup_epochs)).long()
        added = 0
        for c in range(probs.shape[1]):
            candidates = torch.nonzero(~observed[:, c] & ~self.pseudo_labelled[:, c]).flatten()
            count = min(int(per_epoch[c]), len(candidates))
            if count == 0:
                continue
            chosen = candidates[probs[candidates, c].argsort(stable=True)[:count]]
            self.pseudo_targets[chosen, c] = probs[chosen, c]
            self.pseudo_labelled[chosen, c] = True
            added += count
        return added

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, index = self._labels(output, target)
        logits = output.float()
        probs = logits.sigmoid()
        observed = labels > 0.5
        positive = F.softplus(-logits) * observed
        entropy = -(probs * F.logsigmoid(logits) + (1 - probs) * F.logsigmoid(-logits))
        unknown = ~observed
        loss = positive
        if self.needs_index:
            pseudo = self.pseudo_labelled[index] & unknown
            unknown = unknown & ~pseudo
            soft = F.binary_cross_entropy_with_logits(logits, self.pseudo_targets[index], reduction='none')
            loss = loss + self.apl_beta * soft * pseudo
        return (loss - self.alpha * entropy * unknown).mean()


# EM / EM+APL defaults per dataset (Correr-Zhou/SPML-AckTheUnknown train.py)
EM_DEFAULTS = {
    'voc': dict(alpha=0.2, apl_beta=0.02, warmup_epochs=5),
    'coco': dict(alpha=0.1, apl_beta=0.9, warmup_epochs=5),
    'nuswide': dict(alpha=0.1, apl_beta=0.2, warmup_epochs=4),
    'cub': dict(alpha=0.01, apl_beta=0.4, warmup_epochs=3),
}


EXPECTED = 'expected_positives of the dataset'  # placeholder default, resolved from EXPECTED_POSITIVES
EM_DATASET = 'EM_DEFAULTS of the dataset'  # placeholder default, resolved from EM_DEFAULTS (COCO's elsewhere)

# name: (criterion class path, arguments the name fixes, defaults of the name that --loss-kwargs may override)
SINGLE_POSITIVE_LOSSES = {
    'an': ('AssumeNegativeLoss', {}, {}),
    'an-ls': ('AssumeNegativeLoss', {}, dict(smoothing=0.1)),
    'wan': ('WeakAssumeNegativeLoss', {}, {}),
    'epr': ('ExpectedPositiveLoss', {}, dict(expected_positives=EXPECTED)),
    'role': ('RoleLoss', {}, dict(expected_positives=EXPECTED)),
    'll-r': ('LargeLossLoss', dict(mode='reject'), {}),
    'll-ct': ('LargeLossLoss', dict(mode='correct_temporary'), {}),
    'll-cp': ('LargeLossLoss', dict(mode='correct_permanent'), {}),
    'em': ('EntropyMaximizationLoss', dict(apl_beta=0.), dict(alpha=EM_DATASET)),
    'em-apl': ('EntropyMaximizationLoss', {}, dict(alpha=EM_DATASET, apl_beta=EM_DATASET, warmup_epochs=EM_DATASET)),
    'consistency': ('SpatialConsistencyLoss', dict(spatial_weight=0.), {}),
    'en': ('SpatialConsistencyLoss', dict(negatives='en', spatial_weight=0.), {}),
    'spatial': ('SpatialConsistencyLoss', {}, {}),  # assume negative + consistency + spatial
    'en-spatial': ('SpatialConsistencyLoss', dict(negatives='en'), {}),  # the WACV paper's headline method
}
SIZED_ARGUMENTS = ('num_samples', 'num_classes')  # given by the factory, never by --loss-kwargs


def _criterion_class(name: str) -> type:
    if name not in SINGLE_POSITIVE_LOSSES:
        raise ValueError(f"Unknown single-positive loss '{name}'; choose from {sorted(SINGLE_POSITIVE_LOSSES)}.")
    from . import spatial_consistency  # imports this module: resolved at call time
    class_name = SINGLE_POSITIVE_LOSSES[name][0]
    return globals().get(class_name) or getattr(spatial_consistency, class_name)


def loss_options(name: str, dataset: str = 'coco') -> Dict[str, Any]:
    """The arguments `--loss-kwargs` may set for single-positive loss `name`, with their defaults."""
    parameters = inspect.signature(_criterion_class(name)).parameters
    _, fixed, defaults = SINGLE_POSITIVE_LOSSES[name]
    options = {key: parameter.default for key, parameter in parameters.items()
               if key not in fixed and key not in SIZED_ARGUMENTS and parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    for key, value in defaults.items():
        if value == EXPECTED:
            value = EXPECTED_POSITIVES.get(dataset, EXPECTED_POSITIVES['coco'])
        elif value == EM_DATASET:
            value = EM_DEFAULTS.get(dataset, EM_DEFAULTS['coco'])[key]
        options[key] = value
    return options


def _check_option_type(name: str, key: str, value: Any, default: Any) -> None:
    """Refuse an option whose value is not of its default's kind (a word for a number, a number for a name), before
    any state is built."""
    if isinstance(default, bool):
        expected, ok = 'True or False', isinstance(value, bool)
    elif isinstance(default, (int, float)):
        expected, ok = 'a number', isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        expected, ok = 'a name', isinstance(value, str)
    else:
        return
    if not ok:
        raise TypeError(f"loss '{name}' option {key}={value!r}: expected {expected} (default {default!r}).")


def create_single_positive_loss(name: str, num_samples: int, num_classes: int, dataset: str = 'coco', **kwargs) -> nn.Module:
    """Criterion by name (see SINGLE_POSITIVE_LOSSES): an, an-ls, wan, epr, role, ll-r, ll-ct, ll-cp, em, em-apl,
    consistency, en, spatial (assume negative + spatial), en-spatial (expected negatives + spatial)."""
    cls = _criterion_class(name)
    _, fixed, _ = SINGLE_POSITIVE_LOSSES[name]
    options = loss_options(name, dataset)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"loss '{name}' takes no argument {', '.join(unknown)}; it takes {', '.join(options) or 'none'}.")
    for key, value in kwargs.items():
        _check_option_type(name, key, value, options[key])
    # criteria with per-sample state take the sizes; LL and EM allocate it only in the modes that keep it
    sized = {key: value for key, value in dict(num_samples=num_samples, num_classes=num_classes).items()
             if key in inspect.signature(cls).parameters}
    return cls(**sized, **fixed, **dict(options, **kwargs))
