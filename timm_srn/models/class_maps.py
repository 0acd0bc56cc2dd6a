"""Class activation maps: a model's classifier applied at every position before pooling.

Shared by SRN (its `class_maps` output) and by the spatial consistency loss for plain timm
models, so both compute the maps the same way.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['class_activation_maps', 'token_grid_size']


def token_grid_size(model: nn.Module, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """Patch grid of a token model (ViT-style) for an input of `image_size`, None for NCHW models."""
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is None:
        return None
    if hasattr(patch_embed, 'dynamic_feat_size'):
        return tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
    return tuple(patch_embed.grid_size)


def class_activation_maps(
        features: torch.Tensor,
        pre_logits: Callable[[torch.Tensor], torch.Tensor],
        classifier: nn.Module,
        num_prefix_tokens: int = 0,
        grid_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Apply the head at every position of unpooled `features`, giving (B, num_classes, H, W) maps.

    Every position is fed to the model's own `pre_logits` (its `forward_head(x, pre_logits=True)`)
    as a 1x1 map (NCHW) or as a sequence whose every token is that position (NLC, so any pooling
    type selects it), so head norms and pooling act per position as they do on the whole image.
    For GAP + linear heads the spatial mean of the maps equals the logits exactly.

    Args:
        features: (B, D, H, W) maps or (B, N, D) tokens with `num_prefix_tokens` leading prefix tokens.
        pre_logits: The model's pooled pre-logits function.
        classifier: The linear classifier applied after `pre_logits`.
        num_prefix_tokens: Class / register tokens in front of the patch tokens (NLC only).
        grid_size: (H, W) of the patch tokens (NLC only).
    """
    if features.ndim == 4:
        batch, dim, height, width = features.shape
        folded = features.permute(0, 2, 3, 1).reshape(batch * height * width, dim, 1, 1)
    elif features.ndim == 3:
        if grid_size is None:
            raise ValueError('class_activation_maps needs grid_size for token (B, N, D) features.')
        tokens = features[:, num_prefix_tokens:]
        batch, num_tokens, dim = tokens.shape
        height, width = grid_size
        if height * width != num_tokens:
            raise ValueError(
                f'Token features have {num_tokens} patch tokens, which does not match grid {height}x{width}.')
        folded = tokens.reshape(batch * num_tokens, 1, dim).expand(-1, num_prefix_tokens + 1, -1)
    else:
        raise ValueError(f'Expected (B, D, H, W) or (B, N, D) features, got shape {tuple(features.shape)}.')
    logits = classifier(pre_logits(folded))
    return logits.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
