"""Deployment paths of SRN: torch.compile, channels_last, bf16 autocast, ONNX export of the fused forward."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import timm

from timm_srn.losses import SpatialConsistencyLoss
from timm_srn.onnx import export_onnx


def _model(name='srn_test_resnet'):
    return timm.create_model(name, num_classes=5).eval()


@pytest.mark.parametrize('backend', ['eager', 'aot_eager'])
def test_torch_compile(backend):
    model = _model()
    x = torch.randn(2, 3, 160, 160)
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_training_step_with_output_hooks():
    torch._dynamo.reset()
    model = _model().train()
    criterion = SpatialConsistencyLoss(4, 5, warmup_epochs=0).attach(model)
    compiled = torch.compile(model, backend='aot_eager')
    from timm_srn.data import pack_target
    target = torch.stack([pack_target(torch.eye(5)[i], i) for i in range(2)])
    loss = criterion(compiled(torch.randn(2, 3, 160, 160)), target)
    loss.backward()
    assert model.attention.conv1.weight.grad is not None and criterion.heatmaps.seen[:2].all()


def test_channels_last():
    model = _model()
    x = torch.randn(2, 3, 160, 160)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['srn_test_resnet', 'srn_test_vit'])
def test_bf16_autocast(name):
    model = _model(name)
    x = torch.randn(2, 3, 160, 160)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.forward_branches(x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    torch.testing.assert_close(out.logits.float(), model(x), rtol=0.1, atol=0.1)
    torch.testing.assert_close(out.attention.float().sum(dim=(2, 3)), torch.ones(2, 5), rtol=0.02, atol=0.02)


def test_onnx_export_matches_pytorch(tmp_path):
    model = _model()
    path = export_onnx(model, tmp_path / 'srn.onnx')
    session = ort.InferenceSession(str(path))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 160)
        (logits,) = session.run(None, {'images': x.numpy()})
        np.testing.assert_allclose(logits, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
