"""Attention and heatmap overlays written as PNG grids.

- `save_model_overlays`: the input image, then per label (top-k by score, or chosen labels) the SRN
  attention map A, the weighted map U = A * sigmoid(S) and the main-branch class map, each overlaid on
  the image with a colour map and titled with the label name and probability. Non-SRN models: class maps.
- `save_buffer_overlays`: the spatial consistency buffer's stored EMA heatmaps of one training sample.
- CLI: `python -m timm_srn.viz --model NAME_OR_CHECKPOINT --image PATH --out PNG`.
"""
import argparse
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .checkpoint import load_model
from .evaluation import eval_transform
from .losses.heatmap_buffer import HeatmapBuffer
from .losses.heatmap_source import HeatmapSource
from .models.srn import SRN

__all__ = ['colourise', 'overlay', 'save_model_overlays', 'save_buffer_overlays']

TILE = 160
TITLE = 14
# viridis at 5 anchors: dark purple (low) -> yellow (high)
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def colourise(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] to (H, W, 3) uint8 colours."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heatmap: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """A heatmap (h, w), min-max normalised and bilinearly resized, blended over the image."""
    image = image.convert('RGB').resize((TILE, TILE))
    resized = F.interpolate(heatmap.float()[None, None], size=(TILE, TILE), mode='bilinear', align_corners=False)[0, 0]
    span = (resized.max() - resized.min()).clamp(min=1e-12)
    colours = colourise(((resized - resized.min()) / span).numpy())
    return Image.blend(image, Image.fromarray(colours), alpha)


def _grid(rows: List[List[Tuple[str, Image.Image]]], path: Union[str, Path]) -> Path:
    columns = max(len(r) for r in rows)
    canvas = Image.new('RGB', (columns * TILE, len(rows) * (TILE + TITLE)), 'white')
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (title, tile) in enumerate(row):
            x, y = c * TILE, r * (TILE + TITLE)
            draw.text((x + 2, y + 1), title[:28], fill='black')
            canvas.paste(tile, (x, y + TITLE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _input_tensor(model: nn.Module, image: Image.Image) -> torch.Tensor:
    return eval_transform(model)(image.convert('RGB'))[None].to(next(model.parameters()).device)


def _choose(probs: torch.Tensor, labels: Optional[Sequence[int]], top_k: int) -> List[int]:
    return list(labels) if labels is not None else probs.topk(min(top_k, len(probs))).indices.tolist()


@torch.no_grad()
def save_model_overlays(
        model: nn.Module,
        image: Image.Image,
        path: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        top_k: int = 3,
        labels: Optional[Sequence[int]] = None,
) -> Path:
    """Grid PNG of the model's maps for the top-k (or chosen) labels of `image`."""
    was_training = model.training
    model.eval()
    x = _input_tensor(model, image)
    if isinstance(model, SRN):
        out = model.forward_branches(x)
        probs = out.logits[0].sigmoid().cpu()
        maps = [('A', out.attention[0]), ('U', out.attention[0] * out.confidence[0].sigmoid()), ('cls', out.class_maps[0])]
    else:
        source = HeatmapSource(model)
        probs = model(x)[0].sigmoid().cpu()
        maps = [('cls', source.latest()[0])]
        source.remove()
    model.train(was_training)
    names = label_names or [str(i) for i in range(len(probs))]
    rows = []
    for label in _choose(probs, labels, top_k):
        row = [(f'{names[label]} {probs[label]:.2f}', image.convert('RGB').resize((TILE, TILE)))]
        row += [(kind, overlay(image, m[label].cpu())) for kind, m in maps]
        rows.append(row)
    return _grid(rows, path)


def save_buffer_overlays(
        buffer: HeatmapBuffer,
        index: int,
        image: Image.Image,
        path: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[int]] = None,
        top_k: int = 3,
) -> Path:
    """Grid PNG of the stored EMA heatmaps of training sample `index` next to its image."""
    full = torch.tensor([[0., 0., 1., 1.]], device=buffer.maps.device)
    maps, valid = buffer.read(torch.tensor([index], device=full.device), full,
                              torch.zeros(1, dtype=torch.bool, device=full.device), buffer.size)
    maps, valid = maps[0].cpu(), valid[0].cpu()
    strength = torch.where(valid, maps, torch.full_like(maps, -float('inf'))).flatten(1).max(1).values
    names = label_names or [str(i) for i in range(buffer.num_classes)]
    chosen = list(labels) if labels is not None else strength.topk(min(top_k, buffer.num_classes)).indices.tolist()
    row = [(f'sample {index}', image.convert('RGB').resize((TILE, TILE)))]
    row += [(f'{names[c]} (EMA)', overlay(image, maps[c])) for c in chosen]
    return _grid([row], path)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m timm_srn.viz', description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='registered model name, hf-hub:ORG/NAME, or a checkpoint file')
    parser.add_argument('--pretrained', action='store_true', default=None,
                        help='load the pretrained weights of a registered name (local-dir: / hf-hub: sources always load theirs)')
    parser.add_argument('--image', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--top-k', type=int, default=3)
    parser.add_argument('--labels', type=int, nargs='*', default=None, help='class indices instead of the top-k')
    args = parser.parse_args(argv)
    model = load_model(args.model, args.pretrained)
    names = model.pretrained_cfg.get('label_names') if hasattr(model, 'pretrained_cfg') else None
    path = save_model_overlays(model, Image.open(args.image), args.out, names, args.top_k, args.labels)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
