"""ResNets with global covariance pooling (matrix square-root normalised second-order pooling).

Papers:
* `Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?` (ICCV 2021)
  - https://arxiv.org/abs/2105.02498
* `Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization`
  (iSQRT-COV, CVPR 2018) - https://arxiv.org/abs/1712.01034
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385

timm's ``ResNet`` with its average pooling replaced by ``global_pool = CovPool(...)`` and ``fc`` a Linear on the
d(d+1)/2 pooled values. Entrypoints ``<backbone>_gcp_<method>`` are generated for every method in
``timm_gcp.METHODS``; the ``_ls1_`` variants use the fast-MPN-COV layout (last stage stride 1, no dilation).
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..functional import METHODS
from ..layers import CovPool
from ._cfg_utils import (
    GCP_POOL, ORIGIN_URL, PAPER_IDS, GcpMethodAttrs, build_cfgs, check_gcp_args, unwrap_state_dict)

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


class ResNetGcp(GcpMethodAttrs, ResNet):
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
            gcp_method: str = 'pade',
            gcp_dim: Optional[int] = 256,
            gcp_kwargs: Optional[Dict[str, Any]] = None,
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
            global_pool: 'gcp' (covariance pooling) or '' (no pooling, ``forward_head`` returns the feature map;
                requires ``num_classes=0``).
            gcp_method: matrix square-root method, a key of ``timm_gcp.METHODS``.
            gcp_dim: channels after the 1×1 reduction (256); None or 0 skips the reduction (d = backbone width).
            gcp_kwargs: method options, e.g. ``{'iters': 3}``.
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
        self.gcp_method = gcp_method
        self.gcp_dim = gcp_dim or None
        self.gcp_kwargs = gcp_kwargs
        self.num_classes = num_classes
        self.global_pool = nn.Identity()  # replaced right away; lets _build_head tell a CovPool is not there yet
        self._build_head(num_classes, global_pool, device=device, dtype=dtype)

    def _build_head(self, num_classes: int, global_pool: str, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        if global_pool == GCP_POOL:
            if not isinstance(self.global_pool, CovPool):
                self.global_pool = CovPool(self.num_features, self.gcp_dim, self.gcp_method, self.gcp_kwargs, **dd)
            self.head_hidden_size = self.global_pool.out_features
        elif global_pool == '':
            if num_classes:
                raise ValueError(f"global_pool='' leaves an unpooled map; it needs num_classes=0, got {num_classes}")
            self._remember_gcp_method()
            self.global_pool = SelectAdaptivePool2d(pool_type='', flatten=False)
            self.head_hidden_size = self.num_features
        else:
            raise ValueError(f"global_pool must be '{GCP_POOL}', '' or None (keep), got {global_pool!r}")
        self.fc = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

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

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a fresh ``fc`` of ``num_classes`` outputs (0: none).

        Args:
            num_classes: new number of classes.
            global_pool: None or 'gcp' keeps the current pooling module as it is (its trained reduction conv/BN,
                method, frozen/``requires_grad`` state and train/eval mode); 'gcp' on a model without covariance
                pooling builds a fresh ``CovPool``; '' removes pooling (then ``num_classes`` must be 0).

        The new ``fc`` is trainable, on the model's device and dtype and in the model's train/eval mode.
        """
        dd = get_device_dtype(self)
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._build_head(num_classes, global_pool, **dd)  # raises before changing anything on bad arguments
        self.num_classes = num_classes
        self.global_pool.train(self.training)
        self.fc.train(self.training)


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
    if not isinstance(getattr(model, 'global_pool', None), CovPool):
        # built without pooling (global_pool=''): no head parameters, load the backbone only
        return {k: v for k, v in state_dict.items() if not k.startswith(head)}
    fc = state_dict.get('fc.weight')
    is_gcp = any(k.startswith('global_pool.') for k in state_dict) or (
        fc is not None and fc.shape[-1] == model.head_hidden_size)
    if is_gcp:
        return state_dict
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(head)}
    state_dict.update(fresh)
    modules = sorted({k.rsplit('.', 1)[0] for k in fresh})
    _logger.info(f'Loaded backbone weights from a plain ResNet checkpoint; GCP head freshly initialised '
        f'({", ".join(modules)})')
    model._gcp_head_fresh = True  # read by _create_resnet_gcp
    return state_dict


def _create_resnet_gcp(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetGcp:
    model = build_model_with_cfg(ResNetGcp, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    if getattr(model, '_gcp_head_fresh', False) and not kwargs.get('features_only'):
        del model._gcp_head_fresh
        if model.num_classes and model.num_classes == model.pretrained_cfg.get('num_classes'):
            # the user kept the checkpoint's classes, so may expect its classifier: say loudly that it is untrained
            _logger.warning(
                f'{variant}: the pretrained weights ({model.pretrained_cfg.get("tag") or "given file"}) hold the '
                f'backbone only; the GCP head and the {model.num_classes}-class classifier are freshly initialised, '
                f'so the model must be fine-tuned before its predictions mean anything')
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
}
_ARCH_FAMILY = {f'{family}_{m}': family for family in _FAMILIES for m in METHODS}


def _cfg(arch: str = '', **kwargs: Any) -> Dict[str, Any]:
    ls1 = _FAMILIES[_ARCH_FAMILY[arch]][0].get('last_stride', 2) == 1 if arch else False
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14) if ls1 else (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0', 'paper_ids': PAPER_IDS,
        'paper_name': 'Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?',
        'origin_url': ORIGIN_URL,
        **kwargs,
    }


default_cfgs = generate_default_cfgs(build_cfgs(_ARCH_FAMILY, _ARCH_FAMILY, _cfg))


def _make_entrypoint(family: str, method: str) -> Callable[..., ResNetGcp]:
    name = f'{family}_{method}'
    model_args, what = _FAMILIES[family]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ResNetGcp:
        return _create_resnet_gcp(name, pretrained, **{**model_args, 'gcp_method': method, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'{what} with covariance pooling, matrix square root by {METHODS[method].paper_name}.'
    return entrypoint


for _family in _FAMILIES:
    for _method in METHODS:
        _fn = _make_entrypoint(_family, _method)
        globals()[_fn.__name__] = register_model(_fn)
del _family, _method, _fn
