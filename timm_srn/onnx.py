"""ONNX export of SRN's fused forward (the `onnx` extra: `pip install timm-srn[onnx]`)."""
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['export_onnx']


def export_onnx(
        model: nn.Module,
        path: Union[str, Path],
        input_size: Optional[Tuple[int, int, int]] = None,
        dynamic_batch: bool = True,
) -> Path:
    """Export `model(x) -> logits` with torch's dynamo exporter (batch dimension dynamic) and check the graph."""
    import onnx
    model = model.eval()
    input_size = input_size or tuple(model.pretrained_cfg['input_size'])
    example = torch.randn(2, *input_size, device=next(model.parameters()).device)
    dynamic_shapes = ({0: torch.export.Dim('batch', min=1)},) if dynamic_batch else None
    path = Path(path)
    torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                      input_names=['images'], output_names=['logits'])
    onnx.checker.check_model(str(path))
    return path
