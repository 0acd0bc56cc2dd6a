"""timm's multi-label training task, with the criterion's per-sample state in timm's checkpoints.

timm 1.0.31's `CheckpointSaver` stores `task.get_task_state()` as 'task_state', and
`resume_task_checkpoint` hands it back to `task.load_task_state()`. `SinglePositiveTask` puts the
criterion's buffers there (EMA predictions, heatmaps, seen masks, epoch, LL-Cp flips, ROLE estimates),
so timm's own train.py resumes a single-positive run exactly.
"""
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import MultiLabelClassificationTask

__all__ = ['SinglePositiveTask', 'load_criterion_state']

CRITERION_KEY = 'criterion'


class SinglePositiveTask(MultiLabelClassificationTask):
    """`MultiLabelClassificationTask` whose checkpoints carry the criterion's state.

    Args:
        model: The model to train (attach the criterion to it first when it needs heatmaps).
        criterion: A timm_srn single-positive criterion (or any loss; stateless ones add nothing).
        mixup_active: Whether the training loop applies Mixup / CutMix. Mixing samples breaks per-sample
            buffers and single-positive labels, so True raises here, before training, with a clear message.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            mixup_active: bool = False,
            threshold: float = 0.5,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if mixup_active:
            raise ValueError(
                f'{type(criterion).__name__} trains on one observed label per sample with per-sample state; Mixup / '
                f'CutMix mix samples and labels. Disable them (--mixup 0 --cutmix 0, no --cutmix-minmax).')
        super().__init__(model, criterion, threshold=threshold, device=device, dtype=dtype, verbose=verbose)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The criterion's state_dict (once, with the live weights; the EMA copy shares the criterion)."""
        if ema or not isinstance(self.criterion, nn.Module):
            return {}
        state = self.criterion.state_dict()
        return {CRITERION_KEY: state} if state else {}

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        if ema or not isinstance(self.criterion, nn.Module):
            return
        expected = self.criterion.state_dict()
        if not expected:
            return
        saved = (state or {}).get(CRITERION_KEY)
        if saved is None:
            if strict:
                raise RuntimeError(
                    f'Checkpoint holds no {type(self.criterion).__name__} state (task_state.criterion): it was not '
                    f'written by a SinglePositiveTask, so per-sample buffers would restart empty.')
            return
        load_criterion_state(self.criterion, saved, strict=strict)


def load_criterion_state(criterion: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Restore a criterion's buffers; a state saved for another training set size or class count is named (one
    line) instead of torch's size-mismatch dump. Shared by `SinglePositiveTask` and train.py's resume."""
    expected = criterion.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise RuntimeError(
                f'Checkpoint criterion state {key} has shape {tuple(value.shape)} but this criterion needs '
                f'{tuple(expected[key].shape)} (another training set size or class count).')
    try:
        criterion.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f'Checkpoint criterion state does not fit {type(criterion).__name__}: '
                           f'{str(e).splitlines()[0]}') from e
