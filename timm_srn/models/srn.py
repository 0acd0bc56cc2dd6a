"""Spatial Regularization Network (SRN) on any timm backbone.

Zhu et al., "Learning Spatial Regularization with Image-level Supervisions for Multi-label Image
Classification", CVPR 2017 (arXiv:1702.05891).

The backbone's own final features and pooled head give the main logits y_cls. A reduction-16
feature map X feeds the attention branch (A = spatial softmax of f_att(X), S = conf(X),
y_att = sum A*S) and the spatial regulariser f_sr on U = A * sigmoid(S), whose full-map grouped
convolution learns spatial relations between labels. The fused output is a*y_cls + (1-a)*y_sr.
"""
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._manipulate import group_parameters
from timm.models._registry import split_model_name_tag

from ..data.label_names import COCO_LABEL_NAMES
from .class_maps import class_activation_maps

__all__ = ['ClassCountError', 'SRN', 'SRNOutput', 'SpatialAttention', 'SpatialRegularizer', 'SRN_CLASSIFIERS', 'srn_stage_loss']

# Every layer whose shape depends on num_classes: all are dropped when num_classes changes.
SRN_CLASSIFIERS = ('fc', 'attention.conv3', 'attention.confidence', 'regularizer.conv1', 'regularizer.fc')
STAGE_GROUPS = {1: ('backbone', 'fc'), 2: ('attention',), 3: ('regularizer',), 4: ('backbone', 'fc', 'attention', 'regularizer')}


class SRNOutput(NamedTuple):
    """Every output of one SRN forward pass."""
    logits: torch.Tensor  # fused a * y_cls + (1 - a) * y_sr, (B, C)
    cls_logits: torch.Tensor  # main branch y_cls, (B, C)
    att_logits: torch.Tensor  # attention branch y_att = sum over positions of A * S, (B, C)
    sr_logits: torch.Tensor  # spatial regulariser y_sr, (B, C)
    attention: torch.Tensor  # A, softmax over positions per image and class, (B, C, h, w)
    confidence: torch.Tensor  # S, (B, C, h, w)
    class_maps: torch.Tensor  # main branch at every position of the final features, (B, C, H, W); S where
    # the final features have no spatial layout (CrossViT, EfficientViM, PiT, parallel CoaT)


def _factory_kwargs(module: nn.Module) -> Dict[str, Any]:
    """device / dtype of an existing parameter, so rebuilt layers match the model."""
    param = next(module.parameters())
    return dict(device=param.device, dtype=param.dtype)


class SpatialAttention(nn.Module):
    """f_att (1x1, 3x3, 1x1 convs) and the confidence conv on the tapped feature map."""

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            hidden_chs: int = 512,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_chs = in_chs
        self.conv1 = nn.Conv2d(in_chs, hidden_chs, 1, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_chs, hidden_chs, 3, padding=1, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.reset_classifier(num_classes, **dd)

    def reset_classifier(self, num_classes: int, device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        self.conv3 = nn.Conv2d(self.conv2.out_channels, num_classes, 1, **dd) if num_classes else None
        self.confidence = nn.Conv2d(self.in_chs, num_classes, 1, **dd) if num_classes else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns y_att (B, C), A (B, C, h, w) and S (B, C, h, w)."""
        z = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        attention = z.flatten(2).softmax(dim=-1).view_as(z)  # over the h*w positions, per image and class
        confidence = self.confidence(x)
        att_logits = (attention * confidence).sum(dim=(2, 3))
        return att_logits, attention, confidence


class SpatialRegularizer(nn.Module):
    """f_sr: 1x1 conv C->512, 1x1 conv 512->512, full-map grouped conv 512->2048, fc 2048->C."""

    def __init__(
            self,
            num_classes: int,
            map_size: Tuple[int, int],
            hidden_chs: int = 512,
            out_chs: int = 2048,
            groups: int = 512,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.map_size = tuple(map_size)
        self.hidden_chs = hidden_chs
        self.bn1 = norm_layer(hidden_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_chs, hidden_chs, 1, bias=False, **dd)
        self.bn2 = norm_layer(hidden_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        # one full-map kernel per filter: learns where labels sit relative to each other
        self.conv3 = nn.Conv2d(hidden_chs, out_chs, self.map_size, groups=groups, bias=False, **dd)
        self.bn3 = norm_layer(out_chs, **dd)
        self.act3 = nn.ReLU(inplace=True)
        self.reset_classifier(num_classes, **dd)

    def reset_classifier(self, num_classes: int, device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(num_classes, self.hidden_chs, 1, bias=False, **dd) if num_classes else None
        self.fc = nn.Linear(self.conv3.out_channels, num_classes, **dd) if num_classes else None

    def forward(self, weighted_maps: torch.Tensor) -> torch.Tensor:
        """Maps U (B, C, h, w) at any size, resampled to the kernel's map size, to y_sr (B, C)."""
        if tuple(weighted_maps.shape[-2:]) != self.map_size:
            weighted_maps = F.interpolate(weighted_maps, size=self.map_size, mode='bilinear', align_corners=False)
        x = self.act1(self.bn1(self.conv1(weighted_maps)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.full_map_conv(x)))
        return self.fc(x.flatten(1))

    def full_map_conv(self, x: torch.Tensor) -> torch.Tensor:
        """`conv3` (grouped, kernel = the whole map) as one batched matrix product over the groups: the same
        numbers as the convolution, without cuDNN's slow path for large grouped kernels (GPU, channels_last)."""
        weight = self.conv3.weight  # (out, in / groups, h, w)
        groups = self.conv3.groups
        batch = x.shape[0]
        x = x.reshape(batch, groups, -1).transpose(0, 1)  # (groups, B, in / groups * h * w)
        w = weight.reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2).to(x.dtype)
        return torch.bmm(x, w).transpose(0, 1).reshape(batch, -1, 1, 1)


def _get_optional_submodule(module: nn.Module, name: str) -> Optional[nn.Module]:
    """Submodule at dotted `name`, None where a classifier was removed (num_classes=0)."""
    for part in name.split('.'):
        module = getattr(module, part)
        if module is None:
            return None
    return module


def tap_feature_index(feature_info: Sequence[Dict[str, Any]]) -> int:
    """Index of the backbone feature whose reduction is closest to 16 (|reduction - 16|), ties going to the
    deeper feature: layer3 / res4b22 for ResNets, the last block for ViT-B/16 and for patch-14 ViTs."""
    distances = [abs(info['reduction'] - 16) for info in feature_info]
    return max(range(len(distances)), key=lambda index: (-distances[index], index))


def _backbone_pretrained_cfg(backbone: str):
    """timm's pretrained config of the backbone (the given tag, or the default one); None if it has none."""
    return get_pretrained_cfg(backbone) or get_pretrained_cfg(split_model_name_tag(backbone)[0])


def backbone_input_size(backbone: str) -> Tuple[int, int]:
    """The input size of the backbone's pretrained config (default tag, or the given one)."""
    cfg = _backbone_pretrained_cfg(backbone)
    return tuple(cfg.input_size[1:]) if cfg is not None else (224, 224)


def _is_meta_limitation(error: Exception) -> bool:
    """Errors from operations the meta device cannot run (data-dependent shapes), not from the input size."""
    return isinstance(error, NotImplementedError) or 'meta' in str(error)


class SRN(nn.Module):
    """Spatial Regularization Network wrapping any timm backbone.

    `forward(x)` returns the fused logits only, so timm's training loop and evaluators work
    unchanged; `forward_branches(x)` returns every branch as an `SRNOutput`.
    """

    def __init__(
            self,
            backbone: str = 'resnet101',
            num_classes: int = 80,
            in_chans: int = 3,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            global_pool: Optional[str] = None,
            pretrained_backbone: bool = False,
            backbone_kwargs: Optional[Dict[str, Any]] = None,
            tap_index: Optional[int] = None,
            tap_norm: bool = False,
            att_chs: int = 512,
            sr_chs: int = 512,
            sr_out_chs: int = 2048,
            sr_groups: int = 512,
            cls_weight: float = 0.5,
            drop_rate: float = 0.,
            drop_path_rate: Optional[float] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            backbone: Any timm model name, optionally with a pretrained tag ('resnet101.a1h_in1k').
            num_classes: Number of labels C; 0 gives a feature extractor (pooled main-branch features).
            img_size: Configured input size; fixes the f_sr kernel to the tap's map size at this size.
                Default: the backbone's pretrained input size. A size the backbone cannot run at is refused.
            global_pool: Backbone pooling type (None keeps the backbone's default).
            pretrained_backbone: Initialise only the backbone from timm's pretrained weights.
            backbone_kwargs: Extra arguments for `timm.create_model(backbone, ...)`.
            tap_index: Backbone feature (index into `feature_info`) feeding the attention branch;
                default: the feature whose reduction is closest to 16, ties to the deeper (`tap_feature_index`).
            tap_norm: Apply the backbone's final norm to the tapped feature (ViT-style backbones).
            att_chs: Hidden channels of f_att (512 in the paper).
            sr_chs / sr_out_chs / sr_groups: f_sr widths (512 / 2048 / 512: 4 filters per group).
            cls_weight: a in y = a * y_cls + (1 - a) * y_sr.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        backbone_name, _ = split_model_name_tag(backbone)
        if not timm.is_model(backbone_name):
            raise ValueError(f"Unknown backbone '{backbone}': not a registered timm model (see timm.list_models()).")
        backbone_kwargs = dict(backbone_kwargs or {})
        if drop_path_rate is not None:
            backbone_kwargs['drop_path_rate'] = drop_path_rate
        if global_pool is not None:
            backbone_kwargs['global_pool'] = global_pool
        img_size = img_size or backbone_input_size(backbone)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        backbone_kwargs.update(num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
        self.backbone = self._create_backbone(backbone, img_size, pretrained_backbone, **backbone_kwargs, **dd)
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.cls_weight = cls_weight
        self.drop_rate = drop_rate
        self.tap_norm = tap_norm
        self.num_features = self.backbone.num_features
        self.head_hidden_size = self.backbone.head_hidden_size

        backbone_info = self.backbone.feature_info
        self.tap_index = tap_feature_index(backbone_info) if tap_index is None else tap_index % len(backbone_info)
        tap_info = backbone_info[self.tap_index]
        self.feature_info = [dict(info, module=f"backbone.{info['module']}") for info in backbone_info]
        self.tap_map_size = self._tap_map_size(backbone_kwargs)

        self.fc = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes else nn.Identity()
        self.attention = SpatialAttention(tap_info['num_chs'], num_classes, hidden_chs=att_chs, **dd)
        self.regularizer = SpatialRegularizer(
            num_classes, self.tap_map_size, hidden_chs=sr_chs, out_chs=sr_out_chs, groups=sr_groups, **dd)
        self.stage: Optional[int] = None
        self._output_hooks: Dict[int, Callable[[SRNOutput], None]] = OrderedDict()

    @staticmethod
    def _create_backbone(backbone: str, img_size: Tuple[int, int], pretrained: bool, **kwargs) -> nn.Module:
        """The timm backbone, set to `img_size` where it has a configurable input size (ViT, Swin, ...)."""
        model = timm.create_model(backbone, pretrained=pretrained, **kwargs)
        if hasattr(model, 'set_input_size'):
            model.set_input_size(img_size=img_size)
        return model

    def _tap_map_size(self, backbone_kwargs: Dict[str, Any]) -> Tuple[int, int]:
        """Size of the tapped map at `img_size`, from a forward of a weightless (meta device) copy of the backbone,
        which also refuses sizes the backbone cannot run at with one clear error."""
        param = next(self.backbone.parameters())
        probe = self.backbone if param.device.type == 'meta' else self._create_backbone(
            self.backbone_name, self.img_size, False, **backbone_kwargs, device='meta', dtype=param.dtype)
        x = torch.empty(1, self.in_chans, *self.img_size, device='meta', dtype=param.dtype)
        training = probe.training
        try:
            with torch.no_grad():
                (tap,) = probe.eval().forward_intermediates(
                    x, indices=[self.tap_index], output_fmt='NCHW', intermediates_only=True)
        except Exception as e:  # noqa: BLE001 -- any failure inside the backbone means it cannot take this size
            if _is_meta_limitation(e):  # e.g. Gemma-4 ViT: not computable without data; use the declared reduction
                reduction = self.backbone.feature_info[self.tap_index]['reduction']
                return tuple(math.ceil(size / reduction) for size in self.img_size)
            accepted = backbone_input_size(self.backbone_name)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"Backbone '{self.backbone_name}' cannot run at img_size={self.img_size} ({type(e).__name__}: "
                f"{first_line}). It runs at its pretrained input size {accepted} (the default); other sizes need a "
                f"backbone with a configurable input size, or backbone_kwargs=dict(img_size=...) where the "
                f"architecture takes one.") from None
        finally:
            probe.train(training)
        return tuple(tap.shape[-2:])

    # --- timm model contract ---

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Backbone parameters keep the backbone's own grouping; every SRN head comes last."""
        backbone_groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse), reverse=True)
        head_group = max(backbone_groups.values(), default=0) + 1

        def _matcher(name: str) -> int:
            if name.startswith('backbone.'):
                return backbone_groups.get(name[len('backbone.'):], head_group)
            return head_group

        return _matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, 'no_weight_decay') else set()
        return {f'backbone.{name}' for name in names}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, ...]:
        """Every layer whose shape depends on num_classes (see `SRN_CLASSIFIERS`)."""
        modules = (_get_optional_submodule(self, name) for name in SRN_CLASSIFIERS)
        return tuple(module for module in modules if module is not None)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Rebuild every classifier of SRN for `num_classes` (0 removes them all)."""
        if num_classes and self.attention is None:
            raise RuntimeError('This SRN was pruned to a feature extractor (prune_intermediate_layers): it has no '
                               'attention / regularizer branches to give classifiers to.')
        dd = _factory_kwargs(self.backbone)
        self.num_classes = num_classes
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
        self.fc = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes else nn.Identity()
        for head in (self.attention, self.regularizer):
            if head is not None:
                head.reset_classifier(num_classes, **dd)
        self.train(self.training)
        if self.stage is not None:
            self.set_stage(self.stage)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's final unpooled features."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The main branch on final features: pooled features, or y_cls (the fused output needs the tap)."""
        x = self.backbone.forward_head(x, pre_logits=True)
        return x if pre_logits else self.fc(x)

    def forward_intermediates(self, x: torch.Tensor, **kwargs) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's intermediate features (indices refer to `feature_info`)."""
        return self.backbone.forward_intermediates(x, **kwargs)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True):
        """Keep only the backbone up to `indices` (feature extraction). With `prune_head` every SRN head goes too
        (its tap may be pruned away): the model becomes a backbone feature extractor with num_classes=0."""
        if prune_head:
            self.num_classes = 0
            self.fc = nn.Identity()
            self.attention = None
            self.regularizer = None
        return self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    # --- SRN ---

    def register_output_hook(self, hook: Callable[[SRNOutput], None]) -> RemovableHandle:
        """Call `hook(output)` with the full `SRNOutput` after every `forward` (losses, visualisation)."""
        handle = RemovableHandle(self._output_hooks)
        self._output_hooks[handle.id] = hook
        return handle

    def forward_branches(self, x: torch.Tensor) -> SRNOutput:
        """Every branch of SRN for images x (B, in_chans, H, W) at any resolution."""
        if not self.num_classes:
            raise RuntimeError('SRN branches need num_classes > 0; this model was reset to a feature extractor.')
        final, (tap,) = self.backbone.forward_intermediates(
            x, indices=[self.tap_index], norm=self.tap_norm, stop_early=False, output_fmt='NCHW',
            intermediates_only=False)
        cls_logits = self.forward_head(final)
        att_logits, attention, confidence = self.attention(tap)
        class_maps = class_activation_maps(self.backbone, final, tuple(x.shape[-2:]), self.forward_head)
        if class_maps is None:  # final features without a spatial layout (CrossViT, EfficientViM, PiT, CoaT)
            class_maps = confidence
        sr_logits = self.regularizer(attention * confidence.sigmoid())
        logits = self.cls_weight * cls_logits + (1. - self.cls_weight) * sr_logits
        return SRNOutput(logits, cls_logits, att_logits, sr_logits, attention, confidence, class_maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:
            return self.forward_head(self.forward_features(x))
        output = self.forward_branches(x)
        for hook in self._output_hooks.values():
            hook(output)
        return output.logits

    def set_stage(self, stage: Optional[int]) -> None:
        """Freeze all but the paper's training group of `stage` (1: backbone + f_cls, 2: f_att + confidence,
        3: f_sr, 4 or None: everything). Frozen groups also keep their norm statistics fixed (eval mode)."""
        if stage is not None and stage not in STAGE_GROUPS:
            raise ValueError(f'SRN stage must be one of 1, 2, 3, 4 (or None), got {stage!r}.')
        self.stage = stage
        trainable = STAGE_GROUPS[stage or 4]
        for name, module in self._stage_groups():
            module.requires_grad_(name in trainable)
        self.train(self.training)

    def _stage_groups(self):
        """(name, module) of the paper's parameter groups that exist (pruned models have no heads)."""
        return [(name, getattr(self, name)) for name in STAGE_GROUPS[4] if getattr(self, name) is not None]

    def train(self, mode: bool = True) -> 'SRN':
        super().train(mode)
        trainable = STAGE_GROUPS[self.stage or 4]
        for name, module in self._stage_groups():
            if name not in trainable:
                module.eval()
        return self


def srn_stage_loss(
        output: SRNOutput,
        target: torch.Tensor,
        stage: Optional[int] = 4,
        stage4_loss: str = 'paper',
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.binary_cross_entropy_with_logits,
) -> torch.Tensor:
    """The loss terms of a training stage: 1 BCE(y_cls), 2 BCE(y_att), 3 BCE(y_sr); stage 4 either
    'paper' BCE(y) + BCE(y_att) or 'released' (the authors' scripts) BCE(y_cls) + BCE(y_att) + BCE(y_sr)."""
    if stage == 1:
        return loss_fn(output.cls_logits, target)
    if stage == 2:
        return loss_fn(output.att_logits, target)
    if stage == 3:
        return loss_fn(output.sr_logits, target)
    if stage in (4, None):
        if stage4_loss == 'paper':
            return loss_fn(output.logits, target) + loss_fn(output.att_logits, target)
        if stage4_loss == 'released':
            return loss_fn(output.cls_logits, target) + loss_fn(output.att_logits, target) + \
                loss_fn(output.sr_logits, target)
        raise ValueError(f"stage4_loss must be 'paper' or 'released', got {stage4_loss!r}.")
    raise ValueError(f'SRN stage must be one of 1, 2, 3, 4, got {stage!r}.')


class ClassCountError(RuntimeError):
    """SRN weights trained for another number of classes than the model's."""

    def __init__(self, weights_classes: int, model_classes: int, advice: str):
        super().__init__(f'Checkpoint was trained for {weights_classes} classes but the model has '
                         f'num_classes={model_classes} {advice}')
        self.weights_classes, self.model_classes = weights_classes, model_classes


def _check_srn_state_dict(state_dict: Dict[str, torch.Tensor], model: SRN) -> Dict[str, torch.Tensor]:
    """Reject checkpoints that are not SRN weights of this architecture with a message naming the problem."""
    if 'state_dict' in state_dict or 'model' in state_dict:
        state_dict = state_dict.get('state_dict', state_dict.get('model'))
    expected = model.state_dict()
    if not any(key.startswith('backbone.') for key in state_dict):
        raise RuntimeError(
            f"Checkpoint holds no SRN weights (first keys: {list(state_dict)[:3]}); it looks like a plain "
            f"backbone checkpoint. Load it into the backbone instead, e.g. backbone_kwargs=dict("
            f"pretrained_cfg_overlay=dict(file=...)) with pretrained_backbone=True.")
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    classifier_keys = {f'{name}.{suffix}' for name in SRN_CLASSIFIERS for suffix in ('weight', 'bias')}
    adapting = model.num_classes != model.pretrained_cfg.get('num_classes', model.num_classes) if \
        hasattr(model, 'pretrained_cfg') else False
    if [k for k in missing if k not in classifier_keys] or [k for k in unexpected if k not in classifier_keys]:
        raise RuntimeError(
            f"Checkpoint is for another architecture than SRN(backbone='{model.backbone_name}'): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}.")
    for key, value in state_dict.items():
        if key not in expected or expected[key].shape == value.shape:
            continue
        if key in classifier_keys:
            if adapting:
                continue
            raise ClassCountError(state_dict['fc.weight'].shape[0], model.num_classes, (
                f"({key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}). Pass "
                f"num_classes={state_dict['fc.weight'].shape[0]}, or set pretrained_cfg_overlay=dict(num_classes=...) "
                f"to the checkpoint's count to re-initialise the heads."))
        raise RuntimeError(
            f"Checkpoint tensor {key} has shape {tuple(value.shape)} but the model expects "
            f"{tuple(expected[key].shape)}: the weights are for another backbone or img_size.")
    return state_dict


def _backbone_cfg_overlay(backbone: str, img_size: Optional[Union[int, Tuple[int, int]]]) -> Dict[str, Any]:
    """pretrained_cfg entries that follow the chosen backbone (first conv, normalisation, input size)."""
    cfg = _backbone_pretrained_cfg(backbone)
    img_size = img_size or backbone_input_size(backbone)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    overlay = dict(input_size=(3, *size))
    if cfg is not None:
        first_conv = cfg.first_conv if isinstance(cfg.first_conv, str) or not cfg.first_conv else cfg.first_conv[0]
        # the backbone's final map scales with the input; token models (ViT) have none
        pool_size = None if cfg.pool_size is None else \
            tuple(math.ceil(p * s / i) for p, s, i in zip(cfg.pool_size, size, cfg.input_size[1:]))
        overlay.update(first_conv=f'backbone.{first_conv}' if first_conv else None, mean=cfg.mean, std=cfg.std,
                       pool_size=pool_size)
    return overlay


def _in_hub_cache(repo_id: str, cache_dir: Optional[str]) -> bool:
    """Whether weights of `repo_id` already sit in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)
               for filename in ('model.safetensors', 'pytorch_model.bin'))


def _check_weights_published(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """Fail at once, without Hub retries, for registered tags whose weights are not on the Hub yet (a copy already
    in the local Hugging Face cache, e.g. your own export, still loads)."""
    tag = kwargs.get('pretrained_cfg')
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if not pretrained or not isinstance(tag, str) or overlay.get('file') or overlay.get('state_dict'):
        return
    name = f'{variant}.{tag}'
    if name in UNPUBLISHED_WEIGHTS and not _in_hub_cache(f'{HUB_ORGANISATION}/{name}', kwargs.get('cache_dir')):
        raise RuntimeError(
            f"Pretrained weights for '{name}' are not published yet. Train them with the recipe in hub_cards/"
            f"{name}.md (train_scripts/train.py ... then publish.py), or load your own file with "
            f"pretrained_cfg_overlay=dict(file='...'), or use pretrained=False.")


def _create_srn(variant: str, pretrained: bool = False, **kwargs) -> SRN:
    _check_weights_published(variant, pretrained, kwargs)
    feature_cfg = dict(feature_cls='getter')
    if kwargs.get('features_only'):
        # features_only returns every backbone feature level (built on the meta device just to count them)
        backbone = timm.create_model(kwargs.get('backbone', 'resnet101'), device='meta')
        feature_cfg['out_indices'] = tuple(range(len(backbone.feature_info)))
    if variant == 'srn':
        overlay = _backbone_cfg_overlay(kwargs.get('backbone', 'resnet101'), kwargs.get('img_size'))
        overlay.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
        kwargs['pretrained_cfg_overlay'] = overlay
    return build_model_with_cfg(
        SRN,
        variant,
        pretrained,
        pretrained_filter_fn=_check_srn_state_dict,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 80,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 1.0,  # the original resizes the whole image, no crop
        'crop_mode': 'squash',
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'backbone.conv1',
        'classifier': SRN_CLASSIFIERS,
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:1702.05891',
        'paper_name': 'Learning Spatial Regularization with Image-level Supervisions for Multi-label Image Classification',
        'origin_url': 'https://github.com/timm-srn/timm-srn',
        **kwargs,
    }


HUB_ORGANISATION = 'timm-srn'
# COCO 2014 (80 labels, 224x224) weights published as {HUB_ORGANISATION}/<architecture>.<tag>
COCO_WEIGHTS = {
    'srn_resnet50.coco_224': {},
    'srn_resnet101.coco_224': {},
    'srn_convnext_tiny.coco_224': dict(first_conv='backbone.stem.0'),
    'srn_vit_small_patch16_224.coco_224': dict(first_conv='backbone.patch_embed.proj', pool_size=None),
}


# registered tags whose weights are not on the Hub yet (see hub_cards/): pretrained=True fails at once
UNPUBLISHED_WEIGHTS = frozenset(COCO_WEIGHTS)


def _test_cfg(**kwargs) -> Dict[str, Any]:
    """Tiny variants on timm's test_* backbones (160x160, mean/std 0.5 like their backbones)."""
    return _cfg(**dict(dict(input_size=(3, 160, 160), pool_size=(5, 5), mean=(0.5,) * 3, std=(0.5,) * 3), **kwargs))


default_cfgs = generate_default_cfgs({
    'srn.untrained': _cfg(),
    **{name: _cfg(hf_hub_id=f'{HUB_ORGANISATION}/{name}', label_names=COCO_LABEL_NAMES, **kwargs)
       for name, kwargs in COCO_WEIGHTS.items()},
    'srn_test_resnet.untrained': _test_cfg(first_conv='backbone.conv1.0'),
    'srn_test_vit.untrained': _test_cfg(first_conv='backbone.patch_embed.proj', pool_size=None),
    'srn_test_convnext.untrained': _test_cfg(first_conv='backbone.stem.0'),
})


def _vit_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """ViT backbones run at any resolution (dynamic position embedding resampling)."""
    backbone_kwargs = dict(dynamic_img_size=True, **kwargs.pop('backbone_kwargs', None) or {})
    return dict(backbone_kwargs=backbone_kwargs, **kwargs)


@register_model
def srn(pretrained: bool = False, **kwargs) -> SRN:
    """SRN on any timm backbone: `timm.create_model('srn', backbone='convnext_tiny', num_classes=20)`."""
    return _create_srn('srn', pretrained=pretrained, **kwargs)


@register_model
def srn_resnet50(pretrained: bool = False, **kwargs) -> SRN:
    """SRN on ResNet-50, attention on layer3 (14x14 at 224)."""
    return _create_srn('srn_resnet50', pretrained=pretrained, **dict(dict(backbone='resnet50'), **kwargs))


@register_model
def srn_resnet101(pretrained: bool = False, **kwargs) -> SRN:
    """SRN on ResNet-101 as in the paper: attention on res4b22 (layer3, 14x14 at 224)."""
    return _create_srn('srn_resnet101', pretrained=pretrained, **dict(dict(backbone='resnet101'), **kwargs))


@register_model
def srn_convnext_tiny(pretrained: bool = False, **kwargs) -> SRN:
    """SRN on ConvNeXt-Tiny, attention on stage 3 (reduction 16)."""
    return _create_srn('srn_convnext_tiny', pretrained=pretrained, **dict(dict(backbone='convnext_tiny'), **kwargs))


@register_model
def srn_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> SRN:
    """SRN on ViT-S/16, attention on the last block by default (tap_index selects another)."""
    kwargs = _vit_kwargs(dict(dict(backbone='vit_small_patch16_224'), **kwargs))
    return _create_srn('srn_vit_small_patch16_224', pretrained=pretrained, **kwargs)


@register_model
def srn_test_resnet(pretrained: bool = False, **kwargs) -> SRN:
    """Tiny SRN on timm's test_resnet for tests (160x160)."""
    kwargs = dict(dict(backbone='test_resnet', img_size=160, att_chs=32, sr_chs=32, sr_out_chs=64, sr_groups=32), **kwargs)
    return _create_srn('srn_test_resnet', pretrained=pretrained, **kwargs)


@register_model
def srn_test_vit(pretrained: bool = False, **kwargs) -> SRN:
    """Tiny SRN on timm's test_vit for tests (160x160)."""
    kwargs = dict(dict(backbone='test_vit', img_size=160, att_chs=32, sr_chs=32, sr_out_chs=64, sr_groups=32), **kwargs)
    return _create_srn('srn_test_vit', pretrained=pretrained, **_vit_kwargs(kwargs))


@register_model
def srn_test_convnext(pretrained: bool = False, **kwargs) -> SRN:
    """Tiny SRN on timm's test_convnext for tests (160x160)."""
    kwargs = dict(dict(backbone='test_convnext', img_size=160, att_chs=32, sr_chs=32, sr_out_chs=64, sr_groups=32), **kwargs)
    return _create_srn('srn_test_convnext', pretrained=pretrained, **kwargs)
