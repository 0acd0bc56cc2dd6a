"""SRN's per-stage losses as a drop-in `criterion(output, target)`.

SRN's forward returns the fused logits only; the criterion reads the other branches of the same forward
through `SRN.register_output_hook`, so timm's training loop needs no change.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from ..models.srn import SRN, SRNOutput, srn_stage_loss

__all__ = ['SRNStageLoss']


class SRNStageLoss(nn.Module):
    """Stage 1: BCE(y_cls), 2: BCE(y_att), 3: BCE(y_sr), 4: 'paper' BCE(y) + BCE(y_att) or 'released'
    BCE(y_cls) + BCE(y_att) + BCE(y_sr). `base_loss` replaces BCE (e.g. one of timm's multi-label losses)."""

    def __init__(self, stage: int = 4, stage4_loss: str = 'paper',
                 base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.binary_cross_entropy_with_logits):
        super().__init__()
        self.stage = stage
        self.stage4_loss = stage4_loss
        self.base_loss = base_loss
        self._output: Optional[SRNOutput] = None
        self._handle = None

    def attach(self, model: nn.Module) -> 'SRNStageLoss':
        model = unwrap_model(model)
        if not isinstance(model, SRN):
            raise TypeError(f'SRN stage losses need an SRN model, got {type(model).__name__}.')
        if self._handle is not None:
            self._handle.remove()
        self._handle = model.register_output_hook(lambda out: setattr(self, '_output', out))
        return self

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._output is None or self._output.logits is not output:
            raise RuntimeError('SRNStageLoss needs the branches of this forward: call criterion.attach(model) '
                               'and pass the logits of the latest forward.')
        branches, self._output = self._output, None
        return srn_stage_loss(branches, target.to(output.dtype), self.stage, self.stage4_loss, self.base_loss)
