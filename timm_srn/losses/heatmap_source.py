"""Obtain per-class heatmaps from a model during its ordinary forward, which still returns plain logits."""
from typing import Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from ..models.class_maps import class_activation_maps
from ..models.srn import SRN

__all__ = ['HeatmapSource']

SRN_SOURCES = ('class_maps', 'attention', 'confidence')


class HeatmapSource:
    """Captures the heatmaps of the latest forward of `model`.

    SRN: its `class_maps` (or `attention` / `confidence`) through `register_output_hook`. Any other
    timm model: `forward_features` is wrapped to keep its output, and the maps are its own head applied
    at every position (`class_activation_maps`), whose spatial mean equals the logits for average-pool +
    linear heads. Families whose final features have no spatial layout (CrossViT, EfficientViM, PiT)
    raise a ValueError at the first call; SRN on the same backbone gives them maps.
    """

    def __init__(self, model: nn.Module, source: str = 'class_maps'):
        model = unwrap_model(model)
        self.maps: Optional[torch.Tensor] = None
        self._features = None
        if isinstance(model, SRN):
            if source not in SRN_SOURCES:
                raise ValueError(f'SRN heatmap source must be one of {SRN_SOURCES}, got {source!r}.')
            self._remove = model.register_output_hook(lambda out: setattr(self, 'maps', getattr(out, source))).remove
            return
        if source != 'class_maps':
            raise ValueError(f"Only SRN models have the {source!r} maps; plain timm models give 'class_maps'.")
        if not hasattr(model, 'forward_features') or not hasattr(model, 'get_classifier'):
            raise TypeError(f'{type(model).__name__} is not a timm classifier (no forward_features / get_classifier).')
        original = model.forward_features

        def forward_features(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            features = original(x, *args, **kwargs)
            self.maps = None
            self._features = (features, tuple(x.shape[-2:]))
            return features

        model.forward_features = forward_features
        self._model = model
        self._remove = lambda: delattr(model, 'forward_features')

    def latest(self) -> torch.Tensor:
        """Heatmaps (B, C, h, w) of the latest forward."""
        if self.maps is None and self._features is not None:
            features, image_size = self._features
            self.maps = class_activation_maps(self._model, features, image_size, self._model.forward_head)
            if self.maps is None:
                raise ValueError(
                    f'{type(self._model).__name__} has no per-position final features (they are a list of branches '
                    f'or a class token only), so its head gives no class maps. Use SRN on this backbone '
                    f"(timm.create_model('srn', backbone=...)) whose class maps fall back to its confidence maps.")
        if self.maps is None:
            raise RuntimeError('No heatmaps captured: run the attached model forward before calling the criterion.')
        return self.maps

    def clear(self) -> None:
        self.maps, self._features = None, None

    def remove(self) -> None:
        self._remove()
