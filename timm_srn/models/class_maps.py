"""Class activation maps: a model's head applied at every position of its final features.

Shared by SRN (its `class_maps` output) and by the spatial consistency loss for plain timm
models, so both compute the maps the same way for every timm family: NCHW maps (CNNs), NHWC
maps (Swin, MambaOut, Hiera-det), and token sequences with or without prefix tokens (ViT, EVA,
VOLO, LeViT, Twins, MViT-v2, ...).
"""
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['class_activation_maps', 'feature_layout', 'token_grid']

# more leading tokens than this (class, distillation and register tokens) means the sequence is not a patch grid
MAX_PREFIX_TOKENS = 16

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def feature_layout(model: nn.Module, features: Features) -> Optional[str]:
    """'NCHW', 'NHWC' or 'NLC' for the final features of `model`, None when they have no spatial layout
    (a list of branches as in CrossViT / EfficientViM, or a class token only as in PiT)."""
    if not isinstance(features, torch.Tensor):
        return None
    if features.ndim == 4:
        if getattr(model, 'output_fmt', 'NCHW') == 'NHWC':
            return 'NHWC'
        num_features = getattr(model, 'num_features', None)
        channels_last = features.shape[-1] == num_features and features.shape[1] != num_features
        return 'NHWC' if channels_last else 'NCHW'
    return 'NLC' if features.ndim == 3 else None


def token_grid(model: nn.Module, image_size: Tuple[int, int], num_tokens: int) -> Optional[Tuple[int, int]]:
    """(H, W) patch grid holding the last tokens of a `num_tokens` sequence for an input of `image_size`.

    Tried in order: the patch embedding's grid (plain ViTs), then the image size divided by the final
    feature's reduction (hierarchical token models: LeViT, Twins, MViT-v2, VOLO, ...), rounded up or down.
    The first grid that leaves 0 to MAX_PREFIX_TOKENS leading tokens wins; None if none does.
    """
    candidates = []
    patch_embed = getattr(model, 'patch_embed', None)
    if hasattr(patch_embed, 'dynamic_feat_size'):
        candidates.append(tuple(patch_embed.dynamic_feat_size(tuple(image_size))))
    elif getattr(patch_embed, 'grid_size', None) is not None:
        candidates.append(tuple(patch_embed.grid_size))
    feature_info = getattr(model, 'feature_info', None)
    if feature_info:
        reduction = feature_info[-1]['reduction']
        for rounding in (math.ceil, math.floor, round):
            candidates.append(tuple(int(rounding(s / reduction)) for s in image_size))
    for height, width in candidates:
        if 0 <= num_tokens - height * width <= MAX_PREFIX_TOKENS:
            return height, width
    return None


@contextmanager
def frozen_norm_statistics() -> Iterator[None]:
    """BatchNorm layers that run inside the context in training mode normalise as usual but keep their running
    statistics, so heads with BatchNorm (LeViT, mobile nets) do not learn statistics of single positions from the
    class maps. Only the layers that do run are touched (none for a pooled linear head), found by a forward
    pre-hook held for the context's duration."""
    saved = {}

    def freeze(module: nn.Module, args) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats \
                and module not in saved:
            saved[module] = (module.momentum, module.num_batches_tracked.clone())
            module.momentum = 0.

    handle = nn.modules.module.register_module_forward_pre_hook(freeze)
    try:
        yield
    finally:
        handle.remove()
        for module, (momentum, count) in saved.items():
            module.momentum = momentum
            module.num_batches_tracked.copy_(count)


def class_activation_maps(
        model: nn.Module,
        features: Features,
        image_size: Tuple[int, int],
        head: Callable[[torch.Tensor], torch.Tensor],
) -> Optional[torch.Tensor]:
    """Apply `head` at every position of the final `features` of `model`, giving (B, num_classes, H, W) maps.

    Every position is fed to `head` (e.g. `model.forward_head`) in the model's own layout as a 1x1 map
    (NCHW / NHWC) or as a sequence whose every token is that position (NLC, so any pooling type, class
    token or average, selects it). Head norms and pooling thus act per position as on the whole image, and
    for average-pool + linear heads the spatial mean of the maps equals the logits exactly. BatchNorm running
    statistics of `model` are left as they were (`frozen_norm_statistics`).

    Returns None when the features have no spatial layout (see `feature_layout`) or the tokens fit no grid;
    callers pick their documented fallback.

    Args:
        model: The timm model (or SRN backbone) that produced `features`.
        features: Output of its `forward_features` for images of `image_size`.
        image_size: (H, W) of the input images.
        head: Maps pooled-layout features to logits.
    """
    layout = feature_layout(model, features)
    if layout == 'NCHW':
        batch, dim, height, width = features.shape
        folded = features.permute(0, 2, 3, 1).reshape(batch * height * width, dim, 1, 1)
    elif layout == 'NHWC':
        batch, height, width, dim = features.shape
        folded = features.reshape(batch * height * width, 1, 1, dim)
    elif layout == 'NLC':
        batch, num_tokens, dim = features.shape
        grid = token_grid(model, image_size, num_tokens)
        if grid is None:
            return None
        height, width = grid
        num_prefix_tokens = num_tokens - height * width
        tokens = features[:, num_prefix_tokens:]
        folded = tokens.reshape(batch * height * width, 1, dim).expand(-1, num_prefix_tokens + 1, -1)
    else:
        return None
    # low-precision features from float weights came from an autocast forward: the head runs in that precision
    # too, also when the caller (a criterion called after the autocast block) is outside it
    weight = next(model.parameters(), None)
    autocast_forward = folded.dtype in (torch.float16, torch.bfloat16) and weight is not None \
        and weight.dtype != folded.dtype
    precision = torch.autocast(folded.device.type, dtype=folded.dtype) if autocast_forward else nullcontext()
    with frozen_norm_statistics(), precision:
        logits = head(folded)
    return logits.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
