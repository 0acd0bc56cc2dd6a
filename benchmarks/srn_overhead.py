#!/usr/bin/env python3
"""SRN head overhead: SRN-ResNet-101 vs ResNet-101 at 224 (train step and inference), measured side by side,
printed as ratios, plus the FLOP ratio from torch.utils.flop_counter. Targets: train <= 1.10, inference <= 1.08.

    python benchmarks/srn_overhead.py                    # CPU, batch 8
    python benchmarks/srn_overhead.py --device cuda --batch-size 64 --amp bf16 --channels-last
"""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_srn  # noqa: F401

from common import AMP_DTYPES, benchmark_parser, device_name, time_interleaved


def main():
    p = benchmark_parser(__doc__)
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format for both models')
    args = p.parse_args()
    device = torch.device(args.device)
    amp_dtype = AMP_DTYPES.get(args.amp)
    models = {
        'resnet101': timm.create_model('resnet101', num_classes=args.num_classes),
        'srn_resnet101': timm.create_model('srn_resnet101', num_classes=args.num_classes, img_size=args.img_size),
    }
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, 2, (args.batch_size, args.num_classes), device=device).float()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizers = {}
    for name, model in models.items():
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step(name):
        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.binary_cross_entropy_with_logits(models[name](x).float(), target)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return step

    def infer(name):
        @torch.no_grad()
        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                models[name](x)
        return step

    for model in models.values():
        model.train()
    train = time_interleaved({n: train_step(n) for n in models}, device, steps=args.steps)
    for model in models.values():
        model.eval()
    inference = time_interleaved({n: infer(n) for n in models}, device, steps=args.steps)
    flops = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x[:1])
        flops[name] = counter.get_total_flops()

    print(f'device: {device_name(device)}; batch {args.batch_size}, {args.img_size}px, amp {args.amp}, '
          f'channels_last {args.channels_last}')
    print(f"{'':16}{'resnet101':>12}{'srn_resnet101':>15}{'ratio':>8}{'target':>8}")
    for label, times, target_ratio in (('train step s', train, 1.10), ('inference s', inference, 1.08)):
        ratio = times['srn_resnet101'] / times['resnet101']
        print(f"{label:16}{times['resnet101']:12.4f}{times['srn_resnet101']:15.4f}{ratio:8.3f}{target_ratio:8.2f}")
    print(f"{'GFLOPs/img':16}{flops['resnet101'] / 1e9:12.2f}{flops['srn_resnet101'] / 1e9:15.2f}"
          f"{flops['srn_resnet101'] / flops['resnet101']:8.3f}{'~1.08':>8}")
    print_breakdown(models, x, device, amp_dtype, inference['resnet101'], args.steps)


@torch.no_grad()
def print_breakdown(models, x, device, amp_dtype, baseline: float, steps: int) -> None:
    """Where SRN's extra inference time goes: each head part as a share of the ResNet-101 forward."""
    srn = models['srn_resnet101']
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        final, (tap,) = srn.backbone.forward_intermediates(
            x, indices=[srn.tap_index], output_fmt='NCHW', intermediates_only=False)
        _, attention, confidence = srn.attention(tap)
        weighted = attention * confidence.sigmoid()
        parts = {
            'backbone + tap': lambda: srn.backbone.forward_intermediates(
                x, indices=[srn.tap_index], output_fmt='NCHW', intermediates_only=False),
            'f_att + conf': lambda: srn.attention(tap),
            'f_sr': lambda: srn.regularizer(weighted),
            'class maps': lambda: timm_srn.class_activation_maps(srn.backbone, final, tuple(x.shape[-2:]), srn.forward_head),
        }
        times = time_interleaved(parts, device, steps=steps)
    print('inference breakdown (share of the resnet101 forward):')
    for name, seconds in times.items():
        print(f'  {name:16}{100 * seconds / baseline:7.1f}%')


if __name__ == '__main__':
    main()
