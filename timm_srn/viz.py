"""Attention and heatmap overlays written as PNG grids.

- `save_model_overlays`: a header with the ground-truth and predicted labels, then per label (every
  ground-truth label, then the top-k by score; or chosen labels) the image with the label's probability, the SRN
  attention map A, the weighted map U = A * sigmoid(S) and the main-branch class map as a probability (non-SRN
  models: class maps), each in the inferno colour map over a dimmed grey copy of the image. A column shares one
  scale over its rows (class maps: 0 to 1), so an absent label's map stays dark; value ranges, a colour bar and a
  legend say so.
- `save_buffer_overlays`: the spatial consistency buffer's stored EMA heatmaps of one training sample.
- CLI: `python -m timm_srn.viz --model NAME_OR_CHECKPOINT --image PATH --out PNG`.
"""
import argparse
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .checkpoint import load_model
from .cli import HelpFormatter
from .evaluation import eval_transform
from .losses.heatmap_buffer import HeatmapBuffer
from .losses.heatmap_source import HeatmapSource
from .models.srn import SRN

__all__ = ['colourise', 'overlay', 'save_model_overlays', 'save_buffer_overlays']

TILE = 200
PAD = 8
FONT = ImageFont.load_default(size=15)
SMALL = ImageFont.load_default(size=12)
LINE = 19
COLOUR_BAR = 18
# inferno (perceptually uniform, dark -> bright) sampled at 9 even steps
_ANCHORS = np.array([[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
                     [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float32)
MAP_LEGEND = {
    'attention': 'attention A: softmax of f_att over positions (where the label is looked for)',
    'weighted': 'weighted U = A * sigmoid(S): the confidence-weighted maps f_sr reads',
    'class map': 'class map: sigmoid of the main classifier applied at every position of the final features',
    'EMA': 'EMA: the heatmap stored for this sample by the spatial consistency loss',
}
# columns shown on a fixed scale: probabilities
FIXED_RANGES = {'class map': (0., 1.)}


def colourise(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] to (H, W, 3) uint8 colours of the inferno colour map."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heatmap: torch.Tensor, value_range: Optional[Tuple[float, float]] = None,
            alpha: float = 0.7) -> Image.Image:
    """A heatmap (h, w), scaled from `value_range` (default: its own min and max) to the colour map and bilinearly
    resized, over a dimmed grey copy of the image (so the colours stand out on textured scenes)."""
    grey = ImageOps.grayscale(image.convert('RGB').resize((TILE, TILE))).point(lambda v: v // 2).convert('RGB')
    resized = F.interpolate(heatmap.float()[None, None], size=(TILE, TILE), mode='bilinear', align_corners=False)[0, 0]
    low, high = value_range if value_range is not None else (float(resized.min()), float(resized.max()))
    colours = colourise(((resized - low) / max(high - low, 1e-12)).numpy())
    return Image.blend(grey, Image.fromarray(colours), alpha)


class _Tile(NamedTuple):
    image: Image.Image
    caption: List[str]  # lines under the tile


def _render(
        header: List[str], columns: List[str], rows: List[List[_Tile]], legend: List[str], path: Union[str, Path],
) -> Path:
    """Header lines, titled columns of tiles with captions, a colour bar and the legend, as one PNG."""
    caption_lines = max(len(tile.caption) for row in rows for tile in row)
    row_height = TILE + caption_lines * LINE + PAD
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    text_width = max([measure.textlength(line, font=FONT) for line in header] +
                     [measure.textlength(line, font=SMALL) for line in legend])
    text_width = int(text_width)
    width = max(len(columns) * (TILE + PAD) + PAD + 3 * COLOUR_BAR + 40, text_width + 2 * PAD)
    top = PAD + len(header) * LINE + LINE
    height = top + len(rows) * row_height + len(legend) * LINE + PAD
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header):
        draw.text((PAD, PAD + i * LINE), line, fill='black', font=FONT)
    for c, title in enumerate(columns):
        draw.text((PAD + c * (TILE + PAD), top - LINE), title, fill='black', font=FONT)
    for r, row in enumerate(rows):
        y = top + r * row_height
        for c, tile in enumerate(row):
            x = PAD + c * (TILE + PAD)
            canvas.paste(tile.image, (x, y))
            for i, line in enumerate(tile.caption):
                draw.text((x, y + TILE + 2 + i * LINE), line, fill='black', font=SMALL if c else FONT)
    bar_x, bar_top, bar_bottom = PAD + len(columns) * (TILE + PAD) + COLOUR_BAR, top, top + TILE
    gradient = colourise(np.linspace(1, 0, bar_bottom - bar_top)[:, None].repeat(COLOUR_BAR, axis=1))
    canvas.paste(Image.fromarray(gradient), (bar_x, bar_top))
    draw.text((bar_x, bar_top - LINE), 'max', fill='black', font=SMALL)
    draw.text((bar_x, bar_bottom + 2), 'min', fill='black', font=SMALL)
    for i, line in enumerate(legend):
        draw.text((PAD, top + len(rows) * row_height + i * LINE), line, fill='black', font=SMALL)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _map_column(image: Image.Image, heatmaps: Sequence[torch.Tensor],
                fixed_range: Optional[Tuple[float, float]] = None) -> List[_Tile]:
    """Tiles of one column on one shared scale: `fixed_range`, else from the column's min to its max."""
    low = fixed_range[0] if fixed_range else min(float(h.min()) for h in heatmaps)
    high = fixed_range[1] if fixed_range else max(float(h.max()) for h in heatmaps)
    return [_Tile(overlay(image, h, (low, high)), [f'min {h.min():.3g}  max {h.max():.3g}']) for h in heatmaps]


def _legend(kinds: Sequence[str]) -> List[str]:
    return [MAP_LEGEND[kind] for kind in kinds] + ['one scale per column: dark = its lowest, bright = its highest '
                                                   'value (probabilities: 0 to 1)',
                                                   'the numbers under a map are its own range']


def _names(indices: Sequence[int], names: Sequence[str]) -> str:
    return ', '.join(names[i] for i in indices) or 'none'


def _input_tensor(model: nn.Module, image: Image.Image) -> torch.Tensor:
    return eval_transform(model)(image.convert('RGB'))[None].to(next(model.parameters()).device)


def _choose(probs: torch.Tensor, labels: Optional[Sequence[int]], top_k: int,
            true_labels: Optional[Sequence[int]] = None) -> List[int]:
    """Chosen labels, else every ground-truth label followed by the top-k predictions not among them."""
    if labels is not None:
        return list(labels)
    chosen = list(true_labels or [])
    return chosen + [i for i in probs.topk(min(top_k, len(probs))).indices.tolist() if i not in chosen]


@torch.no_grad()
def save_model_overlays(
        model: nn.Module,
        image: Image.Image,
        path: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        top_k: int = 3,
        labels: Optional[Sequence[int]] = None,
        true_labels: Optional[Sequence[int]] = None,
        threshold: float = 0.5,
) -> Path:
    """PNG of the model's maps for the top-k (or chosen) labels of `image`: a header with the ground-truth
    (`true_labels`, when known) and predicted labels, a row per label, a colour bar and a legend."""
    was_training = model.training
    model.eval()
    x = _input_tensor(model, image)
    if isinstance(model, SRN):
        out = model.forward_branches(x)
        probs = out.logits[0].sigmoid().cpu()
        maps = [('attention', out.attention[0]), ('weighted', out.attention[0] * out.confidence[0].sigmoid()),
                ('class map', out.class_maps[0].sigmoid())]
    else:
        source = HeatmapSource(model)
        probs = model(x)[0].sigmoid().cpu()
        maps = [('class map', source.latest()[0].sigmoid())]
        source.remove()
    model.train(was_training)
    names = list(label_names or [str(i) for i in range(len(probs))])
    predicted = [i for i in probs.argsort(descending=True).tolist() if probs[i] >= threshold]
    header = [f'ground truth: {_names(true_labels, names) if true_labels is not None else "not given"}',
              f'predicted (p >= {threshold:g}): ' + (', '.join(f'{names[i]} {probs[i]:.2f}' for i in predicted) or 'none')]
    chosen = _choose(probs, labels, top_k, true_labels)
    columns = [[_Tile(image.convert('RGB').resize((TILE, TILE)), [f'{names[label]}  p={probs[label]:.2f}'] + (
        [] if true_labels is None else ['in ground truth' if label in true_labels else 'not in ground truth']))
        for label in chosen]]
    columns += [_map_column(image, [m[label].cpu() for label in chosen], FIXED_RANGES.get(kind)) for kind, m in maps]
    rows = [list(row) for row in zip(*columns)]
    return _render(header, ['label'] + [kind for kind, _ in maps], rows, _legend([kind for kind, _ in maps]), path)


def save_buffer_overlays(
        buffer: HeatmapBuffer,
        index: int,
        image: Image.Image,
        path: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[int]] = None,
        top_k: int = 3,
) -> Path:
    """PNG of the stored EMA heatmaps of training sample `index` next to its image, a colour bar and a legend."""
    full = torch.tensor([[0., 0., 1., 1.]], device=buffer.maps.device)
    maps, valid = buffer.read(torch.tensor([index], device=full.device), full,
                              torch.zeros(1, dtype=torch.bool, device=full.device), buffer.size)
    maps, valid = maps[0].cpu(), valid[0].cpu()
    strength = torch.where(valid, maps, torch.full_like(maps, -float('inf'))).flatten(1).max(1).values
    names = label_names or [str(i) for i in range(buffer.num_classes)]
    chosen = list(labels) if labels is not None else strength.topk(min(top_k, buffer.num_classes)).indices.tolist()
    row = [_Tile(image.convert('RGB').resize((TILE, TILE)), [f'sample {index}'])]
    row += _map_column(image, [maps[c] for c in chosen])
    columns = ['image'] + [f'{names[c]} EMA' for c in chosen]
    return _render([f'stored heatmaps of training sample {index}'], columns, [row], _legend(['EMA']), path)


def _label_indices(values: Optional[Sequence[str]], names: Optional[Sequence[str]]) -> Optional[List[int]]:
    """Labels given by name or index (`--labels dog 3`), with an error naming an unknown one."""
    if values is None:
        return None
    indices = []
    for value in values:
        if value.isdigit():
            indices.append(int(value))
        elif names and value in names:
            indices.append(list(names).index(value))
        else:
            known = ', '.join(names) if names else 'none: the model has no label_names, give indices'
            raise SystemExit(f"unknown label '{value}'; label names: {known}")
    return indices


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m timm_srn.viz', description=__doc__.split('\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model', required=True, help='registered model name, hf-hub:ORG/NAME, or a checkpoint file')
    parser.add_argument('--pretrained', action='store_true', default=None,
                        help='load the pretrained weights of a registered name (local-dir: / hf-hub: sources always load theirs)')
    parser.add_argument('--image', required=True, help='image file to show the maps on (any format PIL reads)')
    parser.add_argument('--out', required=True, help='PNG file to write')
    parser.add_argument('--top-k', type=int, default=3, help='labels to show, by score')
    parser.add_argument('--labels', nargs='*', default=None,
                        help='labels to show instead of the top-k, by name (as in label_names) or index')
    parser.add_argument('--true-labels', nargs='*', default=None,
                        help='the image\'s ground-truth labels (names or indices), shown in the header')
    args = parser.parse_args(argv)
    model = load_model(args.model, args.pretrained)
    names = model.pretrained_cfg.get('label_names') if hasattr(model, 'pretrained_cfg') else None
    path = save_model_overlays(model, Image.open(args.image), args.out, names, args.top_k,
                               _label_indices(args.labels, names), _label_indices(args.true_labels, names))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
