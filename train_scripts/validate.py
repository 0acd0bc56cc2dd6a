#!/usr/bin/env python3
"""Evaluate a training checkpoint, a weights file or a Hub model on a dataset; write every metric as JSON.

Examples:
    python train_scripts/validate.py --checkpoint output/train/last.pth.tar --dataset synthetic
    python train_scripts/validate.py --model srn_resnet101.coco_224 --pretrained --dataset coco --data-dir /data/coco
    python train_scripts/validate.py --model hf-hub:timm-srn/srn_resnet101.coco_224 --pretrained --dataset coco ...
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import timm

import timm_srn
from timm_srn.checkpoint import load_model
from timm_srn.cli import ArgumentParser, HelpFormatter
from timm_srn.data import DATASET_NAMES, create_dataset
from timm_srn.evaluation import AMP_DTYPES, IndexedDataset, eval_transform, evaluate
from timm_srn.metrics import METRIC_PRESETS
from timm_srn.models import ClassCountError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='a train.py checkpoint (last.pth.tar / best.pth.tar)')
    source.add_argument('--model', help='registered name (with tag) or hf-hub:ORG/NAME')
    p.add_argument('--pretrained', action='store_true', default=None,
                   help='with --model NAME: load its pretrained weights (local-dir: / hf-hub: sources always load theirs)')
    p.add_argument('--weights', default=None, help='with --model: a local weights file (safetensors or .pth)')
    p.add_argument('--use-ema', action='store_true', help='with --checkpoint: the EMA weights')
    p.add_argument('--dataset', default='synthetic', choices=DATASET_NAMES, help='dataset format (as train.py)')
    p.add_argument('--data-dir', default=None, help='dataset root (synthetic: data/synthetic when not given)')
    p.add_argument('--split', default='val', choices=('train', 'val'), help="split to evaluate ('val': the official validation set)")
    p.add_argument('--max-images', type=int, default=None, help='evaluate only the first N images')
    p.add_argument('--img-size', type=int, default=None, help="resolution; when not given, the model's trained input size")
    p.add_argument('--tta-flip', action='store_true', help='average the logits of the image and its mirror')
    p.add_argument('--metrics', default='default', choices=tuple(METRIC_PRESETS),
                   help="metric definitions: 'default' (exact AP, precision 0 without predictions) or 'srn' "
                        "(SRN's evaluate.m: VOC-2012 AP and its eps rule)")
    p.add_argument('--ap', default=None, choices=('noninterp', 'voc'), help='AP definition (overrides --metrics)')
    p.add_argument('--batch-size', type=int, default=64, help='images per forward')
    p.add_argument('--workers', type=int, default=2, help='data loader worker processes')
    p.add_argument('--amp', default=None, choices=tuple(AMP_DTYPES), help='mixed precision (autocast) dtype')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--output', default='validate.json', help='JSON file to write')
    return p


def load_model_and_data(args):
    """The model, then the dataset (a bad checkpoint stops before any data is read); a weights file is read for
    the dataset's class count, so a mismatch is named by the loader."""
    if args.weights:
        dataset = create_dataset(args.dataset, args.data_dir, args.split)
        return load_model(args.model, args.pretrained, args.weights, num_classes=dataset.num_classes), dataset
    model = load_model(args.checkpoint or args.model, args.pretrained, use_ema=args.use_ema)
    return model, create_dataset(args.dataset, args.data_dir, args.split)


def run(args) -> Dict[str, Any]:
    device = torch.device(args.device)
    try:
        model, dataset = load_model_and_data(args)
    except ClassCountError as e:
        raise SystemExit(f'validate.py: error: --weights {args.weights} were trained for {e.weights_classes} classes '
                         f'but {args.dataset} has {e.model_classes}: evaluate them on the data they were trained '
                         f'for') from e
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f'validate.py: error: {e}') from e
    if args.max_images:
        dataset = dataset.subset(range(min(args.max_images, len(dataset))))
    if model.num_classes != dataset.num_classes:
        raise SystemExit(f'validate.py: error: the model predicts {model.num_classes} classes but '
                         f'{args.dataset} has {dataset.num_classes}')
    dataset.transform = eval_transform(model, args.img_size)
    loader = torch.utils.data.DataLoader(IndexedDataset(dataset), batch_size=args.batch_size, num_workers=args.workers)
    amp_dtype = AMP_DTYPES.get(args.amp)
    metric_kwargs = dict(METRIC_PRESETS[args.metrics], **({'ap': args.ap} if args.ap else {}))
    metrics = evaluate(model.to(device), loader, device, metric_kwargs, amp_dtype=amp_dtype, tta_flip=args.tta_flip)
    settings = {k: v for k, v in vars(args).items() if k not in ('output',)}
    settings.update(img_size=args.img_size or model.pretrained_cfg['input_size'][-1], timm_srn_version=timm_srn.__version__,
                    timm_version=timm.__version__, num_classes=model.num_classes)
    result = dict(metrics=metrics, settings=settings)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    for name in ('mAP', 'CF1', 'CF1_harmonic', 'OF1', 'top3_CF1', 'top3_OF1'):
        print(f'{name:>14}: {metrics[name]:.2f}')
    print(f'wrote {args.output}')
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return run(build_parser().parse_args(argv))


if __name__ == '__main__':
    main()
