"""Where per-class maps point: the share of present labels whose map argmax falls inside a box of that class.

A measurement for datasets with boxes (the built-in scenes): SRN's attention A, a plain model's class maps, or
the spatial criterion's stored heatmaps are scored the same way, so their localisation can be compared.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.utils import unwrap_model

from .models import SRN, class_activation_maps

__all__ = ['argmax_in_box', 'model_maps', 'map_localisation']


def argmax_in_box(maps: torch.Tensor, boxes: np.ndarray) -> Dict[int, bool]:
    """For one image: {column: whether the argmax cell centre of maps[column] lies inside a box of that column}
    for every column with a box. `maps` (C, h, w) cover the whole image; `boxes` (K, 5) rows of
    (column, x0, y0, x1, y1) in [0, 1]."""
    height, width = maps.shape[-2:]
    flat = maps.flatten(1).float().argmax(1).tolist()
    hits: Dict[int, bool] = {}
    for column in np.unique(boxes[:, 0]).astype(int):
        row, col = divmod(flat[column], width)
        x, y = (col + 0.5) / width, (row + 0.5) / height
        own = boxes[boxes[:, 0] == column, 1:]
        hits[column] = bool(((own[:, 0] <= x) & (x <= own[:, 2]) & (own[:, 1] <= y) & (y <= own[:, 3])).any())
    return hits


@torch.no_grad()
def model_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The per-class maps a model localises with: SRN's attention A, a plain model's class activation maps."""
    core = unwrap_model(model)
    if isinstance(core, SRN):
        return core.forward_branches(images).attention
    maps = class_activation_maps(core, core.forward_features(images), tuple(images.shape[-2:]), core.forward_head)
    if maps is None:
        raise ValueError(f'{type(core).__name__} has no spatial final features: no class maps to localise with.')
    return maps


@torch.no_grad()
def map_localisation(model: nn.Module, loader: torch.utils.data.DataLoader, boxes: Sequence[np.ndarray],
                     device: torch.device, columns: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Share (%) of present labels (restricted to `columns`) whose map argmax lies in a box of their class, over a
    loader of (image, target, mask, index) on the whole images (evaluation transform) and each image's boxes."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for images, _, _, index in loader:
        maps = model_maps(model, images.to(device)).cpu()
        for image_maps, row in zip(maps, index.tolist()):
            for column, hit in argmax_in_box(image_maps, boxes[row]).items():
                if columns is None or column in columns:
                    hits, total = hits + hit, total + 1
    model.train(was_training)
    return dict(localisation=100. * hits / max(total, 1), localised_labels=total)
