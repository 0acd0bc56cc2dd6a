"""Evaluation loop shared by training and validate.py: the same code gives the same numbers."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from .metrics import MultilabelMetricAccumulator, multilabel_metrics

__all__ = ['AMP_DTYPES', 'IndexedDataset', 'evaluate', 'eval_transform', 'predict']

# --amp names of the scripts
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def eval_transform(model: nn.Module, img_size: Optional[int] = None):
    """timm's evaluation transform from the model's pretrained_cfg (SRN: the whole image resized, no crop)."""
    config = resolve_data_config(model=model)
    if img_size:
        config['input_size'] = (3, img_size, img_size)
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


@torch.no_grad()
def predict(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        tta_flip: bool = False,
        distributed: bool = False,
        channels_last: bool = False,
        progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, targets, masks) of every sample of a loader of `IndexedDataset`: across ranks, one row per
    dataset index, in dataset order. The model runs in eval mode and gets its mode back."""
    was_training = model.training
    model.eval()
    accumulator = MultilabelMetricAccumulator()
    for images, targets, masks, index in tqdm(loader, desc='eval', leave=False, disable=not progress):
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
            if tta_flip:
                logits = (logits + model(images.flip(-1)).float()) / 2
        accumulator.update(logits.sigmoid(), targets, masks, index)
    model.train(was_training)
    return accumulator.gathered(distributed=distributed, device=device)


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             metric_kwargs: Optional[Dict[str, Any]] = None, **predict_kwargs) -> Dict[str, float]:
    """Every metric of `timm_srn.metrics.multilabel_metrics` (top-3 unless `metric_kwargs` say otherwise) over a
    loader of `IndexedDataset`; `predict_kwargs` go to `predict`."""
    scores, targets, masks = predict(model, loader, device, **predict_kwargs)
    return multilabel_metrics(scores, targets, mask=masks, **dict(dict(top_k=3), **(metric_kwargs or {})))
