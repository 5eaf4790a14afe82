"""Shared helpers for the layer and model tests: which names exist, small builds, an offline Hub cache."""
import os
from typing import Dict, List

import timm
import torch

import timm_gcp  # noqa: F401  (registers the models)
from timm_gcp import METHODS

RESNET_FAMILIES = ('resnet18_gcp', 'resnet34_gcp', 'resnet50_gcp', 'resnet101_gcp', 'resnet50_ls1_gcp',
    'resnet101_ls1_gcp', 'resnet50d_gcp')
FAMILIES = RESNET_FAMILIES + ('alexnet_gcp',)
ALL_NAMES = [f'{f}_{m}' for f in FAMILIES for m in METHODS]
# GcpNet families: a timm backbone under `backbone.`, the GCP head beside it (backbone_gcp.py)
BACKBONE_FAMILIES = ('convnext_tiny_gcp', 'convnext_small_gcp', 'efficientnet_b0_gcp', 'regnety_032_gcp',
    'vit_small_patch16_224_gcp', 'deit_small_patch16_224_gcp', 'swin_tiny_patch4_window7_224_gcp', 'generic_gcp')
BACKBONE_NAMES = [f'{f}_{m}' for f in BACKBONE_FAMILIES for m in METHODS]
# Heads other than the matrix root: DropCov on every family, SoT on the token families (ViT-S, DeiT-S, Swin-T, generic)
TOKEN_FAMILIES = ('vit_small_patch16_224_gcp', 'deit_small_patch16_224_gcp', 'swin_tiny_patch4_window7_224_gcp',
    'generic_gcp')
OTHER_HEAD_NAMES = [f'{f}_dropcov' for f in FAMILIES + BACKBONE_FAMILIES] + [f'{f}_sot' for f in TOKEN_FAMILIES]
# The two kinds of method the model tests exercise, named: an eigen-method (MPN-COV's exact SVD) and iSQRT-COV's
# Newton-Schulz iteration. A registry without either is a failure (test_named_methods_exist), not a silent switch.
EIGEN_METHOD = 'svd'
NS_METHOD = 'isqrt'


def family_of(name: str) -> str:
    return name.rsplit('_', 1)[0]


def representative_names() -> List[str]:
    """The heavier API checks run on these: BasicBlock ResNet, Bottleneck ResNet in the fast-MPN-COV layout and the
    AlexNet, between them both kinds of method (Newton-Schulz and eigen). The ResNet families differ only in block
    type, depth and last stride, which the meta-device checks cover for every name."""
    return [f'resnet18_gcp_{NS_METHOD}', f'resnet50_ls1_gcp_{EIGEN_METHOD}', f'alexnet_gcp_{NS_METHOD}']


def family_method_pairs() -> List[str]:
    """Every family once and every method once (methods taken in turn), for a real forward/backward each."""
    methods = list(METHODS)
    names = [f'{f}_{methods[i % len(methods)]}' for i, f in enumerate(FAMILIES)]
    names += [f'resnet18_gcp_{m}' for m in methods[len(FAMILIES):]]
    return names


def small_kwargs(name: str) -> Dict:
    """Small but real: gcp_dim 8 (36 pooled values); ResNets one block per stage (same block type, widths, strides
    and head as the full model: the API code paths are the same); AlexNet with a narrow MLP; a GcpNet model with
    :func:`tiny_kwargs`."""
    if family_of(name) in TINY_BACKBONE_KWARGS:
        return tiny_kwargs(name)
    kw = dict(gcp_dim=8)
    if name.startswith('alexnet'):
        kw['mlp_dim'] = 32
    else:
        kw['layers'] = (1, 1, 1, 1)
    return kw


_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
_VIT = dict(depth=1, embed_dim=32, num_heads=2, img_size=64)
# Backbone arguments that make each GcpNet family small (same blocks, layout and head code as the full model).
# EfficientNet-B0's entrypoint fixes its widths, so it stays full width (5 M parameters) and runs at 64 px.
TINY_BACKBONE_KWARGS = {
    'convnext_tiny_gcp': _CONVNEXT,
    'convnext_small_gcp': _CONVNEXT,
    'efficientnet_b0_gcp': {},
    'regnety_032_gcp': dict(depth=6, w0=8, wa=8, wm=2.0, group_size=8, stem_width=8),
    'vit_small_patch16_224_gcp': _VIT,
    'deit_small_patch16_224_gcp': _VIT,
    'swin_tiny_patch4_window7_224_gcp': dict(
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=64, window_size=2),
    'generic_gcp': dict(backbone='mobilenetv3_small_050'),
}


def tiny_kwargs(name: str) -> Dict:
    """gcp_dim 8 and a small backbone of the family of ``name`` (a GcpNet model)."""
    return dict(gcp_dim=8, **TINY_BACKBONE_KWARGS[family_of(name)])


def make_hub_cache(root: str, repo_id: str, state_dict: Dict[str, torch.Tensor], revision: str = 'a' * 40) -> str:
    """Lay out a Hugging Face Hub cache holding ``model.safetensors`` for ``repo_id`` (as hf_hub_download leaves it).

    Returns the snapshot directory.
    """
    import safetensors.torch
    repo_dir = os.path.join(root, 'models--' + repo_id.replace('/', '--'))
    snap = os.path.join(repo_dir, 'snapshots', revision)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo_dir, 'refs'), exist_ok=True)
    with open(os.path.join(repo_dir, 'refs', 'main'), 'w') as f:
        f.write(revision)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    safetensors.torch.save_file(tensors, os.path.join(snap, 'model.safetensors'))
    return snap


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **kwargs)
