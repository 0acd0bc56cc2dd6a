"""Atomic training checkpoints that resume exactly, in timm's checkpoint layout plus training state.

Keys follow timm ('state_dict', 'state_dict_ema', 'optimizer', 'epoch', 'arch', 'args'), so
`timm.models.load_checkpoint` reads the weights; 'scheduler', 'criterion', 'rng', 'step', 'best_metric'
and 'metrics' complete the training state.
"""
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ['save_atomic', 'load_checkpoint_file', 'rng_state', 'set_rng_state', 'create_model_from_checkpoint', 'load_model']


def save_atomic(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash leaves either the
    previous checkpoint or the new one, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    return torch.load(path, map_location='cpu', weights_only=True)


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as types `torch.load(weights_only=True)` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    kind, key, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# create_model arguments that fetch weights or describe the source; a rebuilt model gets its weights from the file
_SOURCE_ONLY_ARGS = ('pretrained_backbone', 'pretrained_cfg_overlay', 'pretrained_cfg', 'checkpoint_path')


def create_model_from_checkpoint(path: Union[str, Path], use_ema: bool = False, **overrides) -> torch.nn.Module:
    """Rebuild the model of a training checkpoint (its 'arch' and 'model_args') and load its weights."""
    import timm
    state = load_checkpoint_file(path)
    if 'arch' not in state or 'state_dict' not in state:
        raise ValueError(f'{path} is not a timm-srn training checkpoint (no arch / state_dict).')
    model_args = {k: v for k, v in state.get('model_args', {}).items() if k not in _SOURCE_ONLY_ARGS}
    model_args.update(overrides)
    model = timm.create_model(state['arch'], pretrained=False, **model_args)
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in state:
        raise ValueError(f'{path} has no {key} (train with --model-ema for EMA weights).')
    model.load_state_dict(state[key])
    # what the weights were trained for (label names, input size)
    model.pretrained_cfg.update({k: tuple(v) for k, v in state.get('pretrained_cfg', {}).items()})
    return model


def load_model(source: Union[str, Path], pretrained: bool = False, weights: Optional[Union[str, Path]] = None,
               use_ema: bool = False) -> torch.nn.Module:
    """A model from a train.py checkpoint file, or by registered name / `hf-hub:` id with its pretrained weights
    (`pretrained=True`) or a local weights file (`weights=`, safetensors or .pth, via timm's loader)."""
    import timm
    if Path(source).is_file():
        return create_model_from_checkpoint(source, use_ema=use_ema)
    overlay = dict(file=str(weights)) if weights else None
    return timm.create_model(str(source), pretrained=pretrained or weights is not None, pretrained_cfg_overlay=overlay)
