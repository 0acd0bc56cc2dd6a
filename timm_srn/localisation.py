"""Where per-class maps point: the share of present labels whose map argmax falls inside a box of that class.

A measurement for datasets with boxes (the built-in scenes): SRN's attention A, a plain model's class maps, the
spatial criterion's stored heatmaps and the maps of each training crop are scored the same way, so their
localisation can be compared.
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.utils import unwrap_model

from .data.targets import unpack_target
from .losses.heatmap_buffer import HeatmapBuffer
from .models import SRN, class_activation_maps

__all__ = ['argmax_in_box', 'cells_in_box', 'model_maps', 'map_localisation', 'buffer_localisation', 'boxes_in_crop',
           'visible_fractions', 'CropLocalisation', 'chance_localisation']


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


def cells_in_box(size: Tuple[int, int], boxes: np.ndarray) -> Dict[int, float]:
    """For one image: {column: share of the cells of a size-(h, w) map whose centre lies inside a box of that
    column}: how often an argmax drawn uniformly at random hits (the chance level of `argmax_in_box`)."""
    height, width = size
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    shares = {}
    for column in np.unique(boxes[:, 0]).astype(int):
        inside = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in boxes[boxes[:, 0] == column, 1:]:
            inside |= ((y0 <= y) & (y <= y1))[:, None] & ((x0 <= x) & (x <= x1))[None, :]
        shares[column] = float(inside.mean())
    return shares


def chance_localisation(boxes: Sequence[np.ndarray], observed: np.ndarray, size: Tuple[int, int],
                        crops: Optional[Sequence[Sequence[Tuple[Tuple[float, float, float, float], bool]]]] = None,
                        columns: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """The shares (%) a uniformly random argmax would score, per kind ('observed', 'other'), on size-(h, w) maps of
    the whole images, or with `crops` (per image, a list of (crop box, flip)) on the maps of those crops
    (`boxes_in_crop`, as `CropLocalisation` counts them); `columns` restricts the classes."""
    tally = _Tally()
    for row, image_boxes in enumerate(boxes):
        if columns is not None:
            image_boxes = image_boxes[np.isin(image_boxes[:, 0], columns)]
        views = [boxes_in_crop(image_boxes, crop, flip) for crop, flip in crops[row]] if crops is not None \
            else [image_boxes]
        for view in views:
            if len(view):
                tally.add(cells_in_box(size, view), observed[row])  # a hit counts its share of the cells
    return tally.shares()


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


class _Tally:
    """Hits and totals of the observed positive and of the other present classes."""

    def __init__(self):
        self.hits = dict(observed=0., other=0.)
        self.total = dict(observed=0, other=0)

    def add(self, hits: Dict[int, float], observed_row: np.ndarray) -> None:
        """One map per column: a hit (bool), or the chance of one (float)."""
        for column, hit in hits.items():
            kind = 'observed' if observed_row[column] > 0.5 else 'other'
            self.hits[kind] += hit
            self.total[kind] += 1

    def shares(self) -> Dict[str, float]:
        """Hits per map (%), per kind with maps."""
        return {kind: 100. * self.hits[kind] / self.total[kind] for kind in self.total if self.total[kind]}

    def result(self, prefix: str) -> Dict[str, float]:
        shares = {f'{prefix}_{kind}': share for kind, share in self.shares().items()}
        return dict(shares, **{f'{prefix}_{kind}_maps': self.total[kind] for kind in self.total})


@torch.no_grad()
def buffer_localisation(buffer: HeatmapBuffer, boxes: Sequence[np.ndarray], observed: np.ndarray,
                        batch_size: int = 256) -> Dict[str, float]:
    """What a heatmap buffer holds: the share (%) of stored per-class maps, of each sample's observed positive
    ('buffer_observed') and of its other classes with a box ('buffer_other'), whose argmax over the cells stored so
    far lies inside a box of that class, in the buffer's whole-image frame. Maps with no stored cell (never seen, or
    a class outside a top-k sample's set) are not counted. `boxes[i]` and `observed[i]` belong to buffer row i."""
    if len(boxes) != buffer.num_samples or len(observed) != buffer.num_samples:
        raise ValueError(f'{len(boxes)} box lists and {len(observed)} observed rows for a buffer of '
                         f'{buffer.num_samples} samples.')
    tally = _Tally()
    device = buffer.maps.device
    for start in range(0, buffer.num_samples, batch_size):
        index = torch.arange(start, min(start + batch_size, buffer.num_samples), device=device)
        whole = torch.tensor([[0., 0., 1., 1.]], device=device).expand(len(index), 4)
        maps, valid = buffer.read(index, whole, torch.zeros(len(index), dtype=torch.bool, device=device), buffer.size)
        maps = maps.masked_fill(~valid, -float('inf')).cpu()
        stored = valid.flatten(2).any(2).cpu()
        for sample_maps, row, stored_row in zip(maps, index.tolist(), stored):
            hits = argmax_in_box(sample_maps, boxes[row]) if len(boxes[row]) else {}
            tally.add({c: hit for c, hit in hits.items() if stored_row[c]}, observed[row])
    return tally.result('buffer')


def visible_fractions(boxes: np.ndarray, crop: Sequence[float]) -> np.ndarray:
    """The share of each (column, x0, y0, x1, y1) box's area inside a crop (x0, y0, x1, y1 in [0, 1] of the image)."""
    cx0, cy0, cx1, cy1 = crop
    width = np.maximum(0., np.minimum(boxes[:, 3], cx1) - np.maximum(boxes[:, 1], cx0))
    height = np.maximum(0., np.minimum(boxes[:, 4], cy1) - np.maximum(boxes[:, 2], cy0))
    return width * height / np.maximum((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2]), 1e-12)


def boxes_in_crop(boxes: np.ndarray, crop: Sequence[float], flip: bool, visible_from: float = 0.5) -> np.ndarray:
    """The (column, x0, y0, x1, y1) boxes of an image in the frame of a crop (x0, y0, x1, y1 in [0, 1] of the image,
    flipped horizontally after cropping when `flip`), cut to the crop; boxes with less than `visible_from` of their
    area in view are dropped (`visible_fractions`)."""
    cx0, cy0, cx1, cy1 = crop
    x0 = np.clip((boxes[:, 1] - cx0) / (cx1 - cx0), 0, 1)
    x1 = np.clip((boxes[:, 3] - cx0) / (cx1 - cx0), 0, 1)
    y0 = np.clip((boxes[:, 2] - cy0) / (cy1 - cy0), 0, 1)
    y1 = np.clip((boxes[:, 4] - cy0) / (cy1 - cy0), 0, 1)
    if flip:
        x0, x1 = 1. - x1, 1. - x0
    cut = np.stack([boxes[:, 0], x0, y0, x1, y1], axis=1)
    return cut[visible_fractions(boxes, crop) >= visible_from]


class CropLocalisation:
    """Running share (%) of the training crops' maps, of the observed positive ('crop_maps_observed') and of the
    other classes with a box in view ('crop_maps_other'), whose argmax lies in the visible part of a box of that class (see
    `boxes_in_crop`). Fed each step with the maps the criterion saw and the packed target (one host copy each)."""

    def __init__(self, boxes: Sequence[np.ndarray], observed: np.ndarray, visible_from: float = 0.5):
        self.boxes, self.observed, self.visible_from = boxes, observed, visible_from
        self._tally = _Tally()

    def update(self, maps: torch.Tensor, target: torch.Tensor) -> None:
        packed = unpack_target(target.detach().float().cpu(), maps.shape[1])
        if packed.index is None:
            raise ValueError('CropLocalisation needs packed targets (sample index and crop box).')
        maps = maps.detach().float().cpu()
        for sample_maps, row, crop, flip in zip(maps, packed.index.tolist(), packed.boxes.tolist(),
                                                packed.flips.tolist()):
            in_view = boxes_in_crop(self.boxes[row], crop, flip, self.visible_from) if len(self.boxes[row]) else []
            if len(in_view):
                self._tally.add(argmax_in_box(sample_maps, in_view), self.observed[row])

    def result(self) -> Dict[str, float]:
        """The shares since construction (or the last `reset`)."""
        return self._tally.result('crop_maps')

    def reset(self) -> None:
        self._tally = _Tally()
