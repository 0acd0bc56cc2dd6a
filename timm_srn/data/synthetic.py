"""Built-in synthetic scenes: deterministic multi-object images written as JPEG + COCO-format json.

Label structure that exercises both papers:
- 8 object classes, each a shape with its own colour and texture;
- co-occurrence: a 'lamp' is added to 80% of scenes that hold a 'table';
- 2 relation classes defined only by arrangement: 'kite above house' (a kite whose centre lies above a
  house's, horizontally overlapping) and 'ball left of dog' — both objects can appear without the relation,
  so a model needs spatial reasoning to tell them apart.
Category ids have gaps (like COCO's) so the id -> column mapping is exercised.
"""
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .flips import BoxRelationFlip

__all__ = ['SYNTHETIC_LABEL_NAMES', 'generate_synthetic_coco', 'relation_holds', 'synthetic_label_flip']

OBJECTS = ('ball', 'house', 'kite', 'dog', 'table', 'lamp', 'tree', 'car')
RELATIONS = {'kite above house': ('kite', 'house', 'above'), 'ball left of dog': ('ball', 'dog', 'left')}
SYNTHETIC_LABEL_NAMES = OBJECTS + tuple(RELATIONS)
CATEGORY_IDS = {name: 2 * i + 1 for i, name in enumerate(SYNTHETIC_LABEL_NAMES)}  # 1, 3, 5, ... (gaps)
COLOURS = {
    'ball': (220, 40, 40), 'house': (40, 160, 60), 'kite': (50, 90, 230), 'dog': (230, 200, 40),
    'table': (150, 60, 200), 'lamp': (40, 210, 210), 'tree': (240, 140, 30), 'car': (120, 120, 120),
}


def relation_holds(kind: str, first: Sequence[float], second: Sequence[float]) -> bool:
    """'above': the first box's centre lies above the second's and they overlap horizontally; 'left': its centre
    lies left of the second's and they overlap vertically. Boxes (x0, y0, x1, y1) in any one unit."""
    if kind == 'above':
        return (first[1] + first[3]) < (second[1] + second[3]) and first[0] < second[2] and second[0] < first[2]
    return (first[0] + first[2]) < (second[0] + second[2]) and first[1] < second[3] and second[1] < first[3]


def synthetic_label_flip(label_names: Sequence[str]) -> BoxRelationFlip:
    """The scenes' flip rule: relation classes recomputed from the flipped boxes by `relation_holds`
    ('ball left of dog' mirrored is 'ball right of dog'; 'kite above house' survives a mirror)."""
    column = {name: i for i, name in enumerate(label_names)}

    def rule(first: str, second: str, kind: str):
        return lambda boxes: any(relation_holds(kind, a, b) for a in boxes.get(column[first], ())
                                 for b in boxes.get(column[second], ()))
    return BoxRelationFlip({column[name]: rule(*pair) for name, pair in RELATIONS.items()})


def _draw_object(draw: ImageDraw.ImageDraw, name: str, box: Tuple[int, int, int, int], rng: np.random.RandomState):
    x0, y0, x1, y1 = box
    colour = tuple(int(np.clip(c + rng.randint(-25, 26), 0, 255)) for c in COLOURS[name])
    dark = tuple(c // 2 for c in colour)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if name == 'ball':
        draw.ellipse(box, fill=colour, outline=dark, width=2)
    elif name == 'house':
        draw.rectangle((x0, cy, x1, y1), fill=colour)
        draw.polygon([(x0, cy), (cx, y0), (x1, cy)], fill=dark)
    elif name == 'kite':
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour, outline=dark)
    elif name == 'dog':
        draw.ellipse((x0, cy - (y1 - y0) // 4, x1, y1), fill=colour)
        draw.ellipse((x1 - (x1 - x0) // 3, y0, x1, cy), fill=dark)
    elif name == 'table':
        draw.rectangle((x0, y0, x1, y0 + (y1 - y0) // 4), fill=colour)
        draw.rectangle((x0, y0, x0 + 4, y1), fill=dark)
        draw.rectangle((x1 - 4, y0, x1, y1), fill=dark)
    elif name == 'lamp':
        draw.polygon([(x0, cy), (cx, y0), (x1, cy)], fill=colour)
        draw.rectangle((cx - 2, cy, cx + 2, y1), fill=dark)
    elif name == 'tree':
        draw.rectangle((cx - 3, cy, cx + 3, y1), fill=(110, 70, 30))
        draw.ellipse((x0, y0, x1, cy + 4), fill=colour)
    elif name == 'car':
        draw.rectangle((x0, cy - 2, x1, y1 - 6), fill=colour)
        for wx in (x0 + 6, x1 - 6):
            draw.ellipse((wx - 5, y1 - 11, wx + 5, y1 - 1), fill=dark)
    for stripe in range(y0 + 3, y1, 7):  # texture
        draw.line((x0 + 2, stripe, x1 - 2, stripe), fill=dark, width=1)


def _place(rng, size, occupied, obj_size) -> Tuple[int, int, int, int]:
    for _ in range(20):
        x0, y0 = rng.randint(0, size - obj_size), rng.randint(0, size - obj_size)
        box = (x0, y0, x0 + obj_size, y0 + obj_size)
        if all(box[2] <= o[0] or box[0] >= o[2] or box[3] <= o[1] or box[1] >= o[3] for o in occupied):
            return box
    return box


def _scene(rng: np.random.RandomState, size: int) -> Tuple[Image.Image, List[Dict]]:
    noise = rng.randint(170, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    img = Image.fromarray(noise).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    obj_size = size // 4
    names = list(rng.choice(OBJECTS, size=rng.randint(1, 4), replace=False))
    if 'table' in names and 'lamp' not in names and rng.rand() < 0.8:
        names.append('lamp')
    placed: List[Tuple[str, Tuple[int, int, int, int]]] = []
    for name in names:
        placed.append((name, _place(rng, size, [b for _, b in placed], obj_size)))
    # arranged pairs: half the time with the relation, half with it broken
    for a, b, relation in RELATIONS.values():
        if rng.rand() < 0.25:
            placed = [(n, bx) for n, bx in placed if n not in (a, b)]
            bx = rng.randint(0, size - 2 * obj_size) if relation == 'left' else rng.randint(0, size - obj_size)
            by = rng.randint(0, size - 2 * obj_size) if relation == 'above' else rng.randint(0, size - obj_size)
            first = (bx, by, bx + obj_size, by + obj_size)
            second = (bx + obj_size, by, bx + 2 * obj_size, by + obj_size) if relation == 'left' else \
                (bx, by + obj_size, bx + obj_size, by + 2 * obj_size)
            if rng.rand() < 0.5:
                first, second = second, first
            placed += [(a, first), (b, second)]
    annotations = []
    for name, box in placed:
        _draw_object(draw, name, box, rng)
        annotations.append((name, box))
    boxes = dict(annotations)
    for relation_name, (a, b, kind) in RELATIONS.items():
        if a in boxes and b in boxes:
            ba, bb = boxes[a], boxes[b]
            if relation_holds(kind, ba, bb):
                annotations.append((relation_name, (min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3]))))
    return img, [dict(name=n, box=b) for n, b in annotations]


def generate_synthetic_coco(
        out_dir: Union[str, Path],
        num_images: int = 2000,
        image_size: int = 160,
        seed: int = 0,
        split: str = 'train',
) -> Tuple[Path, Path]:
    """Write `num_images` scenes to out_dir/{split}/ and out_dir/annotations/instances_{split}.json.

    Deterministic in (seed, image_size, num_images). Returns (image folder, annotation file)."""
    out_dir = Path(out_dir)
    image_dir = out_dir / split
    ann_file = out_dir / 'annotations' / f'instances_{split}.json'
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    for image_id in tqdm(range(1, num_images + 1), desc=f'synthetic {split}', leave=False):
        img, objects = _scene(rng, image_size)
        file_name = f'{split}_{image_id:06d}.jpg'
        img.save(image_dir / file_name, quality=90)
        images.append(dict(id=image_id, file_name=file_name, width=image_size, height=image_size))
        for obj in objects:
            x0, y0, x1, y1 = obj['box']
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=CATEGORY_IDS[obj['name']],
                bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0))
    categories = [dict(id=CATEGORY_IDS[name], name=name, supercategory='synthetic') for name in SYNTHETIC_LABEL_NAMES]
    tmp = ann_file.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    tmp.replace(ann_file)
    return image_dir, ann_file
