#!/usr/bin/env python3
"""Evidence for both papers' claims on the built-in scenes: one resumable study, 3 seeds per setting.

Setting close to the papers': a backbone (timm `test_resnet`, output stride 16: 7x7 final maps at 112 px) is first
pretrained with full labels on disjoint scenes labelled with the 8 object classes only (the stand-in for ImageNet:
objects, no arrangements), then every setting fine-tunes from it with `train_scripts/train.py`, RandomResizedCrop
scale (0.08, 1) (timm's and torchvision's default: strong crops).

- SRN claim: `srn_test_resnet` on the same backbone vs the plain backbone, full labels; mAP overall and on the
  arrangement classes ('kite above house', 'ball left of dog').
- Single-positive claims: AN, EN, consistency, spatial (AN + spatial), EN + spatial, full labels as the ceiling;
  plus the crop analysis: training images under fixed strong crops that cut out most (>= 75%) of their observed
  positive, scored against what the crop shows.
- Ablation of the spatial term: crop alignment, its weight, the EMA momentum, map resolution, warm-up.

Every figure is computed here from each run's final weights; the results JSON, a Markdown table (mean ± std over
seeds) and a PNG go to --out, and `--publish` copies them to benchmarks/results/ and regenerates the README section.

    python benchmarks/paper_claims.py                         # the whole study (about 40 min on 2 CPU cores)
    python benchmarks/paper_claims.py --only an spatial       # some settings (the pretrained backbone comes first)
    python benchmarks/paper_claims.py --report-only --publish # tables, plot and README from finished runs
"""
import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save
from torchvision.transforms import RandomResizedCrop
from tqdm import tqdm

from timm_srn.checkpoint import create_model_from_checkpoint, write_atomic
from timm_srn.data import SYNTHETIC_LABEL_NAMES, create_dataset, generate_synthetic_coco, protocol_split
from timm_srn.evaluation import IndexedDataset, eval_transform, predict
from timm_srn.metrics import average_precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from scripts import load_script  # noqa: E402  train.py imported as a module, as the tests do
from common import device_name  # noqa: E402

RESULTS_DIR = ROOT / 'benchmarks' / 'results'
README_START, README_END = '<!-- paper_claims:start -->', '<!-- paper_claims:end -->'
RELATIONS = ('kite above house', 'ball left of dog')
OBJECTS = tuple(name for name in SYNTHETIC_LABEL_NAMES if name not in RELATIONS)

# the study's fixed configuration (recorded in the results JSON)
CONFIG = dict(
    img_size=112, scene_size=128, train_scenes=1000, test_scenes=500, pretrain_scenes=1500, epochs=5,
    pretrain_epochs=5, batch_size=32, lr=2e-3, scale=(0.08, 1.0), backbone='test_resnet', output_stride=16,
    crops_per_image=4, cropped_out_below=0.25, visible_from=0.5, seeds=(0, 1, 2),
)
DATA_SEEDS = dict(train=101, val=102, pretrain_train=201, pretrain_val=202)

# name -> (group, model, loss, --loss-kwargs, extra backbone kwargs); 'plain' / 'srn' models on the backbone
SETTINGS: Dict[str, Tuple[str, str, str, Dict[str, Any], Dict[str, Any]]] = {
    'full': ('SRN', 'plain', 'bce', {}, {}),
    'srn': ('SRN', 'srn', 'bce', {}, {}),
    'an': ('single positive', 'plain', 'an', {}, {}),
    'en': ('single positive', 'plain', 'en', {}, {}),
    'consistency': ('single positive', 'plain', 'consistency', {}, {}),
    'spatial': ('single positive', 'plain', 'spatial', {}, {}),
    'en-spatial': ('single positive', 'plain', 'en-spatial', {}, {}),
    'spatial no-align': ('ablation', 'plain', 'spatial', dict(align_crops=False), {}),
    'spatial w=4': ('ablation', 'plain', 'spatial', dict(spatial_weight=4.0), {}),
    'spatial momentum 0.9': ('ablation', 'plain', 'spatial', dict(momentum=0.9), {}),
    'spatial 4x4 maps': ('ablation', 'plain', 'spatial', {}, dict(output_stride=32)),
    'spatial warm-up 3': ('ablation', 'plain', 'spatial', dict(warmup_epochs=3), {}),
}


def _slug(name: str) -> str:
    return name.replace(' ', '_').replace('=', '').replace('.', 'p')


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


# --- data -------------------------------------------------------------------------------------------------------

def prepare_data(out: Path) -> Tuple[Path, Path]:
    """Fine-tuning scenes (10 classes) and disjoint pretraining scenes labelled with the 8 object classes only."""
    finetune, pretrain = out / 'data' / 'finetune', out / 'data' / 'pretrain'
    size = CONFIG['scene_size']
    for root, split, num, seed in ((finetune, 'train', CONFIG['train_scenes'], DATA_SEEDS['train']),
                                   (finetune, 'val', CONFIG['test_scenes'], DATA_SEEDS['val']),
                                   (pretrain, 'train', CONFIG['pretrain_scenes'], DATA_SEEDS['pretrain_train']),
                                   (pretrain, 'val', CONFIG['test_scenes'], DATA_SEEDS['pretrain_val'])):
        ann_file = root / 'annotations' / f'instances_{split}.json'
        if ann_file.exists():
            continue
        generate_synthetic_coco(root, num, size, seed=seed, split=split)
        if root == pretrain:  # objects only: the arrangement classes are left for fine-tuning
            coco = json.loads(ann_file.read_text())
            keep = {c['id'] for c in coco['categories'] if c['name'] in OBJECTS}
            coco['categories'] = [c for c in coco['categories'] if c['id'] in keep]
            coco['annotations'] = [a for a in coco['annotations'] if a['category_id'] in keep]
            write_atomic(ann_file, lambda f: f.write(json.dumps(coco).encode()))
    return finetune, pretrain


def object_boxes(finetune: Path) -> Dict[str, Dict[int, Tuple[float, float, float, float]]]:
    """file name -> {column: box in [0, 1] of the image} of the fine-tuning train scenes (one box per class)."""
    coco = json.loads((finetune / 'annotations' / 'instances_train.json').read_text())
    column = {c['id']: i for i, c in enumerate(coco['categories'])}
    images = {im['id']: im for im in coco['images']}
    boxes: Dict[str, Dict[int, Tuple[float, float, float, float]]] = {}
    for ann in coco['annotations']:
        im = images[ann['image_id']]
        x, y, w, h = ann['bbox']
        boxes.setdefault(im['file_name'], {})[column[ann['category_id']]] = (
            x / im['width'], y / im['height'], (x + w) / im['width'], (y + h) / im['height'])
    return boxes


# --- training -----------------------------------------------------------------------------------------------------

def _backbone_kwargs(weights: Optional[Path], extra: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = {'output_stride': CONFIG['output_stride'], **extra}
    if weights is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
    return kwargs


def train_argv(data: Path, output: Path, seed: int, model: str, loss: str, loss_kwargs: Dict[str, Any],
               backbone_kwargs: Dict[str, Any], epochs: int, args: argparse.Namespace) -> List[str]:
    """train.py's arguments for one run: the plain backbone or SRN on it, initialised from the pretrained file."""
    argv = ['--dataset', 'synthetic', '--data-dir', str(data), '--output', str(output), '--seed', str(seed),
            '--img-size', str(CONFIG['img_size']), '--scale', *map(str, CONFIG['scale']), '--epochs', str(epochs),
            '--batch-size', str(CONFIG['batch_size']), '--lr', str(CONFIG['lr']), '--num-viz', '0', '--loss', loss,
            '--device', args.device, '--workers', str(args.workers)]
    if not args.progress_per_run:
        argv.append('--no-progress')
    if loss_kwargs:
        argv += ['--loss-kwargs', *(f'{k}={v}' for k, v in loss_kwargs.items())]
    pretrained = 'pretrained_cfg_overlay' in backbone_kwargs
    if model == 'srn':  # SRN's paper stage 4: everything end to end, BCE(y) + BCE(y_att); res4 (layer3) tap
        argv += ['--model', 'srn_test_resnet', '--srn-stage', '4', '--model-kwargs', 'tap_index=3',
                 f'backbone_kwargs={json.dumps(backbone_kwargs)}'] + (['--pretrained-backbone'] if pretrained else [])
    else:
        argv += ['--model', CONFIG['backbone'], '--model-kwargs', *(f'{k}={json.dumps(v)}' for k, v in backbone_kwargs.items())]
        argv += ['--pretrained'] if pretrained else []
    return argv


def run_training(argv: List[str], output: Path) -> None:
    """One train.py run, in this process; continues from last.pth.tar when an earlier attempt was cut off."""
    if (output / 'last.pth.tar').exists():
        argv = argv + ['--resume', str(output / 'last.pth.tar')]
    output.mkdir(parents=True, exist_ok=True)
    with open(output / 'stdout.txt', 'a') as log, contextlib.redirect_stdout(log):  # train.py's metric tables
        load_script('train').main(argv)


def pretrain(out: Path, pretrain_data: Path, args: argparse.Namespace) -> Path:
    """The backbone pretrained with full labels on the object-only scenes, saved as a timm weights file."""
    weights = out / 'pretrained' / 'test_resnet_os16_objects.safetensors'
    if weights.exists():
        return weights
    output = out / 'pretrained' / 'run'
    argv = train_argv(pretrain_data, output, 0, 'plain', 'bce', {}, _backbone_kwargs(None, {}),
                      CONFIG['pretrain_epochs'], args)
    run_training(argv, output)
    model = create_model_from_checkpoint(output / 'last.pth.tar')
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda f: f.write(save(state)))
    return weights


# --- evaluation ---------------------------------------------------------------------------------------------------

def _predict(model: torch.nn.Module, dataset, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`predict` over a dataset yielding (image, target, mask, index)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)
    return predict(model, loader, device, progress=False)


def class_aps(model: torch.nn.Module, dataset, device: torch.device) -> np.ndarray:
    return average_precision(*_predict(model, IndexedDataset(dataset), device)).numpy() * 100


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


def visible_fraction(box: Tuple[float, float, float, float], crop: Tuple[float, float, float, float]) -> float:
    w = max(0., min(box[2], crop[2]) - max(box[0], crop[0]))
    h = max(0., min(box[3], crop[3]) - max(box[1], crop[1]))
    return w * h / max((box[2] - box[0]) * (box[3] - box[1]), 1e-12)


def cropped_out_set(train, observed: np.ndarray, boxes, transform) -> CropSet:
    """Fixed RandomResizedCrop boxes (scale 0.08-1, seed 0) of the training images that leave less than
    `cropped_out_below` of the observed positive's box visible. Labels of a crop: classes with at least
    `visible_from` of their box visible are positive, classes not in view at all negative, the rest unknown."""
    generator = torch.Generator().manual_seed(0)
    canvas = torch.empty(1, 1000, 1000)  # crop boxes in thousandths of the image
    crops, targets, masks = [], [], []
    for row in range(len(train)):
        image_boxes = boxes[train.samples[row].name]
        (positive,) = np.flatnonzero(observed[row])
        for _ in range(CONFIG['crops_per_image']):
            with torch.random.fork_rng(devices=[]):  # get_params draws from the global generator: leave it as it was
                torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
                top, left, h, w = RandomResizedCrop.get_params(canvas, CONFIG['scale'], (3 / 4, 4 / 3))
            crop = (left / 1000, top / 1000, (left + w) / 1000, (top + h) / 1000)
            if visible_fraction(image_boxes[positive], crop) >= CONFIG['cropped_out_below']:
                continue
            visible = np.array([visible_fraction(image_boxes[c], crop) if c in image_boxes else 0.
                                for c in range(observed.shape[1])])
            crops.append((row, crop))
            targets.append((visible >= CONFIG['visible_from']).astype(np.float32))
            masks.append((visible >= CONFIG['visible_from']) | (visible == 0))
    return CropSet(train, crops, np.stack(targets), np.stack(masks), transform)


def crop_analysis(model: torch.nn.Module, crop_set: CropSet, device: torch.device) -> Dict[str, float]:
    scores, targets, masks = _predict(model, crop_set, device)
    correct = ((scores >= 0.5) == targets.bool()) & masks.bool()
    return dict(crop_mAP=float(np.nanmean(average_precision(scores, targets, masks).numpy()) * 100),
                crop_accuracy=float(correct.sum() / masks.sum() * 100), crops=len(crop_set))


def score_run(output: Path, finetune: Path, with_crops: bool, device: torch.device) -> Dict[str, Any]:
    """Test APs (held-out scenes) of the run's final weights and, `with_crops`, the crop analysis on the
    protocol's training images (the 80% every single-positive run trains on)."""
    model = create_model_from_checkpoint(output / 'last.pth.tar').to(device)
    transform = eval_transform(model, CONFIG['img_size'])
    test = create_dataset('synthetic', str(finetune), split='validation', transform=transform)
    aps = class_aps(model, test, device)
    names = list(test.label_names)
    relation_cols = [names.index(n) for n in RELATIONS]
    object_cols = [names.index(n) for n in OBJECTS]
    result = dict(mAP=float(aps.mean()), mAP_relations=float(aps[relation_cols].mean()),
                  mAP_objects=float(aps[object_cols].mean()), AP=dict(zip(names, map(float, aps))))
    if with_crops:
        train, _, observed, _ = protocol_split(create_dataset('synthetic', str(finetune), split='train'))
        result.update(crop_analysis(model, cropped_out_set(train, observed, object_boxes(finetune), transform), device))
    return result


# --- report -------------------------------------------------------------------------------------------------------

METRICS = ('mAP', 'mAP_relations', 'mAP_objects', 'crop_mAP', 'crop_accuracy')


def aggregate(runs: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Any]:
    settings = {}
    for name, seeds in runs.items():
        stats = {}
        for metric in METRICS:
            values = [r[metric] for r in seeds.values() if metric in r]
            if values:
                stats[metric] = dict(mean=statistics.fmean(values),
                                     std=statistics.stdev(values) if len(values) > 1 else 0., n=len(values))
        settings[name] = dict(group=SETTINGS[name][0], loss=SETTINGS[name][2], loss_kwargs=SETTINGS[name][3],
                              backbone_kwargs=SETTINGS[name][4], metrics=stats, seeds=seeds)
    return settings


def _cell(stats: Dict[str, Any], metric: str, bold: bool = False) -> str:
    if metric not in stats:
        return ''
    text = f"{stats[metric]['mean']:.2f} ± {stats[metric]['std']:.2f}"
    return f'**{text}**' if bold else text


def _setting_label(name: str, setting: Dict[str, Any]) -> str:
    if name == 'srn':
        return 'SRN (`srn_test_resnet`, stage-4 loss)'
    if name == 'full':
        return 'plain backbone, full labels'
    kwargs = ' '.join(f'{k}={v}' for k, v in {**setting['loss_kwargs'], **setting['backbone_kwargs']}.items())
    return f"`{setting['loss']}`" + (f' ({kwargs})' if kwargs else '')


def _delta(settings: Dict[str, Any], name: str, reference: str, metric: str) -> Optional[str]:
    """'name − reference' of a metric, paired by seed (same data order and initialisation of the new head):
    mean ± std over the seeds both ran, and how many of them favour `name`; None when nothing pairs."""
    if name not in settings or reference not in settings:
        return None
    a, b = settings[name]['seeds'], settings[reference]['seeds']
    diffs = [a[seed][metric] - b[seed][metric] for seed in a if seed in b and metric in a[seed] and metric in b[seed]]
    if not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.
    return f'{statistics.fmean(diffs):+.2f} ± {std:.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds up)'


def findings(settings: Dict[str, Any]) -> List[str]:
    """The differences the claims are about, computed from the same JSON."""
    rows = [('SRN − plain backbone', 'srn', 'full', ('mAP', 'mAP_relations')),
            *((f'`{n}` − `an`', n, 'an', ('mAP', 'mAP_relations', 'crop_mAP'))
              for n in ('en', 'consistency', 'spatial', 'en-spatial')),
            ('`spatial` − `consistency` (the spatial term alone)', 'spatial', 'consistency', ('mAP', 'crop_mAP')),
            *((f'{n} − `spatial`', n, 'spatial', ('mAP',)) for n, s in settings.items() if s['group'] == 'ablation')]
    lines = []
    for title, name, reference, metrics in rows:
        parts = [f'{m}: {d}' for m in metrics if (d := _delta(settings, name, reference, m)) is not None]
        if parts:
            lines.append(f'- {title}: ' + '; '.join(parts))
    return (['**Differences** (paired by seed: mean ± std of the per-seed differences)', ''] + lines + ['']) \
        if lines else []


def markdown(results: Dict[str, Any]) -> str:
    """The study's tables (what the README shows), from the results JSON alone."""
    settings = results['settings']
    cfg = results['config']
    lines = [f"Study: `python benchmarks/paper_claims.py` ({results['device']}, {results['minutes']:.0f} min; "
             f"mean ± std over seeds {', '.join(map(str, cfg['seeds']))}). `{cfg['backbone']}` (output stride "
             f"{cfg['output_stride']}: 7x7 maps at {cfg['img_size']} px) pretrained with full labels on "
             f"{cfg['pretrain_scenes']} disjoint scenes labelled with the 8 object classes, then fine-tuned "
             f"{cfg['epochs']} epochs on {cfg['train_scenes']} scenes with RandomResizedCrop scale "
             f"{tuple(cfg['scale'])}; test = {cfg['test_scenes']} held-out scenes. All numbers are mAP (%).", '']
    groups = [('SRN', 'SRN vs its plain backbone, full labels', ('mAP', 'mAP_relations', 'mAP_objects')),
              ('single positive', 'Single positive (full = the ceiling: all labels of all '
               f"{cfg['train_scenes']} training scenes)", METRICS),
              ('ablation', 'Spatial-term ablation (AN + spatial; each row changes one thing)', METRICS)]
    header = {'mAP': 'test mAP', 'mAP_relations': 'arrangement classes', 'mAP_objects': 'object classes',
              'crop_mAP': 'cropped-out: mAP', 'crop_accuracy': 'cropped-out: accuracy'}
    for group, title, metrics in groups:
        names = [n for n, s in settings.items() if s['group'] == group]
        if group == 'single positive' and 'full' in settings:
            names = ['full'] + names
        if group == 'ablation' and 'spatial' in settings:
            names = ['spatial'] + names
        if not [n for n in names if settings[n]['group'] == group]:
            continue
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
              ('crop_mAP', 'cropped-out training crops mAP (%)')]
    colours = {'SRN': '#4c72b0', 'single positive': '#dd8452', 'ablation': '#8c8c8c'}
    legend = {'SRN': 'full labels (SRN claim)', 'single positive': 'single positive', 'ablation': 'spatial ablation'}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.42 * len(settings) + 1.6), sharey=True)
    names = list(settings)
    for ax, (metric, title) in zip(axes, panels):
        means = [settings[n]['metrics'].get(metric, {}).get('mean', np.nan) for n in names]
        stds = [settings[n]['metrics'].get(metric, {}).get('std', 0.) for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=[colours[settings[n]['group']] for n in names],
                capsize=3, height=0.7)
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            ax.set_xlim(max(0., min(finite) - 10), min(100., max(finite) + max(stds) + 6))
        for y, (m, sd) in enumerate(zip(means, stds)):
            if np.isfinite(m):
                ax.text(m + sd, y, f'  {m:.1f}', va='center', fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis='x', alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, [legend[g] for g in colours], loc='lower center', ncol=3, frameon=False)
    fig.suptitle(f"paper claims on the built-in scenes: mean ± std over {len(results['config']['seeds'])} seeds",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f'{readme} has no {README_START} ... {README_END} block for the study.')
    readme.write_text(f'{head}{README_START}\n{table}{README_END}{tail}')


def readme_block(readme: Path) -> str:
    """The generated block of the README (between the markers, without them)."""
    return readme.read_text().partition(README_START)[2].partition(README_END)[0].lstrip('\n')


def write_report(out: Path, runs: Dict[str, Dict[int, Dict[str, Any]]], config: Dict[str, Any], device: str,
                 minutes: float, publish: bool) -> Dict[str, Any]:
    results = dict(config=config, device=device, minutes=minutes, settings=aggregate(runs))
    table = markdown(results)
    folders = [out] + ([RESULTS_DIR] if publish else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / 'paper_claims.json', results)
        write_atomic(folder / 'paper_claims.md', lambda f: f.write(table.encode()))
        plot(results, folder / 'paper_claims.png')
    if publish:
        update_readme(ROOT / 'README.md', table)
    return results


# --- driver -------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='output/paper_claims', help='runs, data and reports (resumable)')
    p.add_argument('--only', nargs='+', default=None, choices=list(SETTINGS), metavar='SETTING',
                   help='run only these settings: ' + ', '.join(f"'{n}'" for n in SETTINGS))
    p.add_argument('--seeds', type=int, nargs='+', default=list(CONFIG['seeds']), help='seeds of every setting')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--report-only', action='store_true', help='no training: report the finished runs')
    p.add_argument('--publish', action='store_true',
                   help='also write benchmarks/results/paper_claims.{json,md,png} and the README section')
    p.add_argument('--workers', type=int, default=2, help="train.py's data loader workers")
    p.add_argument('--progress-per-run', action='store_true', help="train.py's own progress bars too")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)  # train.py's INFO lines go to each run's train.log, not the console
    logging.basicConfig(level=logging.INFO, handlers=[console])
    device = torch.device(args.device)
    names = args.only or list(SETTINGS)
    started = time.time()
    timing_file = out / 'run_time.json'  # training minutes over every attempt, and the device that ran them
    spent = json.loads(timing_file.read_text())['minutes'] if timing_file.exists() else 0.
    if not args.report_only:
        finetune, pretrain_data = prepare_data(out)
        jobs = [(n, s) for n in names for s in args.seeds if not (out / 'runs' / _slug(n) / f'seed{s}' / 'result.json').exists()]
        weights = pretrain(out, pretrain_data, args) if jobs else None
        for name, seed in tqdm(jobs, desc='paper claims', unit='run'):
            group, model, loss, loss_kwargs, extra = SETTINGS[name]
            output = out / 'runs' / _slug(name) / f'seed{seed}'
            argv_run = train_argv(finetune, output, seed, model, loss, loss_kwargs, _backbone_kwargs(weights, extra),
                                  CONFIG['epochs'], args)
            run_training(argv_run, output)
            _write_json(output / 'result.json', score_run(output, finetune, model == 'plain', device))
            _write_json(timing_file, dict(minutes=spent + (time.time() - started) / 60, device=device_name(device)))
    runs = {}
    for name in SETTINGS:
        folder = out / 'runs' / _slug(name)
        seeds = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob('seed*/result.json'))}
        if seeds:
            runs[name] = seeds
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else dict(minutes=0., device=device_name(device))
    config = dict(CONFIG, seeds=tuple(args.seeds))
    results = write_report(out, runs, config, timing['device'], timing['minutes'], args.publish)
    print(markdown(results))
    return results


if __name__ == '__main__':
    main()
