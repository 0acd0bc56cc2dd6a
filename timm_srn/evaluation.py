"""Evaluation loop shared by training, validate.py and the studies: the same code gives the same numbers."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from timm.utils import unwrap_model
from tqdm import tqdm

from .metrics import MultilabelMetricAccumulator, multilabel_metrics
from .models import SRN

__all__ = ['AMP_DTYPES', 'SRN_BRANCHES', 'IndexedDataset', 'evaluate', 'eval_transform', 'output_logits', 'predict',
           'predict_outputs']

# --amp names of the scripts
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# SRN branch name -> SRNOutput field ('fused' is what the model returns)
SRN_BRANCHES = {'fused': 'logits', 'y_cls': 'cls_logits', 'y_att': 'att_logits', 'y_sr': 'sr_logits'}


def eval_transform(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = 1.0):
    """timm's evaluation transform from the model's pretrained_cfg, by default on the whole image resized to the
    input size (no crop), as SRN's released test code does: a centre crop can cut labelled objects out of a
    multi-label scene, and every model is scored on the same view. `crop_pct=None` follows the model's cfg."""
    config = resolve_data_config(model=model)
    if img_size:
        config['input_size'] = (3, img_size, img_size)
    if crop_pct is not None:
        config.update(crop_pct=crop_pct, crop_mode='squash' if crop_pct == 1.0 else config.get('crop_mode', 'center'))
    return create_transform(**config, is_training=False)


class IndexedDataset(torch.utils.data.Dataset):
    """(image, target, mask, index): the index lets the metric accumulator drop DistributedSampler padding."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return img, target, torch.from_numpy(self.dataset.mask[index]), index


def output_logits(model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every output worth scoring of one forward: SRN's fused logits and each branch; other models' logits."""
    core = unwrap_model(model)
    if isinstance(core, SRN) and core.num_classes:
        branches = core.forward_branches(images)
        return {name: getattr(branches, field) for name, field in SRN_BRANCHES.items()}
    return {'fused': model(images)}


@torch.no_grad()
def predict_outputs(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        tta_flip: bool = False,
        distributed: bool = False,
        channels_last: bool = False,
        progress: bool = True,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({output name: probabilities}, targets, masks) of every sample of a loader of `IndexedDataset` (outputs of
    `output_logits`): across ranks, one row per dataset index, in dataset order. The model runs in eval mode
    and gets its mode back."""
    was_training = model.training
    model.eval()
    accumulators: Dict[str, MultilabelMetricAccumulator] = {}
    for images, targets, masks, index in tqdm(loader, desc='eval', leave=False, disable=not progress):
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = output_logits(model, images)
            if tta_flip:
                flipped = output_logits(model, images.flip(-1))
                outputs = {name: (logits.float() + flipped[name].float()) / 2 for name, logits in outputs.items()}
        for name, logits in outputs.items():
            accumulators.setdefault(name, MultilabelMetricAccumulator()).update(
                logits.float().sigmoid(), targets, masks, index)
    model.train(was_training)
    gathered = {name: acc.gathered(distributed=distributed, device=device) for name, acc in accumulators.items()}
    _, targets, masks = gathered['fused']
    return {name: scores for name, (scores, _, _) in gathered.items()}, targets, masks


def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
            **kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, targets, masks) of the model's output (`predict_outputs`' 'fused')."""
    scores, targets, masks = predict_outputs(model, loader, device, **kwargs)
    return scores['fused'], targets, masks


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             metric_kwargs: Optional[Dict[str, Any]] = None, **predict_kwargs) -> Dict[str, float]:
    """Every metric of `timm_srn.metrics.multilabel_metrics` (top-3 unless `metric_kwargs` say otherwise) of the
    model's output over a loader of `IndexedDataset`, plus `mAP_<branch>` of each SRN branch (same forward);
    `predict_kwargs` go to `predict_outputs`."""
    scores, targets, masks = predict_outputs(model, loader, device, **predict_kwargs)
    metric_kwargs = dict(dict(top_k=3), **(metric_kwargs or {}))
    metrics = multilabel_metrics(scores.pop('fused'), targets, mask=masks, **metric_kwargs)
    for name, branch_scores in scores.items():
        metrics[f'mAP_{name}'] = multilabel_metrics(branch_scores, targets, mask=masks, **metric_kwargs)['mAP']
    return metrics
