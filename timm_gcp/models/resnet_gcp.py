"""ResNets with global covariance pooling (matrix square-root normalised second-order pooling).

Papers:
* `Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?` (ICCV 2021)
  - https://arxiv.org/abs/2105.02498
* `Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization`
  (iSQRT-COV, CVPR 2018) - https://arxiv.org/abs/1712.01034
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
* `DropCov: A Simple yet Effective Method for Improving Deep Architectures` (NeurIPS 2022)
  - https://github.com/mingzeG/DropCov

timm's ``ResNet`` with its average pooling replaced by ``global_pool = CovPool(...)`` and ``fc`` a Linear on the
d(d+1)/2 pooled values. Entrypoints ``<backbone>_gcp_<method>`` are generated for every method in
``timm_gcp.METHODS`` and ``<backbone>_gcp_dropcov`` for DropCov's head (no root; the ``_ls1_`` ResNets are its paper's
setting); the ``_ls1_`` variants use the fast-MPN-COV layout (last stage stride 1, no dilation).
"""
import logging
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..checkpoint import unwrap_state_dict
from ._cfg_utils import (
    ORIGIN_URL, PAPER_IDS, PAPER_NAME, build_cfgs, check_gcp_args, gcp_archs, head_cfg_fields, register_gcp_models,
    with_fresh_head)
from ._head import GCP_POOL, GCP_POOLS, GcpHeadMixin, note_fresh_head
from ._positions import warn_if_too_few_positions

__all__ = ['ResNetGcp', 'checkpoint_filter_fn']  # register_model adds each entrypoint

_logger = logging.getLogger(__name__)


def _set_stage_stride_one(stage: nn.Sequential) -> None:
    """Make a ResNet stage keep its input resolution: stride 1 in its first block, no dilation (fast-MPN-COV)."""
    block = stage[0]
    if not isinstance(getattr(block, 'aa', nn.Identity()), nn.Identity):
        raise ValueError('last_stride=1 is not supported together with aa_layer (anti-aliased downsampling)')
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    conv.stride = (1, 1)
    if block.downsample is not None:
        first = block.downsample[0]
        if isinstance(first, nn.AvgPool2d):  # avg_down: the pooling is the downsampling, drop it
            block.downsample[0] = nn.Identity()
        elif isinstance(first, nn.Conv2d):
            first.stride = (1, 1)


class ResNetGcp(GcpHeadMixin, ResNet):
    """timm ResNet with a global covariance pooling head.

    State-dict keys are timm's ResNet keys plus ``global_pool.conv.weight`` and ``global_pool.bn.*`` (the 1×1
    reduction of ``CovPool``); ``fc`` is Linear(d(d+1)/2 → classes). ``num_features`` is the backbone width,
    ``head_hidden_size`` the pooled length d(d+1)/2 (32,896 for d = 256).
    """

    def __init__(
            self,
            block: Union[Type[BasicBlock], Type[Bottleneck]],
            layers: Tuple[int, ...],
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = GCP_POOL,
            gcp_method: str = 'pade', gcp_dim: Optional[int] = 256, gcp_kwargs: Optional[Dict[str, Any]] = None,
            last_stride: int = 2,
            drop_rate: float = 0.,
            output_stride: int = 32,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            block, layers: as timm's ``ResNet``.
            num_classes: classifier outputs, 0 for no classifier (``forward`` returns the pooled vector).
            in_chans: input image channels.
            global_pool: 'gcp' (covariance pooling) or '' (no pooling: ``forward_head`` returns the feature map, or
                with ``num_classes`` > 0 the logits of every position).
            gcp_method: matrix square-root method, a key of ``timm_gcp.METHODS``, or ``'dropcov'`` for DropCov's
                head (no root; adaptive channel dropout in training).
            gcp_dim: channels after the 1×1 reduction (256; the ``_gcp_dropcov`` entrypoints default to DropCov's
                128); None or 0 skips the reduction (d = backbone width).
            gcp_kwargs: method or head options, e.g. ``{'iters': 3}``, ``{'per_sample': True}``.
            last_stride: stride of the last stage, 2 (timm/torchvision) or 1 (fast-MPN-COV, no dilation).
            drop_rate: dropout before the classifier.
            output_stride: as timm's ``ResNet`` (dilation); must stay 32 with ``last_stride=1``.
            **kwargs: any other argument of timm's ``ResNet`` (unknown ones raise ``TypeError``).
        """
        check_gcp_args(global_pool, gcp_method, gcp_dim, gcp_kwargs)
        if last_stride not in (1, 2):
            raise ValueError(f'last_stride must be 1 or 2, got {last_stride!r}')
        if last_stride == 1 and output_stride != 32:
            raise ValueError(
                f'last_stride=1 replaces dilation; it cannot be combined with output_stride={output_stride}')
        super().__init__(
            block, layers, num_classes=0, in_chans=in_chans, global_pool='avg', drop_rate=drop_rate,
            output_stride=output_stride, device=device, dtype=dtype, **kwargs)
        if last_stride == 1:
            _set_stage_stride_one(self.layer4)
            self.feature_info[-1]['reduction'] = self.feature_info[-2]['reduction']
        self.last_stride = last_stride
        self._init_gcp_head(
            self.num_features, num_classes, global_pool, gcp_method, gcp_dim, gcp_kwargs, device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Stem, stages/blocks, then the GCP head (``global_pool`` + ``fc``) as its own last group."""
        return dict(
            stem=r'^conv1|bn1|maxpool',
            blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
            head=r'^global_pool|^fc',
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """No parameter is exempt by name; timm's optimizer factory already exempts 1-d params (BN, biases)."""
        return set()


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a checkpoint onto a GCP ResNet's keys.

    * a GCP checkpoint (``global_pool.*`` keys, or ``fc`` sized for the pooled vector) passes through unchanged;
    * a plain timm/torchvision ResNet state dict (``fc.weight`` [classes × 2048], no ``global_pool.*``) loads the
      backbone only: ``global_pool.*`` and ``fc.*`` keep the model's fresh initialisation and a log line says so.

    Wrappers (``state_dict``/``model`` entries, ``module.`` prefixes) are removed. Class-count and input-channel
    changes are handled afterwards by timm's ``load_pretrained`` (classifier dropped, stem adapted). An official
    fast-MPN-COV / DifferentiableSVD checkpoint raises ``ValueError`` pointing at ``timm_gcp.convert``.
    """
    state_dict = unwrap_state_dict(state_dict)
    official = [k for k in ('layer_reduce.weight', 'representation.conv_dr_block.0.weight') if k in state_dict]
    if official:
        raise ValueError(
            f'this is an official fast-MPN-COV / DifferentiableSVD checkpoint (it has {official[0]!r}); convert it '
            f'into timm-gcp keys first with timm_gcp.convert.convert_file (scripts/convert_official.py)')
    head = ('global_pool.', 'fc.')
    if not isinstance(getattr(model, 'global_pool', None), GCP_POOLS):
        # built without pooling (global_pool=''): no head parameters, load the backbone only
        return {k: v for k, v in state_dict.items() if not k.startswith(head)}
    fc = state_dict.get('fc.weight')
    is_gcp = any(k.startswith('global_pool.') for k in state_dict) or (
        fc is not None and fc.shape[-1] == model.head_hidden_size)
    if is_gcp:
        return state_dict
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    return with_fresh_head(backbone, model, 'a plain ResNet checkpoint')


def _create_resnet_gcp(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetGcp:
    model = build_model_with_cfg(ResNetGcp, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    if not kwargs.get('features_only', False):
        warn_if_too_few_positions(model, variant)
    if model.__dict__.pop('_gcp_head_fresh', False):
        note_fresh_head(model, variant, kwargs.get('features_only', False))
    return model


# family → (backbone args, one-line description). Families are what the zoo registry keys backbone-only tags by.
_FAMILIES: Dict[str, Tuple[Dict[str, Any], str]] = {
    'resnet18_gcp': (dict(block=BasicBlock, layers=(2, 2, 2, 2)), 'ResNet-18'),
    'resnet34_gcp': (dict(block=BasicBlock, layers=(3, 4, 6, 3)), 'ResNet-34'),
    'resnet50_gcp': (dict(block=Bottleneck, layers=(3, 4, 6, 3)), 'ResNet-50'),
    'resnet101_gcp': (dict(block=Bottleneck, layers=(3, 4, 23, 3)), 'ResNet-101'),
    'resnet50_ls1_gcp': (
        dict(block=Bottleneck, layers=(3, 4, 6, 3), last_stride=1), 'ResNet-50, last stage stride 1 (fast-MPN-COV)'),
    'resnet101_ls1_gcp': (
        dict(block=Bottleneck, layers=(3, 4, 23, 3), last_stride=1), 'ResNet-101, last stage stride 1 (fast-MPN-COV)'),
    'resnet50d_gcp': (
        dict(block=Bottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True),
        'ResNet-50-D (deep stem, average-pool downsampling)'),
}
_ARCH_FAMILY = gcp_archs(_FAMILIES)


def _cfg(arch: str = '', **kwargs: Any) -> Dict[str, Any]:
    model_args = _FAMILIES[_ARCH_FAMILY[arch]][0] if arch else {}
    ls1 = model_args.get('last_stride', 2) == 1
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14) if ls1 else (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1.0' if model_args.get('stem_type') else 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': PAPER_IDS, 'paper_name': PAPER_NAME, 'origin_url': ORIGIN_URL,
        **(head_cfg_fields(arch) if arch else {}), **kwargs,
    }


default_cfgs = generate_default_cfgs(build_cfgs(_ARCH_FAMILY, _ARCH_FAMILY, _cfg))
register_gcp_models(__name__, _FAMILIES, _create_resnet_gcp)
