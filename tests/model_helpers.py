"""Shared helpers for the layer and model tests: which names exist, small builds, an offline Hub cache."""
import os
from typing import Dict, List

import timm
import torch

import timm_gcp  # noqa: F401  (registers the models)
from timm_gcp import METHODS

RESNET_FAMILIES = ('resnet18_gcp', 'resnet34_gcp', 'resnet50_gcp', 'resnet101_gcp', 'resnet50_ls1_gcp',
    'resnet101_ls1_gcp')
FAMILIES = RESNET_FAMILIES + ('alexnet_gcp',)
ALL_NAMES = [f'{f}_{m}' for f in FAMILIES for m in METHODS]
# one eigen-method and one that is not (Newton-Schulz), whatever the registry holds
EIGEN_METHOD = next(m for m, s in METHODS.items() if s.eigen)
NS_METHOD = next((m for m, s in METHODS.items() if not s.eigen), EIGEN_METHOD)


def family_of(name: str) -> str:
    return name.rsplit('_', 1)[0]


def representative_names() -> List[str]:
    """Each family once (methods taken in turn), plus resnet18 with every method: the heavier checks run on these."""
    methods = list(METHODS)
    names = [f'{f}_{methods[i % len(methods)]}' for i, f in enumerate(FAMILIES)]
    names += [f'resnet18_gcp_{m}' for m in methods if f'resnet18_gcp_{m}' not in names]
    return names


def small_kwargs(name: str) -> Dict:
    """Small but real: gcp_dim 8 (36 pooled values) and, for AlexNet, a narrow MLP."""
    kw = dict(gcp_dim=8)
    if name.startswith('alexnet'):
        kw['mlp_dim'] = 32
    return kw


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
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(snap, 'model.safetensors'))
    return snap


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **kwargs)
