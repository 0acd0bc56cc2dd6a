"""GPU paths of the criterion: the heatmap buffer on the GPU and AMP training steps (skipped without CUDA)."""
import pytest
import torch
import timm

from timm_srn.data import pack_target
from timm_srn.losses import HeatmapBuffer, SpatialConsistencyLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
C = 6


def _writes(generator):
    index = torch.randint(0, 32, (8,), generator=generator)
    maps = torch.rand(8, C, 5, 5, generator=generator)
    corner = torch.rand(8, 2, generator=generator) * 0.5
    boxes = torch.cat([corner, corner + 0.5], dim=1)
    flips = torch.rand(8, generator=generator) > 0.5
    return index, maps, boxes, flips


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_buffer_on_gpu_equals_buffer_on_cpu(dtype):
    buffers = {d: HeatmapBuffer(32, C, (7, 7), dtype=dtype, device=torch.device(d)) for d in ('cpu', 'cuda')}
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        index, maps, boxes, flips = _writes(generator)
        for device, buffer in buffers.items():
            buffer.write(index.to(device), maps.to(device), boxes.to(device), flips.to(device), momentum=0.5)
    index, _, boxes, flips = _writes(generator)
    (cpu_maps, cpu_valid), (gpu_maps, gpu_valid) = (
        buffer.read(index.to(d), boxes.to(d), flips.to(d), (5, 5)) for d, buffer in buffers.items())
    assert gpu_maps.is_cuda and buffers['cuda'].maps.is_cuda
    assert torch.equal(cpu_valid, gpu_valid.cpu())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(gpu_maps.cpu(), cpu_maps, rtol=tolerance, atol=tolerance)
    restored = HeatmapBuffer(32, C, (7, 7), dtype=dtype)
    restored.load_state_dict({k: v.cpu() for k, v in buffers['cuda'].state_dict().items()})
    torch.testing.assert_close(restored.maps, buffers['cuda'].maps.cpu(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_training_steps_on_gpu_follow_fp32(amp):
    """Spatial consistency under autocast (fp16 with a GradScaler) gives the fp32 loss within AMP tolerance and
    keeps its buffers on the GPU."""
    device = torch.device('cuda')
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=C).to(device)
    x = torch.randn(8, 3, 160, 160, device=device)
    target = torch.stack([pack_target(torch.eye(C)[i % C], i, (0.1, 0.0, 0.9, 0.8), bool(i % 2))
                          for i in range(8)]).to(device)
    losses = {}
    for name, dtype in (('fp32', None), (amp, torch.bfloat16 if amp == 'bf16' else torch.float16)):
        criterion = SpatialConsistencyLoss(8, C, warmup_epochs=0, device=device).attach(model)
        scaler = torch.amp.GradScaler('cuda', enabled=name == 'fp16')
        steps = []
        for _ in range(2):  # the second step reads what the first wrote
            with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None):
                output = model(x)
            loss = criterion(output, target)
            scaler.scale(loss).backward()
            model.zero_grad(set_to_none=True)
            steps.append(loss.item())
        assert criterion.heatmaps.maps.is_cuda and criterion.predictions.maps.is_cuda
        assert criterion.last_terms['spatial'] > 0
        losses[name] = steps
    torch.testing.assert_close(torch.tensor(losses[amp]), torch.tensor(losses['fp32']), rtol=3e-2, atol=1e-3)


def test_no_gpu_synchronisation_in_a_criterion_call():
    """The criterion checks its input on the device and never waits for it (torch's sync debug mode reports every
    synchronising call; `raise_if_invalid` is the one place that reads the device, outside the step)."""
    import traceback
    import warnings
    device = torch.device('cuda')
    model = timm.create_model('test_resnet', num_classes=C).to(device)
    criterion = SpatialConsistencyLoss(64, C, warmup_epochs=0, device=device).attach(model)
    x = torch.randn(8, 3, 96, 96, device=device)
    target = torch.stack([pack_target(torch.eye(C)[i % C], i, (0.1, 0.0, 0.9, 0.8), bool(i % 2))
                          for i in range(8)]).to(device)
    criterion(model(x), target)  # first write
    output = model(x)
    torch.cuda.synchronize()
    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if 'timm_srn' in f.filename]
        sites.append(' <- '.join(f"{f.filename.split('timm_srn')[-1]}:{f.lineno}" for f in frames[::-1][:3]))

    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            criterion(output, target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert not sites, sites
