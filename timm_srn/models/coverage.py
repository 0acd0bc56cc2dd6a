"""Which timm model families SRN and the class maps of plain models run on.

One model per family (timm's model modules), built on the meta device (no weights, no compute) at its
pretrained input size (a few families on the CPU at a small size, see CPU_FAMILIES): SRN forward +
forward_branches, and the class maps the spatial consistency loss takes from the plain model. `python -m timm_srn.models.coverage` prints the table and the coverage figure;
the test suite runs the same check per family.
"""
import argparse
from typing import NamedTuple, Optional, Tuple

import torch
from tqdm import tqdm

import timm

from ..losses.heatmap_source import HeatmapSource

__all__ = ['FAMILY_MODELS', 'CPU_FAMILIES', 'NO_SPATIAL_FEATURES', 'FamilyResult', 'check_family', 'family_model']

# the smallest model (parameters x input pixels, timm's test_* models excluded) of each family in timm 1.0.31;
# families added to timm later use their first model
FAMILY_MODELS = {
    'beit': 'beit_base_patch16_224',
    'byoanet': 'halonet_h1',
    'byobnet': 'mobileone_s1',
    'cait': 'cait_xxs24_224',
    'coat': 'coat_tiny',
    'convit': 'convit_tiny',
    'convmixer': 'convmixer_768_32',
    'convnext': 'convnext_zepto_rms',
    'cpubone': 'cpubone_nano',
    'crossvit': 'crossvit_tiny_240',
    'csatv2': 'csatv2',
    'cspnet': 'cs3darknet_focus_s',
    'cspnext': 'cspnext_tiny',
    'davit': 'davit_tiny',
    'deepseek_vit': 'deepseek_vit_412m',
    'deit': 'deit_tiny_patch16_224',
    'densenet': 'densenet121',
    'dla': 'dla46x_c',
    'dpn': 'dpn48b',
    'edgenext': 'edgenext_xx_small',
    'efficientformer': 'efficientformer_l1',
    'efficientformer_v2': 'efficientformerv2_s0',
    'efficientnet': 'tinynet_e',
    'efficientvim': 'efficientvim_m1',
    'efficientvit_mit': 'efficientvit_b0',
    'efficientvit_msra': 'efficientvit_m0',
    'eva': 'eva02_tiny_patch14_224',
    'fasternet': 'fasternet_t0',
    'fastvit': 'fastvit_t8',
    'focalnet': 'focalnet_tiny_srf',
    'gcvit': 'gcvit_xxtiny',
    'gemma4_vit': 'gemma4_vit_167m',
    'ghostnet': 'ghostnet_050',
    'hardcorenas': 'hardcorenas_b',
    'hgnet': 'hgnetv2_b0',
    'hiera': 'hiera_tiny_224',
    'hieradet_sam2': 'hieradet_small',
    'hrnet': 'hrnet_w18_small',
    'iformer': 'iformer_t',
    'inception_next': 'inception_next_atto',
    'inception_resnet_v2': 'inception_resnet_v2',
    'inception_v3': 'inception_v3',
    'inception_v4': 'inception_v4',
    'lcnetv2': 'lcnetv2_small',
    'levit': 'levit_128s',
    'lowformer': 'lowformer_b0',
    'mambaout': 'mambaout_femto',
    'maxxvit': 'maxvit_pico_rw_256',
    'metaformer': 'poolformerv2_s12',
    'mlp_mixer': 'gmlp_ti16_224',
    'mobilenetv3': 'mobilenetv3_small_050',
    'mobilenetv5': 'mobilenetv5_base',
    'mobilevit': 'mobilevit_xxs',
    'mvitv2': 'mvitv2_tiny',
    'naflexvit': 'naflexvit_base_patch16_parfac_gap',
    'nasnet': 'nasnetalarge',
    'nest': 'nest_tiny',
    'nextvit': 'nextvit_small',
    'nfnet': 'nf_regnet_b0',
    'pit': 'pit_ti_224',
    'pnasnet': 'pnasnet5large',
    'pvt_v2': 'pvt_v2_b0',
    'qwen3_vit': 'qwen3_vit_88m',
    'rdnet': 'rdnet_tiny',
    'regnet': 'regnetx_002',
    'repghost': 'repghostnet_050',
    'repvit': 'repvit_m1',
    'res2net': 'res2next50',
    'resnest': 'resnest14d',
    'resnet': 'resnet10t',
    'resnetv2': 'resnetv2_18',
    'rexnet': 'rexnet_100',
    'selecsls': 'selecsls42',
    'senet': 'legacy_seresnet18',
    'sequencer': 'sequencer2d_s',
    'shvit': 'shvit_s1',
    'sknet': 'skresnet18',
    'starnet': 'starnet_s050',
    'swiftformer': 'swiftformer_xs',
    'swin_transformer': 'swin_tiny_patch4_window7_224',
    'swin_transformer_v2': 'swinv2_tiny_window8_256',
    'swin_transformer_v2_cr': 'swinv2_cr_tiny_224',
    'tiny_vit': 'tiny_vit_5m_224',
    'tnt': 'tnt_s_legacy_patch16_224',
    'tresnet': 'tresnet_m',
    'twins': 'twins_svt_small',
    'vgg': 'vgg11',
    'visformer': 'visformer_tiny',
    'vision_transformer': 'vit_tiny_patch16_224',
    'vision_transformer_hybrid': 'vit_tiny_r_s16_p8_224',
    'vision_transformer_relpos': 'vit_srelpos_small_patch16_224',
    'vision_transformer_sam': 'samvit_base_patch16_224',
    'vitamin': 'vitamin_small_224',
    'volo': 'volo_d1_224',
    'vovnet': 'ese_vovnet19b_slim_dw',
    'xception': 'legacy_xception',
    'xception_aligned': 'xception41p',
    'xcit': 'xcit_nano_12_p8_224',
}

# families checked on the CPU at CPU_IMG_SIZE instead of the meta device
CPU_FAMILIES = {
    'gemma4_vit': 'its position embedding calls Tensor.item() (data-dependent), which meta tensors cannot give',
    'sequencer': 'its LSTMs run step by step on the meta device (about 30 s per forward)',
}
CPU_IMG_SIZE = 64

# families whose final features have no spatial layout: SRN's class maps fall back to its confidence maps S, and a
# plain model of the family gives no class maps for the spatial loss (use SRN on it instead)
NO_SPATIAL_FEATURES = {
    'crossvit': 'final features are two token branches of different patch sizes, each pooled by its own head',
    'efficientvim': 'final features are a list of per-stage maps that the head merges',
    'pit': 'the final stage returns the class token only',
    'coat': 'CoaT (parallel) models return the class tokens of three scales; CoaT-Lite models have spatial tokens',
}


class FamilyResult(NamedTuple):
    family: str
    model: str
    img_size: Tuple[int, int]
    tap_map_size: Tuple[int, int]
    class_map_size: Tuple[int, int]
    srn_class_maps: str  # 'head' (the main branch per position) or 'confidence' (fallback)
    plain_class_maps: bool  # whether the plain model gives class maps for the spatial loss


def family_model(family: str) -> str:
    return FAMILY_MODELS.get(family) or timm.list_models(module=family)[0]


def check_family(family: str, num_classes: int = 5, batch_size: int = 2) -> FamilyResult:
    """Build SRN and the plain model of `family` and run them; raises on any failure."""
    name = family_model(family)
    device = 'cpu' if family in CPU_FAMILIES else 'meta'
    srn_kwargs = dict(img_size=CPU_IMG_SIZE) if family in CPU_FAMILIES else {}
    srn = timm.create_model('srn', backbone=name, num_classes=num_classes, device=device, **srn_kwargs).eval()
    x = torch.randn(batch_size, srn.in_chans, *srn.img_size, device=device)
    branches = []
    srn.register_output_hook(branches.append)  # forward runs forward_branches: one pass checks both
    with torch.no_grad():
        logits = srn(x)
    out, = branches
    expected = (batch_size, num_classes)
    if tuple(logits.shape) != expected or tuple(out.attention.shape) != (*expected, *srn.tap_map_size):
        raise AssertionError(f'{name}: logits {tuple(logits.shape)}, attention {tuple(out.attention.shape)}')
    if out.class_maps.ndim != 4 or tuple(out.class_maps.shape[:2]) != expected:
        raise AssertionError(f'{name}: class maps {tuple(out.class_maps.shape)}')

    plain = timm.create_model(name, num_classes=num_classes, device=device).eval()
    source = HeatmapSource(plain)
    plain_maps: Optional[torch.Tensor] = None
    with torch.no_grad():
        plain(x)
    try:
        plain_maps = source.latest()
    except ValueError:
        if family not in NO_SPATIAL_FEATURES:
            raise
    if plain_maps is not None and tuple(plain_maps.shape[:2]) != expected:
        raise AssertionError(f'{name}: plain class maps {tuple(plain_maps.shape)}')
    return FamilyResult(
        family, name, srn.img_size, srn.tap_map_size, tuple(out.class_maps.shape[-2:]),
        'confidence' if out.class_maps is out.confidence else 'head', plain_maps is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--family', nargs='*', help='families to check (default: every timm family)')
    args = parser.parse_args()
    families = args.family or [family for family in timm.list_modules() if family != 'srn']
    results, failures = [], {}
    for family in tqdm(families, desc='families'):
        try:
            results.append(check_family(family))
        except Exception as e:  # noqa: BLE001 -- the sweep reports every failure instead of stopping at the first
            failures[family] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    print('| family | model | img size | tap map | class maps (from) | plain-model class maps |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f'| {r.family} | {r.model} | {r.img_size[0]}x{r.img_size[1]} | {r.tap_map_size[0]}x{r.tap_map_size[1]} | '
              f'{r.class_map_size[0]}x{r.class_map_size[1]} ({r.srn_class_maps}) | {"yes" if r.plain_class_maps else "no"} |')
    for family, error in failures.items():
        print(f'| {family} | {family_model(family)} | FAILED: {error} |||||')
    head = sum(r.srn_class_maps == 'head' for r in results)
    plain = sum(r.plain_class_maps for r in results)
    print(f'\nSRN builds and runs on {len(results)}/{len(families)} timm families; class maps from the model\'s own head '
          f'on {head}/{len(families)}; the spatial loss on plain models of {plain}/{len(families)}.')


if __name__ == '__main__':
    main()
