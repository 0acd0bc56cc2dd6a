#!/usr/bin/env python3
"""Spatial consistency criterion overhead, measured side by side in one run:

0. for every single-positive criterion: the aten ops of one call (each a kernel launch on a GPU), the backward ops
   beyond BCE's, and the host synchronisations per step (`timm_srn.op_count`; the same counts on any device);
   with --compiled-launches, the launches of the stateful criteria compiled by inductor (compile_backend);
1. one ResNet-50 train step (224, batch 32 where memory allows) with SpatialConsistencyLoss (read + align + loss +
   write back, class maps from a forward_features hook) vs the same step with plain BCE, as a ratio (target <= 1.02);
2. the buffer's read + write vs a plain index_select + index_copy_ of the same bytes;
3. buffer bytes for COCO (82,783 x 80) and ImageNet-1K (1.28M x 1000) in each storage mode.

    python benchmarks/loss_overhead.py                   # CPU, batch 8
    python benchmarks/loss_overhead.py --device cuda --batch-size 32 --amp bf16
    python benchmarks/loss_overhead.py --op-counts-only  # part 0 alone (CPU, seconds)
    python benchmarks/loss_overhead.py --op-counts-only --compiled-launches  # and 0b: the inductor-compiled criteria
"""
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

import timm
from timm_srn.data import pack_target
from timm_srn.losses import SINGLE_POSITIVE_LOSSES, HeatmapBuffer, SpatialConsistencyLoss, create_single_positive_loss
from timm_srn.op_count import compiled_launches, counting_batch, criterion_op_counts

from common import AMP_DTYPES, benchmark_parser, device_name, time_interleaved

DATASETS = {'COCO 2014 train': (82_783, 80), 'ImageNet-1K train': (1_281_167, 1000)}


def _counted(name: str, num_classes: int, num_samples: int, **kwargs) -> Tuple[torch.nn.Module, Callable]:
    """A fresh resnet18 and the criterion `name` attached to it, its warm-up epochs over."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=num_classes)
    if SINGLE_POSITIVE_LOSSES[name][0] == 'SpatialConsistencyLoss':
        kwargs['warmup_epochs'] = 0
    criterion = create_single_positive_loss(name, num_samples, num_classes, **kwargs)
    if hasattr(criterion, 'attach'):
        criterion.attach(model)
    return model, criterion


def print_op_counts(num_classes: int, num_samples: int = 1000, batch: int = 32) -> None:
    """Part 0: ops and synchronisations of one call of every single-positive criterion, after the warm-up epochs."""
    images, target = counting_batch(num_classes, num_samples, batch)
    print(f'aten ops per criterion call (batch {batch}, {num_classes} classes):')
    print(f"{'criterion':14}{'forward':>9}{'of which kernels':>18}{'backward beyond BCE':>21}{'host syncs':>12}")
    for name in SINGLE_POSITIVE_LOSSES:
        model, criterion = _counted(name, num_classes, num_samples)
        counts = criterion_op_counts(criterion, model, images, target)
        print(f'{name:14}{counts.forward:9d}{counts.forward_kernels:18d}{counts.backward_extra:21d}{counts.syncs:12d}')


def print_compiled_launches(num_classes: int, num_samples: int = 1000, batch: int = 32) -> None:
    """Part 0b: launches of one call and its backward with compile_backend='inductor', counted in the code inductor
    generates for this machine (a CPU's C++ kernels fuse more than a GPU's Triton kernels; minutes to compile)."""
    images, target = counting_batch(num_classes, num_samples, batch)
    print(f'launches per call with compile_backend=\'inductor\' ({device_name(torch.device("cpu"))} code):')
    print(f"{'criterion':14}{'forward':>9}{'backward':>10}")
    for name, (cls, _, _) in SINGLE_POSITIVE_LOSSES.items():
        if cls == 'SpatialConsistencyLoss':
            model, criterion = _counted(name, num_classes, num_samples, compile_backend='inductor')
            launches = compiled_launches(criterion, model, images, target)
            print(f'{name:14}{launches.forward:9d}{launches.backward:10d}')


def main():
    p = benchmark_parser(__doc__)
    p.add_argument('--num-samples', type=int, default=82_783, help='buffer rows (COCO train by default)')
    p.add_argument('--op-counts-only', action='store_true', help='print the op counts (part 0) and stop')
    p.add_argument('--compiled-launches', action='store_true',
                   help="also count the launches of the criteria with compile_backend='inductor' (part 0b, minutes)")
    args = p.parse_args()
    print_op_counts(args.num_classes)
    if args.compiled_launches:
        print_compiled_launches(args.num_classes)
    if args.op_counts_only:
        return
    device = torch.device(args.device)
    amp_dtype = AMP_DTYPES.get(args.amp)
    n, c, b = args.num_samples, args.num_classes, args.batch_size

    models = {name: timm.create_model('resnet50', num_classes=c).to(device).train() for name in ('bce', 'spatial')}
    models['spatial'].load_state_dict(models['bce'].state_dict())
    criteria = {
        'bce': lambda out, target: F.binary_cross_entropy_with_logits(out.float(), target[:, :c]),
        'spatial': SpatialConsistencyLoss(n, c, warmup_epochs=0, device=device).attach(models['spatial']),
    }
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    x = torch.randn(b, 3, args.img_size, args.img_size, device=device)
    generator = torch.Generator().manual_seed(0)

    def batch_target():
        index = torch.randint(0, n, (b,), generator=generator)
        return torch.stack([pack_target(torch.eye(c)[int(i) % c], int(i), (0.1, 0.05, 0.9, 0.85), bool(i % 2))
                            for i in index]).to(device)

    targets = [batch_target() for _ in range(64)]
    counter = iter(range(10 ** 9))

    def train_step(name):
        def step():
            target = targets[next(counter) % len(targets)]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = models[name](x)
            loss = criteria[name](output, target)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return step

    step_times = time_interleaved({k: train_step(k) for k in models}, device, steps=args.steps)

    buffer = criteria['spatial'].heatmaps
    maps = torch.randn(b, c, 7, 7, device=device)
    index = torch.randint(0, n, (b,), device=device)
    boxes = torch.tensor([[0.1, 0.05, 0.9, 0.85]], device=device).expand(b, 4)
    flips = torch.zeros(b, dtype=torch.bool, device=device)

    def buffer_read_write():
        buffer.read(index, boxes, flips, (7, 7))
        buffer.write(index, maps, boxes, flips, 0.9)

    flat = buffer.maps.view(n, -1)
    rows = maps.to(buffer.maps.dtype).view(b, -1)

    def plain_copy():
        flat.index_select(0, index)
        flat.index_copy_(0, index, rows)

    buffer_times = time_interleaved({'buffer': buffer_read_write, 'plain': plain_copy}, device, steps=args.steps)

    print(f'device: {device_name(device)}; resnet50 {args.img_size}px batch {b}, amp {args.amp}, buffer {n} x {c} x 7 x 7')
    ratio = step_times['spatial'] / step_times['bce']
    print(f"train step: BCE {step_times['bce']:.4f} s, spatial consistency {step_times['spatial']:.4f} s, "
          f"ratio {ratio:.3f} (target <= 1.02)")
    print(f"buffer read+write {buffer_times['buffer'] * 1e3:.3f} ms vs index_select+index_copy_ "
          f"{buffer_times['plain'] * 1e3:.3f} ms of the same bytes: ratio {buffer_times['buffer'] / buffer_times['plain']:.1f}; "
          f"{100 * buffer_times['buffer'] / step_times['bce']:.2f}% of the BCE step")
    print('\nbuffer bytes (7 x 7 maps, with the seen mask and class ids):')
    modes = {'dense fp16': dict(), 'dense fp32': dict(dtype=torch.float32), 'top-8 fp16': dict(classes_per_sample=8)}
    print(f"{'':20}" + ''.join(f'{m:>14}' for m in modes))
    for name, (rows_n, classes) in DATASETS.items():
        sizes = [HeatmapBuffer.dense_bytes(rows_n, classes, **kw) / 2 ** 30 for kw in modes.values()]
        print(f'{name:20}' + ''.join(f'{s:11.2f} GiB' for s in sizes))


if __name__ == '__main__':
    main()
