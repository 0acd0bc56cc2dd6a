#!/usr/bin/env python3
"""Train multi-label models on timm's training pieces.

- Full labels: BCE or timm's multi-label losses; SRN's four stages (--srn-stage 1|2|3|4|all).
- Single positive labels (--loss an|spatial|...): the shared protocol (one positive per training image,
  seed 1200; 20% of train as a fully labelled val split; official val as test), packed targets with the
  sample index and crop geometry, any timm model.

With no arguments it generates the built-in synthetic dataset (if absent) and trains a small SRN on CPU.
Distributed: `torchrun --nproc_per_node N train_scripts/train.py ...` (nccl on GPU, gloo on CPU).
"""
import argparse
import datetime
import functools
import inspect
import json
import logging
import math
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import timm
from timm.data import create_transform, resolve_data_config
from timm.loss import create_classification_loss
from timm.loss._loss_factory import MULTI_LABEL_LOSS_TYPES
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, init_distributed_device, random_seed, unwrap_model

import timm_srn  # noqa: F401  registers the srn models
from timm_srn.cli import ArgumentParser, HelpFormatter
from timm_srn.checkpoint import (
    CheckpointError, load_checkpoint_file, remove_stale_temporaries, rng_state, save_atomic, set_rng_state,
    write_atomic)
from timm_srn.data import (
    DATASET_NAMES, PackedTargetDataset, create_dataset, find_unreadable, load_observed_labels, protocol_split,
    require_label_flip, save_observed_labels)
from timm_srn.evaluation import AMP_DTYPES, IndexedDataset, evaluate, eval_transform as evaluation_transform, predict
from timm_srn.localisation import CropLocalisation, buffer_localisation
from timm_srn.losses import SINGLE_POSITIVE_LOSSES, SRNStageLoss, create_single_positive_loss, loss_options
from timm_srn.task import load_criterion_state

_logger = logging.getLogger('train')

LOSSES = MULTI_LABEL_LOSS_TYPES + tuple(SINGLE_POSITIVE_LOSSES)
TIMM_LOSS_SHARED_OPTIONS = ('smoothing', 'class_weight', 'pos_weight')
TRAINED_CFG_KEYS = ('label_names', 'input_size', 'tag')  # pretrained_cfg entries set by training, kept in checkpoints
BENCHMARK_NAMES = {'voc2007': 'voc', 'voc2012': 'voc'}  # expected-positive counts (EPR / ROLE) by benchmark
METRIC_COLUMNS = ('mAP', 'CP', 'CR', 'CF1', 'CF1_harmonic', 'OP', 'OR', 'OF1', 'top3_CF1', 'top3_OF1')


class SetupError(Exception):
    """A bad argument or input found before training starts: printed as one line."""


class RunError(Exception):
    """A failure during training (diverged loss, unwritable checkpoint, stalled rank): printed as one line."""


def _kv(text: str) -> Dict[str, Any]:
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    return {key: yaml.safe_load(value)}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def loss_help(name: str, dataset: str) -> str:
    """The --loss-kwargs that loss `name` accepts, with their defaults (what --help-loss prints)."""
    if name in SINGLE_POSITIVE_LOSSES:
        options = loss_options(name, BENCHMARK_NAMES.get(dataset, dataset))
        source = f'timm_srn {SINGLE_POSITIVE_LOSSES[name][0]}'
    else:
        parameters = inspect.signature(create_classification_loss).parameters
        options = {key: parameter.default for key, parameter in parameters.items()
                   if key.startswith(f'{name}_') or key in TIMM_LOSS_SHARED_OPTIONS}
        source = 'timm.loss.create_classification_loss'
    lines = [f"--loss {name} ({source}) accepts --loss-kwargs:"]
    lines += [f'  {key}={value!r}' for key, value in options.items()] or ['  (none)']
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--config', default='', help='YAML file of argument defaults (keys as the long options)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='synthetic', choices=DATASET_NAMES,
                   help='synthetic is generated on first use; the others read the official files under --data-dir')
    g.add_argument('--data-dir', default=None,
                   help='dataset root; synthetic: data/synthetic when not given (generated on first use)')
    g.add_argument('--generate-data', action='store_true',
                   help='synthetic: generate the scenes in --data-dir when it holds none (otherwise refused, so a '
                        'misspelt path is not filled with a new dataset)')
    g.add_argument('--max-train-images', type=int, default=None, help='use only the first N training images')
    g.add_argument('--max-val-images', type=int, default=None, help='use only the first N validation images')
    g.add_argument('--skip-unreadable', action='store_true',
                   help='decode every image up front and drop those that fail (counted in the log)')
    g.add_argument('--check-images', action='store_true',
                   help='decode every image up front and stop with the list of unreadable files')
    g.add_argument('--workers', type=int, default=2, help='data loader worker processes')
    g.add_argument('--scale', type=float, nargs=2, default=(0.3, 1.0), help='RandomResizedCrop scale range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (training)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='srn_test_resnet', help='any registered model (srn_* or any timm model)')
    g.add_argument('--model-kwargs', nargs='*', default=[], type=_kv, help='extra create_model args, key=value')
    g.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained weights (timm / Hub)')
    g.add_argument('--pretrained-backbone', action='store_true', help='SRN: timm pretrained weights for the backbone')
    g.add_argument('--backbone-file', default=None, metavar='PATH',
                   help='weights file (safetensors / .pth) of the backbone architecture, e.g. ImageNet weights: a plain '
                        "model loads it as its pretrained weights (new classifier), SRN as its backbone's; "
                        "through timm's pretrained_cfg_overlay=dict(file=PATH)")
    g.add_argument('--num-classes', type=int, default=None, help='must match the dataset when given')
    g.add_argument('--img-size', type=int, default=128, help='training and evaluation input size (square)')
    g.add_argument('--srn-stage', default=None, choices=('1', '2', '3', '4', 'all'),
                   help="SRN's training stage (1 backbone + f_cls, 2 f_att, 3 f_sr, 4 all jointly); 'all' runs 1-4 in "
                        "turn. SRN models default to 4 with full labels: every branch trained from the first epoch")
    g.add_argument('--stage4-loss', default='paper', choices=('paper', 'released'),
                   help='stage 4 terms: paper BCE(y)+BCE(y_att); released BCE(y_cls)+BCE(y_att)+BCE(y_sr)')
    g.add_argument('--stage-epochs', type=_positive_int, nargs=4, default=None, metavar=('E1', 'E2', 'E3', 'E4'),
                   help="--srn-stage all: epochs of stages 1-4 (default: --epochs each)")
    g.add_argument('--stage-lr', type=float, nargs=4, default=None, metavar=('LR1', 'LR2', 'LR3', 'LR4'),
                   help="--srn-stage all: peak learning rates of stages 1-4 (default: --lr each)")
    g = p.add_argument_group('loss')
    g.add_argument('--loss', default='bce', choices=LOSSES, metavar='NAME',
                   help='full labels (timm): ' + ', '.join(MULTI_LABEL_LOSS_TYPES) +
                        '; single positive (observed labels drawn per image): ' + ', '.join(SINGLE_POSITIVE_LOSSES))
    g.add_argument('--loss-kwargs', nargs='*', default=[], type=_kv,
                   help='criterion options, key=value; --help-loss NAME lists those of a loss')
    g.add_argument('--help-loss', default=None, metavar='NAME', help='print the --loss-kwargs of loss NAME and exit')
    g.add_argument('--mixup', type=float, default=0., help='mixup alpha (full-label losses only)')
    g.add_argument('--cutmix', type=float, default=0., help='cutmix alpha (full-label losses only)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=_positive_int, default=8, help='epochs (per stage with --srn-stage all, unless --stage-epochs)')
    g.add_argument('--batch-size', type=_positive_int, default=32, help='per process')
    g.add_argument('--opt', default='adamw', help='any timm optimizer name (timm.optim.create_optimizer_v2)')
    g.add_argument('--lr', type=float, default=2e-3, help='peak learning rate')
    g.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    g.add_argument('--sched', default='cosine', help='any timm scheduler name (timm.scheduler.create_scheduler_v2)')
    g.add_argument('--warmup-epochs', type=int, default=1,
                   help='learning-rate warm-up epochs (once, at the start of the first stage)')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='batches per optimizer step')
    g.add_argument('--model-ema', action='store_true', help='also keep and evaluate an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.998, help='decay of --model-ema')
    g.add_argument('--amp', default=None, choices=tuple(AMP_DTYPES), help='mixed precision (autocast) dtype')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    g.add_argument('--torchcompile', default=None, help='torch.compile backend, e.g. inductor')
    g = p.add_argument_group('run')
    g.add_argument('--output', default='output/train',
                   help='folder for checkpoints, logs, metrics and PNGs; one holding another run is refused unless '
                        '--resume continues that run')
    g.add_argument('--resume', default='', help='checkpoint to continue from (last.pth.tar)')
    g.add_argument('--stop-after-epochs', type=int, default=None, help='stop after this many epochs of this run')
    g.add_argument('--seed', type=int, default=42, help='seed of the model init, data order and augmentation')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--dist-timeout', type=float, default=1800.,
                   help='seconds a distributed collective may wait for a stalled rank before the run stops')
    g.add_argument('--no-progress', action='store_true', help='no tqdm progress bars')
    g.add_argument('--num-viz', type=int, default=4, help='validation images to visualise at the end')
    g.add_argument('--measure-localisation', action='store_true',
                   help="spatial single-positive losses on data with boxes (the built-in scenes): record after each "
                        "epoch, in metrics.jsonl 'localisation', the share of stored heatmaps and of the training "
                        "crops' maps whose argmax lies in a box of their class (one host copy of the maps per step)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    config, remaining = parser.parse_known_args(argv)
    if config.config:
        with open(config.config) as f:
            parser.set_defaults(**{k.replace('-', '_'): v for k, v in yaml.safe_load(f).items()})
    args = parser.parse_args(argv)
    if args.help_loss:
        if args.help_loss not in LOSSES:
            parser.error(f"--help-loss: unknown loss '{args.help_loss}'; choose from {', '.join(LOSSES)}")
        print(loss_help(args.help_loss, args.dataset))
        sys.exit(0)
    args.model_kwargs = {k: v for d in args.model_kwargs for k, v in d.items()}
    args.loss_kwargs = {k: v for d in args.loss_kwargs for k, v in d.items()}
    args.command = ' '.join(['python train_scripts/train.py', *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return args


def is_srn_name(name: str) -> bool:
    return name.split('.')[0].startswith('srn')


def create_model(args, num_classes: int) -> nn.Module:
    base = args.model.split('.')[0]
    if not args.model.startswith('hf-hub:') and not timm.is_model(base):
        raise SetupError(f"unknown model '{args.model}' (not registered with timm; see timm.list_models())")
    kwargs = dict(args.model_kwargs)
    pretrained = args.pretrained
    if args.backbone_file and not Path(args.backbone_file).is_file():
        raise SetupError(f'--backbone-file {args.backbone_file}: no such file')
    if is_srn_name(args.model):
        kwargs.setdefault('img_size', args.img_size)
        if args.pretrained_backbone or args.backbone_file:
            kwargs['pretrained_backbone'] = True
        if args.backbone_file:
            backbone_kwargs = kwargs['backbone_kwargs'] = dict(kwargs.get('backbone_kwargs') or {})
            backbone_kwargs['pretrained_cfg_overlay'] = dict(backbone_kwargs.get('pretrained_cfg_overlay') or {},
                                                             file=args.backbone_file)
    elif args.backbone_file:
        pretrained = True
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=args.backbone_file)
    try:
        return timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SetupError(f"cannot create model '{args.model}': {e}") from e


def single_positive_split(args, train_full, output: Path):
    """The protocol: 80/20 split of official train (seed 1200) and one observed positive per training image,
    kept in the output folder so a resumed run trains on the same labels."""
    train, val, observed, num_without_positive = protocol_split(train_full)
    path = output / 'observed_labels.npy'
    if path.exists():
        try:
            observed = load_observed_labels(path, train.targets)
        except ValueError as e:
            raise SetupError(str(e)) from e
    else:
        if num_without_positive:
            _logger.warning(f'{num_without_positive} training images have no positive: no observed label.')
        if _is_primary(args):
            save_observed_labels(path, observed)
    return train, val, observed


def _is_primary(args) -> bool:
    return args.rank == 0


def build_criterion(args, model, num_samples: int, num_classes: int, stage: Optional[int]):
    try:
        return _build_criterion(args, model, num_samples, num_classes, stage)
    except TypeError as e:  # unexpected --loss-kwargs
        raise SetupError(f"--loss-kwargs {args.loss_kwargs} do not fit loss '{args.loss}': {e}") from e
    except ValueError as e:
        raise SetupError(f"loss '{args.loss}': {e}") from e


def _build_criterion(args, model, num_samples: int, num_classes: int, stage: Optional[int]):
    if args.loss in SINGLE_POSITIVE_LOSSES:
        if args.mixup or args.cutmix:
            raise SetupError(f"loss '{args.loss}' needs per-sample hard labels; mixup/cutmix mix samples")
        dataset = BENCHMARK_NAMES.get(args.dataset, args.dataset)
        kwargs = dict(args.loss_kwargs)
        if 'num_epochs' in loss_options(args.loss, dataset):  # EM+APL spreads its pseudo-labels over the run
            kwargs.setdefault('num_epochs', args.epochs)
        criterion = create_single_positive_loss(args.loss, num_samples, num_classes, dataset=dataset, **kwargs)
        criterion = criterion.to(args.device_obj)
        if hasattr(criterion, 'attach'):
            criterion.attach(model)
        return criterion
    base = create_classification_loss(args.loss, multi_label=True, soft_targets=bool(args.mixup or args.cutmix),
                                      **args.loss_kwargs)
    if stage is not None:
        return SRNStageLoss(stage, args.stage4_loss, base_loss=base).attach(model)
    return base


def make_loader(dataset, args, train: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
    if args.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=args.seed, drop_last=False)
        sampler.set_epoch(epoch)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed + epoch))
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=train,
        pin_memory=args.device_obj.type == 'cuda', persistent_workers=False)


def load_datasets(args):
    if args.dataset == 'synthetic' and args.data_dir is not None and not args.generate_data and \
            not (Path(args.data_dir) / 'annotations' / 'instances_train.json').exists():
        raise SetupError(f'--data-dir {args.data_dir} holds no built-in dataset (annotations/instances_train.json): '
                         f'check the path, omit --data-dir for data/synthetic, or add --generate-data to create it there')
    kwargs = dict(skip_unreadable=True) if args.skip_unreadable else {}
    try:
        datasets = [create_dataset(args.dataset, args.data_dir, split, **kwargs) for split in ('train', 'val')]
    except (ValueError, OSError) as e:
        raise SetupError(f'dataset {args.dataset}: {e}') from e
    for split, dataset in zip(('train', 'val'), datasets):
        if len(dataset) == 0:
            raise SetupError(f"dataset {args.dataset}: the {split} split has no images (--data-dir {args.data_dir})")
        if args.check_images:
            unreadable = find_unreadable(dataset.samples, progress=not args.no_progress)
            if unreadable:
                listed = '; '.join(f'{path} ({reason})' for _, path, reason in unreadable[:3])
                raise SetupError(f'dataset {args.dataset} {split}: {len(unreadable)} unreadable images: {listed}'
                                 f"{' ...' if len(unreadable) > 3 else ''} (--skip-unreadable drops them)")
    return tuple(datasets)


RUN_FILES = ('metrics.jsonl', 'last.pth.tar', 'best.pth.tar', 'summary.json')  # what marks a folder as a run's


def prepare_output(args, output: Path) -> None:
    """Create the output folder and prove it writable before any work; clear temporaries of a killed run. A folder
    holding another run is refused unless --resume continues it: a new run never damages another's outputs."""
    existing = [name for name in RUN_FILES if (output / name).exists()]
    if existing and not args.resume:
        raise SetupError(f'output folder {output} holds another run ({", ".join(existing)}): choose a new --output, or '
                         f'continue that run with --resume {output / "last.pth.tar"}')
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as e:
        raise SetupError(f'output folder {output} is not usable: {e.strerror or e}') from e
    removed = remove_stale_temporaries(output)
    if removed:
        _logger.info(f'removed {removed} temporary checkpoint files left by an interrupted run in {output}')


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_checkpoint(state: Dict[str, Any], path: Path) -> None:
    try:
        save_atomic(state, path)
    except OSError as e:
        raise RunError(f'cannot write checkpoint {path}: {e.strerror or e} (the previous file is intact)') from e


def load_resume_state(args) -> Dict[str, Any]:
    try:
        state = load_checkpoint_file(args.resume)
    except CheckpointError as e:
        raise SetupError(f'--resume: {e}') from e
    missing = [k for k in ('arch', 'state_dict', 'optimizer', 'scheduler', 'epoch', 'step', 'rng') if k not in state]
    if missing:
        raise SetupError(f'--resume {args.resume} is not a train.py training checkpoint (no {", ".join(missing)})')
    return state


@contextmanager
def collective_timeout(seconds: float):
    """timm's init_distributed_device with a timeout on every collective: a stalled rank fails the others."""
    original = dist.init_process_group
    dist.init_process_group = functools.partial(original, timeout=datetime.timedelta(seconds=seconds))
    try:
        yield
    finally:
        dist.init_process_group = original


def stages_to_run(args) -> List[Optional[int]]:
    """SRN stages of this run. SRN models default to stage 4 with full labels, so every branch (y_cls, y_att, y_sr)
    is trained; single-positive criteria see the fused output only (no stage)."""
    if args.srn_stage is None:
        return [4] if is_srn_name(args.model) and args.loss not in SINGLE_POSITIVE_LOSSES else [None]
    if not is_srn_name(args.model):
        raise SetupError(f'--srn-stage needs an SRN model, got {args.model}')
    return [1, 2, 3, 4] if args.srn_stage == 'all' else [int(args.srn_stage)]


def stage_schedule(args, stage_index: int) -> Dict[str, float]:
    """Epochs, peak learning rate and warm-up of a stage: --stage-epochs / --stage-lr with --srn-stage all,
    one warm-up at the start of the first stage only."""
    staged = args.srn_stage == 'all'
    return dict(
        epochs=args.stage_epochs[stage_index] if staged and args.stage_epochs else args.epochs,
        lr=args.stage_lr[stage_index] if staged and args.stage_lr else args.lr,
        warmup_epochs=args.warmup_epochs if stage_index == 0 else 0)


def checkpoint_state(args, model, optimizer, scheduler, criterion, ema, stage_index, epoch, step, best, metrics):
    core = unwrap_model(model)
    state = dict(
        arch=args.model, model_args=getattr(core, '_model_args', {}), args=_jsonable(args),
        state_dict=core.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        stage_index=stage_index, epoch=epoch, step=step, best_metric=best, metrics=metrics, rng=rng_state(),
        pretrained_cfg={k: core.pretrained_cfg[k] for k in TRAINED_CFG_KEYS})
    if isinstance(criterion, nn.Module):
        state['criterion'] = criterion.state_dict()
    if ema is not None:
        state['state_dict_ema'] = ema.module.state_dict()
    return state


def _jsonable(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))
            and k != 'device_obj'}


def train_one_epoch(args, model, loader, criterion, optimizer, scheduler, ema, epoch, step, mixup_fn, scaler, stage,
                    localisation: Optional[CropLocalisation] = None):
    model.train()
    if hasattr(criterion, 'set_epoch'):
        criterion.set_epoch(epoch)
    amp_dtype = AMP_DTYPES.get(args.amp)
    device = args.device_obj
    losses, start, seen = [], time.time(), 0
    bar = tqdm(loader, desc=f'train {epoch}' + (f' stage {stage}' if stage else ''), leave=False,
               disable=args.no_progress or not _is_primary(args))
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (images, target) in enumerate(bar):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_accum = (batch_idx + 1) % args.grad_accum_steps == 0 or batch_idx + 1 == len(loader)
        # DDP skips the gradient all-reduce on accumulation steps (no_sync lives on DDP, under any compile wrapper)
        sync = nullcontext() if last_accum or not args.distributed else getattr(model, '_orig_mod', model).no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            loss = criterion(output, target)
            if localisation is not None:
                localisation.update(criterion.latest_maps(), target)
            scaled = loss / args.grad_accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_accum:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(unwrap_model(model), step=step)
        losses.append(loss.item())
        if hasattr(criterion, 'raise_if_invalid'):  # bad input found on the device in the step, now the host waits anyway
            criterion.raise_if_invalid()
        if not math.isfinite(losses[-1]):
            raise RunError(f'loss is {losses[-1]} at epoch {epoch}, batch {batch_idx}: training diverged (lower --lr, '
                           f'or use --amp bf16 instead of fp16); last.pth.tar holds the previous epoch')
        seen += images.shape[0] * args.world_size
        bar.set_postfix(loss=f'{np.mean(losses[-20:]):.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f'{seen / (time.time() - start):.1f}')
    scheduler.step(epoch + 1)
    return float(np.mean(losses)) if losses else float('nan'), step, seen / (time.time() - start)


def run(args) -> Dict[str, Any]:
    output = Path(args.output)
    with collective_timeout(args.dist_timeout):
        device = init_distributed_device(args)
    args.device_obj = device
    if args.distributed:
        dist.barrier()
    random_seed(args.seed, args.rank)

    # --- data ---
    if _is_primary(args):  # rank 0 generates the synthetic data (if absent) before the others read it
        train_full, official_val = load_datasets(args)
    if args.distributed:
        dist.barrier()
        if not _is_primary(args):
            train_full, official_val = load_datasets(args)
    if args.max_train_images:
        train_full = train_full.subset(range(min(args.max_train_images, len(train_full))))
    if args.max_val_images:
        official_val = official_val.subset(range(min(args.max_val_images, len(official_val))))
    num_classes = train_full.num_classes
    try:
        require_label_flip(train_full, args.hflip)
    except ValueError as e:
        raise SetupError(f'--hflip {args.hflip:g}: dataset {args.dataset}: {e}') from e
    if args.num_classes is not None and args.num_classes != num_classes:
        raise SetupError(f'--num-classes {args.num_classes} differs from the {num_classes} classes of {args.dataset}')
    single_positive = args.loss in SINGLE_POSITIVE_LOSSES
    if single_positive:
        train_set, val_set, observed = single_positive_split(args, train_full, output)
        test_set = official_val
    else:
        train_set, val_set, observed, test_set = train_full, official_val, None, None

    # --- model ---
    model = create_model(args, num_classes)
    # what the weights are trained for: exports, cards and evaluation read these
    model.pretrained_cfg.update(label_names=tuple(train_full.label_names), input_size=(3, args.img_size, args.img_size),
                                tag=f'{args.dataset}_{args.img_size}' + (f'_{args.loss}' if single_positive else ''))
    stages = stages_to_run(args)
    if args.resume:
        resume_state = load_resume_state(args)
        if resume_state.get('arch') != args.model:
            raise SetupError(f"--resume {args.resume} holds a '{resume_state.get('arch')}' checkpoint, not '{args.model}'")
        try:
            model.load_state_dict(resume_state['state_dict'])
        except RuntimeError as e:
            raise SetupError(f'--resume {args.resume} does not fit this model: {state_dict_mismatch(e)}') from e
    else:
        resume_state = None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(model=model)
    train_transform = create_transform(**data_config, is_training=True, scale=tuple(args.scale), hflip=args.hflip,
                                       auto_augment=None, re_prob=0.)
    eval_transform = evaluation_transform(model, args.img_size)
    if single_positive:
        train_data = PackedTargetDataset(train_set, train_transform, observed)
    else:
        train_set.transform = train_transform
        train_data = train_set
    val_set.transform = eval_transform
    val_loader = make_loader(IndexedDataset(val_set), args, train=False)
    mixup_fn = None
    if args.mixup or args.cutmix:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=0., num_classes=num_classes)

    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if args.distributed else model
    train_model = torch.compile(ddp_model, backend=args.torchcompile) if args.torchcompile else ddp_model
    scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' and device.type == 'cuda' else None
    amp_dtype = AMP_DTYPES.get(args.amp)

    def _evaluate(eval_model, loader):
        return evaluate(eval_model, loader, device, amp_dtype=amp_dtype, distributed=args.distributed,
                        channels_last=args.channels_last, progress=not args.no_progress and _is_primary(args))

    metrics_file = output / 'metrics.jsonl'
    history: List[Dict[str, Any]] = []
    start_stage = resume_state['stage_index'] if resume_state else 0
    start_epoch = resume_state['epoch'] + 1 if resume_state else 0
    best = resume_state['best_metric'] if resume_state else -1.
    # built before any evaluation, so bad --loss-kwargs stop the run at once
    first_criterion = build_criterion(args, model, len(train_data), num_classes, stages[start_stage]) \
        if start_stage < len(stages) else None
    localisation = localisation_tracker(args, first_criterion, train_set, observed)
    if resume_state is not None and _is_primary(args) and 'metrics_lines' in resume_state:
        # records written after the checkpoint (a run killed mid-epoch) are dropped: every epoch appears once
        lines = metrics_file.read_text().splitlines()[:resume_state['metrics_lines']] if metrics_file.exists() else []
        write_text_atomic(metrics_file, ''.join(line + '\n' for line in lines))
    if resume_state is None:
        initial = _evaluate(model, val_loader)
        history.append(dict(epoch=-1, stage=None, eval=initial))
        if _is_primary(args):
            _logger.info(f"untrained: val mAP {initial['mAP']:.2f}")
            write_text_atomic(metrics_file, json.dumps(history[-1]) + '\n')
    epochs_this_run = 0
    last_eval: Dict[str, float] = {}
    criterion = None
    for stage_index in range(start_stage, len(stages)):
        stage = stages[stage_index]
        if stage is not None:
            model.set_stage(stage)
        criterion = first_criterion if stage_index == start_stage else \
            build_criterion(args, model, len(train_data), num_classes, stage)
        schedule = stage_schedule(args, stage_index)
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=schedule['lr'], weight_decay=args.weight_decay)
        if isinstance(criterion, nn.Module) and any(p.requires_grad for p in criterion.parameters()):
            # ROLE's label estimates train at their own multiple of the learning rate (Cole et al.: 10x)
            lr = schedule['lr'] * getattr(criterion, 'lr_multiplier', 1.)
            optimizer.add_param_group(dict(params=list(criterion.parameters()), lr=lr, weight_decay=0.))
        probe_loader = make_loader(train_data, args, train=True)
        updates_per_epoch = math.ceil(len(probe_loader) / args.grad_accum_steps)
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=schedule['epochs'], warmup_epochs=schedule['warmup_epochs'],
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)
        step = 0
        first_epoch = 0
        if resume_state is not None and stage_index == start_stage:
            optimizer.load_state_dict(resume_state['optimizer'])
            scheduler.load_state_dict(resume_state['scheduler'])
            if 'criterion' in resume_state:
                try:
                    load_criterion_state(criterion, resume_state['criterion'])
                except RuntimeError as e:
                    raise SetupError(f'--resume {args.resume}: {e}') from e
            if ema is not None and 'state_dict_ema' in resume_state:
                ema.module.load_state_dict(resume_state['state_dict_ema'])
            step, first_epoch, last_eval = resume_state['step'], start_epoch, resume_state['metrics']
            set_rng_state(resume_state['rng'])
            if first_epoch >= num_epochs:
                continue
        for epoch in range(first_epoch, num_epochs):
            if args.stop_after_epochs is not None and epochs_this_run >= args.stop_after_epochs:
                return dict(history=history, last_eval=last_eval, stopped=True)
            random_seed(args.seed + 1000 * stage_index + epoch, args.rank)  # resumable per-epoch randomness
            loader = make_loader(train_data, args, train=True, epoch=epoch)
            train_loss, step, throughput = train_one_epoch(
                args, train_model, loader, criterion, optimizer, scheduler, ema, epoch, step, mixup_fn, scaler, stage,
                localisation)
            if getattr(criterion, 'pseudo_labels_due', None) and criterion.pseudo_labels_due(epoch):
                add_pseudo_labels(args, model, criterion, train_set, observed, eval_transform, amp_dtype)
            last_eval = _evaluate(model, val_loader)
            record = dict(epoch=epoch, stage=stage, train_loss=train_loss, lr=optimizer.param_groups[0]['lr'],
                          img_per_s=throughput, eval=last_eval)
            if localisation is not None:
                record['localisation'] = dict(buffer_localisation(criterion.heatmaps, train_set.boxes, observed),
                                              **localisation.result())
                localisation.reset()
            if ema is not None:
                record['eval_ema'] = _evaluate(ema.module, val_loader)
            history.append(record)
            epochs_this_run += 1
            if _is_primary(args):
                _logger.info(f"epoch {epoch}{f' stage {stage}' if stage else ''}: loss {train_loss:.4f} "
                             f"val mAP {last_eval['mAP']:.2f} ({throughput:.1f} img/s)")
                with open(metrics_file, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                state = checkpoint_state(args, model, optimizer, scheduler, criterion, ema, stage_index, epoch, step,
                                         max(best, last_eval['mAP']), last_eval)
                state['metrics_lines'] = len(metrics_file.read_text().splitlines())
                # best first: last.pth.tar, which records the best metric, never points past a missing best file
                if last_eval['mAP'] > best:
                    write_checkpoint(state, output / 'best.pth.tar')
                write_checkpoint(state, output / 'last.pth.tar')
            best = max(best, last_eval['mAP'])
        resume_state = None
    summary = dict(args=_jsonable(args), last_eval=last_eval, best_mAP=best)
    if test_set is not None:
        test_set.transform = eval_transform
        summary['test'] = _evaluate(model, make_loader(IndexedDataset(test_set), args, train=False))
    if _is_primary(args):
        write_text_atomic(output / 'summary.json', json.dumps(summary, indent=2))
        table = metrics_table([json.loads(line) for line in metrics_file.read_text().splitlines()], summary)
        print(table)  # resumed runs too
        write_text_atomic(output / 'metrics_table.txt', table + '\n')
        write_visualisations(args, model, val_set, output, criterion, train_set)
    return dict(history=history, last_eval=last_eval, summary=summary, stopped=False)


def localisation_tracker(args, criterion, train_set, observed) -> Optional[CropLocalisation]:
    """--measure-localisation: the per-step record of the training crops' maps (None without the option); refused
    without a heatmap buffer or boxes."""
    if not args.measure_localisation:
        return None
    if getattr(criterion, 'heatmaps', None) is None:
        raise SetupError(f"--measure-localisation: loss '{args.loss}' keeps no heatmaps (use spatial or en-spatial)")
    if train_set.boxes is None:
        raise SetupError(f'--measure-localisation: dataset {args.dataset} has no boxes to measure against')
    return CropLocalisation(train_set.boxes, observed)


def add_pseudo_labels(args, model, criterion, train_set, observed, transform, amp_dtype) -> None:
    """EM+APL: the model's probabilities on every training image (evaluation transform) give the criterion this
    epoch's pseudo-labels; gathered over ranks, so every rank adds the same ones."""
    view = train_set.subset(range(len(train_set)))
    view.transform = transform
    probs, _, _ = predict(model, make_loader(IndexedDataset(view), args, train=False), args.device_obj,
                          amp_dtype=amp_dtype, distributed=args.distributed, channels_last=args.channels_last,
                          progress=not args.no_progress and _is_primary(args))
    added = criterion.pseudo_label(probs, torch.from_numpy(np.asarray(observed)))
    if _is_primary(args):
        _logger.info(f'APL: {added} new pseudo-labelled negatives ({int(criterion.pseudo_labelled.sum())} in all)')


def metrics_table(history: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    """Every evaluation of the run (and the test split) as a fixed-width table; SRN adds each branch's mAP."""
    columns = METRIC_COLUMNS + tuple(c for c in history[0]['eval'] if c.startswith('mAP_')) if history else METRIC_COLUMNS
    header = f"{'epoch':>6} {'stage':>5} " + ' '.join(f'{c:>12}' for c in columns)
    lines = [header, '-' * len(header)]
    rows = [('init' if r['epoch'] < 0 else str(r['epoch']), str(r.get('stage') or '-'), r['eval']) for r in history]
    if 'test' in summary:
        rows.append(('test', '-', summary['test']))
    for name, stage, metrics in rows:
        lines.append(f"{name:>6} {stage:>5} " + ' '.join(f"{metrics[c]:12.2f}" for c in columns))
    return '\n'.join(lines)


def write_visualisations(args, model, dataset, output: Path, criterion=None, train_set=None) -> None:
    """Attention / class-map grids of a few validation images (PNG) and, for criteria with a heatmap buffer, the
    stored EMA heatmaps of as many training images, for their ground-truth labels."""
    from timm_srn.viz import save_buffer_overlays, save_model_overlays
    count = min(args.num_viz, len(dataset))
    for index in range(count):
        true_labels = np.flatnonzero(dataset.targets[index] > 0).tolist()
        save_model_overlays(model, dataset.load_image(index), output / f'viz_val_{index}.png',
                            label_names=dataset.label_names, true_labels=true_labels)
    buffer = getattr(criterion, 'heatmaps', None)
    for index in range(min(args.num_viz, len(train_set)) if buffer is not None else 0):
        save_buffer_overlays(buffer, index, train_set.load_image(index), output / f'viz_train_heatmaps_{index}.png',
                             label_names=train_set.label_names,
                             labels=np.flatnonzero(train_set.targets[index] > 0).tolist())
    if count and _is_primary(args):
        _logger.info(f'wrote {count} visualisations to {output}' + (' (and the stored heatmaps of as many training '
                                                                    'images)' if buffer is not None else ''))


def state_dict_mismatch(error: RuntimeError) -> str:
    """The first reason of a `load_state_dict` error (e.g. the class count) and how many more there are."""
    reasons = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    if not reasons:
        return str(error).strip()
    first = re.sub(r'torch\.Size\(\[(.*?)\]\)', r'(\1)', reasons[0])
    return first + (f' (and {len(reasons) - 1} more)' if len(reasons) > 1 else '')


def worker_error(error: OSError) -> str:
    """The message of an error raised in a data loader worker (which wraps it in the worker's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.partition(': ')[2] if 'Original Traceback' in str(error) else last


def is_collective_failure(error: RuntimeError) -> bool:
    """A distributed collective that timed out or lost its peer (nccl raises DistBackendError, gloo RuntimeError)."""
    return isinstance(error, dist.DistBackendError) or (dist.is_initialized() and re.search(
        r'timed? ?out|timeout|pair closure|connection (reset|closed)', str(error), re.IGNORECASE) is not None)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    args = parse_args(argv)
    log_file = None
    try:
        prepare_output(args, Path(args.output))
        log_file = logging.FileHandler(Path(args.output) / 'train.log')
        logging.getLogger().addHandler(log_file)
        return run(args)
    except (SetupError, RunError) as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an unreadable image met during training (also from a loader worker)
        print(f'train.py: error: {worker_error(e)}', file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        print(f'train.py: error: rank {getattr(args, "rank", "?")}: a collective failed or timed out '
              f'(--dist-timeout {args.dist_timeout:g} s): another rank stalled or died ({str(e).splitlines()[0][:200]})',
              file=sys.stderr)
        sys.exit(2)
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
