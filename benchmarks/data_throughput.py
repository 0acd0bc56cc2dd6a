#!/usr/bin/env python3
"""train.py's training loader vs timm's `create_loader`, images/s side by side in one run.

Both read the same image folder (the built-in scenes) with the same timm training transform (timm's
`create_loader` builds it; train.py's loader gets that very transform). train.py's loader adds what single-positive
training needs: the crop box and flip recorded by `GeometryRecordingTransform`, label-correct flips and the packed
target (`PackedTargetDataset`); timm's reads the folder with its `ImageDataset`. Each loader runs whole epochs in
turn (A, B, A, B, ...); the ratio of the median images/s is the cost of the packing (target >= 0.95).

    python benchmarks/data_throughput.py                     # 512 scenes, 224 px, 2 workers
    python benchmarks/data_throughput.py --workers 0 --img-size 160
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timm.data import ImageDataset, create_loader

from timm_srn.data import PackedTargetDataset, create_dataset, generate_synthetic_coco, sample_single_positive

from common import benchmark_parser, load_script


def train_py_loader(data_dir: Path, transform, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """train.py's own `make_loader` over its single-positive training data (packed targets)."""
    dataset = create_dataset('synthetic', str(data_dir), split='train')
    observed = sample_single_positive(dataset.targets).labels
    options = argparse.Namespace(distributed=False, seed=0, batch_size=args.batch_size, workers=args.workers,
                                 device_obj=torch.device('cpu'))
    return load_script('train').make_loader(PackedTargetDataset(dataset, transform, observed), options, train=True)


def timm_loader(data_dir: Path, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    return create_loader(ImageDataset(str(data_dir / 'train')), input_size=(3, args.img_size, args.img_size),
                         batch_size=args.batch_size, is_training=True, scale=(0.08, 1.), hflip=0.5, re_prob=0.,
                         num_workers=args.workers, use_prefetcher=False, persistent_workers=False,
                         device=torch.device('cpu'))


def images_per_second(loader: torch.utils.data.DataLoader) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = benchmark_parser(__doc__)
    p.set_defaults(batch_size=32)
    p.add_argument('--data-dir', default=None, help='built-in scenes (default: generated in a temporary folder)')
    p.add_argument('--images', type=int, default=512, help='scenes to generate when --data-dir is not given')
    p.add_argument('--workers', type=int, default=2, help='loader workers of both loaders')
    p.add_argument('--rounds', type=int, default=3, help='epochs of each loader (medians are compared)')
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if args.data_dir is None:
            generate_synthetic_coco(data_dir, args.images, 128, seed=0, split='train')
        timm_side = timm_loader(data_dir, args)
        loaders = {'timm create_loader': timm_side, 'train.py': train_py_loader(data_dir, timm_side.dataset.transform, args)}
        rates = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(images_per_second(loader))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f'{len(timm_side.dataset)} images, {args.img_size} px, batch {args.batch_size}, {args.workers} workers, '
          f'{torch.get_num_threads()} threads; images/s (median of {args.rounds} epochs):')
    for name, value in medians.items():
        print(f'  {name:20} {value:8.1f}')
    print(f"ratio train.py / timm: {medians['train.py'] / medians['timm create_loader']:.3f} (target >= 0.95)")


if __name__ == '__main__':
    main()
