"""Atomic training checkpoints that resume exactly, in timm's checkpoint layout plus training state.

Keys follow timm ('state_dict', 'state_dict_ema', 'optimizer', 'epoch', 'arch', 'args'), so
`timm.models.load_checkpoint` reads the weights; 'scheduler', 'criterion', 'rng', 'step', 'best_metric'
and 'metrics' complete the training state, and 'checksum' (SHA-256 of everything else) is verified on load.
"""
import argparse
import hashlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

import numpy as np
import torch

__all__ = [
    'set_default_mode',
    'CheckpointError', 'write_atomic', 'save_atomic', 'load_checkpoint_file', 'state_checksum', 'remove_stale_temporaries',
    'rng_state', 'set_rng_state', 'create_model_from_checkpoint', 'load_model']

CHECKSUM_KEY = 'checksum'
_TMP_SUFFIX = '.tmp'


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or holding objects other than plain data."""


def _hash_into(hasher, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f'T{tensor.dtype}{tuple(tensor.shape)}'.encode())
        if tensor.numel():
            hasher.update(tensor.view(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f'D{len(value)}'.encode())
        for key, item in value.items():
            hasher.update(repr(key).encode())
            _hash_into(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f'{type(value).__name__[0]}{len(value)}'.encode())
        for item in value:
            _hash_into(hasher, item)
    else:
        hasher.update(repr(value).encode())


def state_checksum(state: Dict[str, Any]) -> str:
    """SHA-256 over every key, tensor byte and value of a checkpoint (its own 'checksum' entry excluded)."""
    hasher = hashlib.sha256()
    _hash_into(hasher, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return f'sha256:{hasher.hexdigest()}'


def set_default_mode(path: Union[str, Path]) -> None:
    """Give `path` the usual permissions of new files, 0666 less the umask (temporary files and some writers use
    0600, which other users of a shared output or Hub folder could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file in the same folder, fsync, then rename it over `path`: a crash leaves
    either the previous file or the new one, never a partial file. The file gets the usual permissions of new
    files (0666 less the umask). Every output of training (checkpoints, metrics, observed labels) is written so."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """`torch.save` of `state` plus its checksum, written atomically (`write_atomic`)."""
    write_atomic(path, lambda f: torch.save({**state, CHECKSUM_KEY: state_checksum(state)}, f))


def remove_stale_temporaries(folder: Union[str, Path]) -> int:
    """Delete the temporary files (`.NAME.*.tmp`) that `write_atomic` left in `folder` when its process was killed;
    returns the count."""
    stale = [p for p in Path(folder).glob(f'.*{_TMP_SUFFIX}') if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


def load_checkpoint_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: nothing in it is executed; only tensors, plain values and
    `argparse.Namespace` (the args of timm's own train.py) are accepted. Its zip records' CRC-32 and, where the
    file has one, its SHA-256 checksum are verified. Every failure raises `CheckpointError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad_record = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f'{path} is corrupt ({e}).') from e
        if bad_record is not None:
            raise CheckpointError(f'{path} is corrupt: record {bad_record} fails its CRC-32 check.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if found:
            raise CheckpointError(f'{path} holds objects other than tensors and plain values; refusing to load it '
                                  f'(it needs {found.group(1)}).') from e
        detail = re.search(r'WeightsUnpickler error:\s*([^\n]+)', str(e))
        reason = detail.group(1) if detail else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint ({reason[:200]}).') from e
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} holds a {type(state).__name__}, not a checkpoint dictionary.')
    if CHECKSUM_KEY in state and state[CHECKSUM_KEY] != state_checksum(state):
        raise CheckpointError(f'{path} is corrupt: its content does not match its stored SHA-256 checksum.')
    return state


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


def _model_args(state: Dict[str, Any]) -> Dict[str, Any]:
    """create_model arguments of a checkpoint: timm-srn's 'model_args', or those of timm's train.py ('args')."""
    if 'model_args' in state:
        return {k: v for k, v in state['model_args'].items() if k not in _SOURCE_ONLY_ARGS}
    args = state.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    model_args = dict(args.get('model_kwargs') or {})
    # img_size is a constructor argument of SRN (its f_sr kernel); timm's own models take their cfg size
    names = ('num_classes', 'in_chans') + (('img_size',) if str(state['arch']).startswith('srn') else ())
    model_args.update({name: args[name] for name in names if args.get(name) is not None and name not in model_args})
    return model_args


def create_model_from_checkpoint(path: Union[str, Path], use_ema: bool = False, **overrides) -> torch.nn.Module:
    """Rebuild the model of a training checkpoint (timm-srn's train.py or timm's own) and load its weights."""
    import timm
    state = load_checkpoint_file(path)
    if 'arch' not in state or 'state_dict' not in state:
        raise CheckpointError(f'{path} is not a training checkpoint (no arch / state_dict).')
    model = timm.create_model(state['arch'], pretrained=False, **{**_model_args(state), **overrides})
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in state:
        raise CheckpointError(f'{path} has no {key} (train with --model-ema for EMA weights).')
    try:
        model.load_state_dict(state[key])
    except RuntimeError as e:
        raise CheckpointError(f'{path}: weights do not fit {state["arch"]} ({str(e).splitlines()[0]}).') from e
    # what the weights were trained for (label names, input size, tag)
    model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v
                                 for k, v in state.get('pretrained_cfg', {}).items()})
    if model.pretrained_cfg.get('tag') in (None, '', 'untrained'):
        model.pretrained_cfg['tag'] = f'checkpoint_{Path(path).name.split(".")[0]}'
    return model


# sources that name weights: loading them means loading their weights unless pretrained=False is passed
_WEIGHT_SOURCES = ('local-dir:', 'hf-hub:')


def load_model(source: Union[str, Path], pretrained: Optional[bool] = None,
               weights: Optional[Union[str, Path]] = None, use_ema: bool = False,
               num_classes: Optional[int] = None) -> torch.nn.Module:
    """A trained model from a checkpoint file (timm-srn's or timm's train.py), a `local-dir:FOLDER` or
    `hf-hub:ORG/NAME` source (their weights are loaded: `pretrained` defaults to True there), or a registered
    name (`pretrained=True` for its published weights) with an optional local weights file (`weights=`) holding
    `num_classes` classes (default: the registered cfg's)."""
    import timm
    if Path(source).is_file():
        return create_model_from_checkpoint(source, use_ema=use_ema)
    if pretrained is None:
        pretrained = str(source).startswith(_WEIGHT_SOURCES)
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    # the file holds the classifiers too: never re-initialised, a class-count mismatch is an error
    overlay = dict(file=str(weights), **kwargs) if weights else None
    return timm.create_model(str(source), pretrained=pretrained or weights is not None, pretrained_cfg_overlay=overlay,
                             **kwargs)
