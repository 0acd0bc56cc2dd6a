"""Hugging Face Hub export in timm's format, model cards, and publishing.

A Hub folder holds `model.safetensors` and `config.json` written by timm's `save_for_hf` (architecture,
`model_args` with the backbone, num_classes, label_names, full pretrained_cfg) and a `README.md` model
card whose numbers come only from a validate.py results JSON. Loading back goes through timm's own
loader (`timm.create_model('hf-hub:ORG/NAME', pretrained=True)`): safetensors weights, nothing executed.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import yaml

import timm
from timm.models import get_pretrained_cfg
from timm.models._hub import save_for_hf

from .checkpoint import set_default_mode
from .models.srn import SRN

__all__ = ['model_card', 'export_for_hub', 'publish_folder', 'write_hub_cards']

CARD_METRICS = ('mAP', 'CP', 'CR', 'CF1', 'CF1_harmonic', 'OP', 'OR', 'OF1', 'top3_CF1', 'top3_OF1')
CITATIONS = """```bibtex
@inproceedings{zhu2017learning,
  title={Learning Spatial Regularization with Image-level Supervisions for Multi-label Image Classification},
  author={Zhu, Feng and Li, Hongsheng and Ouyang, Wanli and Yu, Nenghai and Wang, Xiaogang},
  booktitle={CVPR},
  year={2017}
}
@inproceedings{verelst2023spatial,
  title={Spatial Consistency Loss for Training Multi-Label Classifiers from Single-Label Annotations},
  author={Verelst, Thomas and Rubenstein, Paul K. and Eichner, Marcin and Tuytelaars, Tinne and Berman, Maxim},
  booktitle={WACV},
  year={2023}
}
```"""


def model_card(
        name: str,
        architecture: str,
        backbone: str,
        num_classes: int,
        num_params: int,
        img_size: int,
        dataset: Optional[str] = None,
        metrics: Optional[Dict[str, float]] = None,
        train_command: Optional[str] = None,
        license: str = 'apache-2.0',
        label_names: Optional[Sequence[str]] = None,
        srn: bool = True,
) -> str:
    """README.md text: YAML front matter (library_name timm, tags, model-index of the measured metrics only).
    `srn=False` describes a plain timm classifier trained with timm-srn (e.g. with the single-positive losses)."""
    front: Dict[str, Any] = {
        'library_name': 'timm',
        'license': license,
        'tags': ['image-classification', 'multi-label-image-classification', 'timm'] + (['srn'] if srn else []),
        'pipeline_tag': 'image-classification',
    }
    if dataset:
        front['datasets'] = [dataset]
    if metrics:
        front['model-index'] = [{
            'name': name,
            'results': [{
                'task': {'type': 'image-classification', 'name': 'Multi-label image classification'},
                'dataset': {'name': dataset or 'unknown', 'type': dataset or 'unknown'},
                'metrics': [{'type': key, 'name': key, 'value': round(float(metrics[key]), 2)}
                            for key in CARD_METRICS if key in metrics],
            }],
        }]
    load_name = f'hf-hub:{name}' if '/' in name else name
    lines = ['---', yaml.safe_dump(front, sort_keys=False).strip(), '---', '', f'# Model card for {name}', '']
    task = f'multi-label classification of {num_classes} labels{f" ({dataset})" if dataset else ""}'
    lines += [
        f'A Spatial Regularization Network (SRN, Zhu et al., CVPR 2017) on a timm `{backbone}` backbone for {task}. '
        'SRN adds per-label attention maps on a stride-16 feature map and a learned spatial regulariser whose '
        'full-map grouped convolution models where labels occur relative to each other; its logits are fused with '
        'the backbone\'s.' if srn else
        f'A timm `{architecture}` for {task}, trained with timm-srn (see the training command for the loss).',
        '', '## Model details', '',
        f'- **Architecture:** `{architecture}`' + (f' (backbone `{backbone}`)' if srn else ''),
        f'- **Parameters:** {num_params / 1e6:.1f} M',
        f'- **Image size:** {img_size} x {img_size}' + (', whole image resized (no crop)' if srn else ''),
        f'- **Labels:** {num_classes}' + (f' ({", ".join(label_names[:8])}{", ..." if len(label_names) > 8 else ""})'
                                          if label_names else ''),
        '- **Papers:** SRN [arXiv:1702.05891](https://arxiv.org/abs/1702.05891); spatial consistency loss (WACV 2023)',
        '', '## Usage', '', '```python',
        'import timm_srn  # timm has no plugin discovery: this registers the srn models',
        'import timm', '',
        f"model = timm.create_model('{load_name}', pretrained=True).eval()",
        'config = timm.data.resolve_data_config(model=model)',
        'transform = timm.data.create_transform(**config)',
        'probs = model(transform(image).unsqueeze(0)).sigmoid()  # independent per-label probabilities',
    ] + (['branches = model.forward_branches(transform(image).unsqueeze(0))  # attention maps, class maps, ...']
         if srn else []) + ['```', '', '## Training', '']
    lines += [f'```bash\n{train_command}\n```'] if train_command else ['The training command was not recorded.']
    lines += ['', '## Evaluation', '']
    if metrics:
        lines += ['Measured with `train_scripts/validate.py` (percentages):', '',
                  '| ' + ' | '.join(k for k in CARD_METRICS if k in metrics) + ' |',
                  '|' + '---|' * sum(k in metrics for k in CARD_METRICS),
                  '| ' + ' | '.join(f'{metrics[k]:.2f}' for k in CARD_METRICS if k in metrics) + ' |']
    else:
        lines += ['**These weights have not been trained and evaluated yet: no results are reported.**']
    lines += ['', '## Limitations', '',
              '- Labels are independent sigmoids thresholded at 0.5 by default; tune thresholds per label for deployment.',
              *(['- The spatial regulariser\'s kernel is fixed to the stride-16 map size at the configured image size; '
                 'other sizes are resampled to it, which can reduce accuracy far from the training resolution.']
                if srn else []),
              '- Trained on one dataset\'s label set and image distribution; expect a drop on other domains.',
              '', '## Citation', '', CITATIONS, '']
    return '\n'.join(lines)


def _card_for_model(model: nn.Module, name: str, metrics, dataset, train_command) -> str:
    cfg = model.pretrained_cfg
    return model_card(
        name, cfg.get('architecture', name), getattr(model, 'backbone_name', cfg.get('architecture', name)),
        model.num_classes, sum(p.numel() for p in model.parameters()), cfg['input_size'][-1], dataset, metrics,
        train_command, cfg.get('license', 'apache-2.0'), cfg.get('label_names'), srn=isinstance(model, SRN))


def export_for_hub(
        model: nn.Module,
        out_dir: Union[str, Path],
        name: str,
        metrics: Optional[Dict[str, float]] = None,
        dataset: Optional[str] = None,
        train_command: Optional[str] = None,
) -> Path:
    """Write model.safetensors + config.json (timm's save_for_hf) + README.md to `out_dir`."""
    out_dir = Path(out_dir)
    label_names = model.pretrained_cfg.get('label_names')
    model_args = None
    if isinstance(model, SRN):
        # the backbone and size define the weights' shapes; the exported weights hold the backbone, so
        # rebuilding must not fetch ImageNet weights again
        model_args = dict(backbone=model.backbone_name, img_size=list(model.img_size), pretrained_backbone=False)
    save_for_hf(model, str(out_dir), model_config=dict(label_names=list(label_names)) if label_names else None,
                model_args=model_args, safe_serialization=True)
    (out_dir / 'README.md').write_text(_card_for_model(model, name, metrics, dataset, train_command), encoding='utf-8')
    for path in out_dir.iterdir():  # safetensors writes its file with mode 0600
        set_default_mode(path)
    return out_dir


def publish_folder(folder: Union[str, Path], repo_id: str, private: bool = False, commit_message: str = 'Add model') -> str:
    """Upload an exported folder with huggingface_hub (token from HF_TOKEN or `huggingface-cli login`)."""
    from huggingface_hub import HfApi
    api = HfApi(library_name='timm', library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return repo_id


def write_hub_cards(out_dir: Union[str, Path] = 'hub_cards', results_dir: Optional[Union[str, Path]] = None) -> Dict[str, Path]:
    """One card per registered pretrained srn tag; metrics from `results_dir/<tag>.json` (validate.py output)."""
    out_dir = Path(out_dir)
    results_dir = Path(results_dir) if results_dir else out_dir / 'results'
    written = {}
    for tag in timm.list_pretrained('srn*'):
        cfg = get_pretrained_cfg(tag)
        if not cfg.hf_hub_id:
            continue
        with torch.device('meta'):
            model = timm.create_model(tag)
        results = results_dir / f'{tag}.json'
        result = json.loads(results.read_text()) if results.exists() else {}
        settings = result.get('settings', {})
        card = _card_for_model(model, f'{cfg.hf_hub_id}', result.get('metrics'), settings.get('dataset', 'coco'),
                               result.get('train_command'))
        path = out_dir / f'{tag}.md'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(card, encoding='utf-8')
        written[tag] = path
    return written
