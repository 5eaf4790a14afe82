"""The BN AlexNet with global covariance pooling used in the ICCV 2021 GCP paper (its Tables 1, 2 and 5).

Papers:
* `Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?` (ICCV 2021)
  - https://arxiv.org/abs/2105.02498
* `One weird trick for parallelizing convolutional neural networks` (the 64-192-384-256-256 AlexNet)
  - https://arxiv.org/abs/1404.5997

Layout (as the paper's reference code builds it): five conv → BN → ReLU layers (max-pooling after the first two;
the last max-pooling removed), conv5 with 256 channels (13×13 at 224 px), ``CovPool`` with a 1×1 256→256
reduction, then FC 32,896 → 4,096 → 4,096 → classes with ReLUs and no dropout. ``alexnet_gcp_dropcov`` has
DropCov's head instead (NeurIPS 2022, https://github.com/mingzeG/DropCov: no root, 128-d reduction,
8,256 → 4,096 → ...).
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs
from timm.models._features import feature_take_indices

from ..checkpoint import unwrap_state_dict
from ._cfg_utils import (
    ORIGIN_URL, PAPER_IDS, PAPER_NAME, build_cfgs, check_gcp_args, gcp_archs, head_cfg_fields, register_gcp_models)
from ._head import GCP_POOL, GcpHeadMixin

__all__ = ['AlexNetGcp']  # register_model adds each entrypoint

# (out channels, kernel, stride, padding, max-pool after) per conv layer
_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
    (256, 3, 1, 1, False))


class AlexNetGcp(GcpHeadMixin, nn.Module):
    """BN AlexNet with covariance pooling.

    Keys: ``features.<i>.*`` (conv/BN pairs at i = 0/1, 4/5, 8/9, 11/12, 14/15), ``global_pool.conv.weight``,
    ``global_pool.bn.*``, ``pre_logits.fc1.*``, ``pre_logits.fc2.*`` and the classifier ``fc``. ``num_features`` is
    256 (conv5), ``head_hidden_size`` 4096 (the input of ``fc``).
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = GCP_POOL,
            gcp_method: str = 'pade', gcp_dim: Optional[int] = 256, gcp_kwargs: Optional[Dict[str, Any]] = None,
            mlp_dim: int = 4096,
            drop_rate: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            num_classes: classifier outputs, 0 for none (``forward`` returns the 4096-d pre-logits).
            in_chans: input image channels.
            global_pool: 'gcp', or '' (no pooling and no MLP: ``forward_head`` returns the conv5 map, or with
                ``num_classes`` > 0 the logits of every position).
            gcp_method, gcp_dim, gcp_kwargs: the covariance pooling (as ``ResNetGcp``; ``gcp_dim`` None/0: no 1×1).
            mlp_dim: width of the two hidden FC layers.
            drop_rate: dropout before each of the two hidden FC layers (0 in the paper).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_gcp_args(global_pool, gcp_method, gcp_dim, gcp_kwargs)
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.mlp_dim = mlp_dim
        self.grad_checkpointing = False

        layers: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        self._tap_ends: List[int] = []  # index in `features` after each tapped ReLU
        chs, reduction = in_chans, 1
        for out_chs, k, s, p, pool in _CONVS:
            layers += [nn.Conv2d(chs, out_chs, k, stride=s, padding=p, **dd), nn.BatchNorm2d(out_chs, **dd),
                nn.ReLU(inplace=True)]
            reduction *= s
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
            self._tap_ends.append(len(layers))
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                reduction *= 2
            chs = out_chs
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        self._init_gcp_head(chs, num_classes, global_pool, gcp_method, gcp_dim, gcp_kwargs, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming-normal (fan_out, relu) convolutions with zero bias; BN and Linear at PyTorch defaults."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def _build_pre_logits(self, in_features: int, pooled: bool, new_pool: bool, **dd: Any) -> int:
        """The two hidden FC layers, built with a new pooling and kept while it stays; none without pooling."""
        if not pooled:
            self.pre_logits = nn.Identity()
            return in_features
        if new_pool:
            self.pre_logits = nn.Sequential(OrderedDict([
                ('drop1', nn.Dropout(self.drop_rate)),
                ('fc1', nn.Linear(in_features, self.mlp_dim, **dd)),
                ('act1', nn.ReLU(inplace=True)),
                ('drop2', nn.Dropout(self.drop_rate)),
                ('fc2', nn.Linear(self.mlp_dim, self.mlp_dim, **dd)),
                ('act2', nn.ReLU(inplace=True)),
            ]))
        return self.mlp_dim

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Stem (conv1 with its BN), one group per further conv layer (conv with its BN), then the GCP head (pooling,
        MLP, classifier) as the last group. ``coarse`` changes nothing: there are no stages above the layers."""
        layers = []
        for i, (start, end) in enumerate(zip(self._tap_ends[:-1], self._tap_ends[1:]), start=1):
            # a conv layer is features[start:end]; index by position so its conv and BN share one group
            layers.append((rf'^features\.(?:{"|".join(map(str, range(start, end)))})\.', (i,)))
        return dict(stem=r'^features\.[0-2]\.', blocks=layers, head=r'^global_pool|^pre_logits|^fc')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """No parameter is exempt by name; timm's optimizer factory already exempts 1-d params (BN, biases)."""
        return set()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The ReLU outputs of the five conv layers (``feature_info`` order) and the final map.

        Args:
            indices: last n taps if int, all if None, these taps if a list.
            norm: unused (no final norm layer).
            stop_early: stop after the last requested tap.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._tap_ends), indices)
        ends = self._tap_ends[:max_index + 1] if stop_early else self._tap_ends
        intermediates = []
        start = 0
        for i, end in enumerate(ends):
            x = self._run_layer(x, start, end)
            start = end
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last tap in ``indices``; drops the head when asked or when layers go."""
        take_indices, max_index = feature_take_indices(len(self._tap_ends), indices)
        prune_end = max_index < len(self._tap_ends) - 1
        self.features = self.features[:self._tap_ends[max_index]]
        self._tap_ends = self._tap_ends[:max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def _run_layer(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # Checkpoint whole conv layers ([max-pool] conv → BN → ReLU): a segment must not begin with the in-place
        # ReLU, which would overwrite the input that checkpointing saved for the recomputation.
        layer = self.features[start:end]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, x)
        return layer(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            start = 0
            for end in self._tap_ends:
                x = self._run_layer(x, start, end)
                start = end
            return x
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Remove checkpoint wrappers (``state_dict``/``model`` entries, ``module.`` prefixes); keys are ours already."""
    return unwrap_state_dict(state_dict)


def _create_alexnet_gcp(variant: str, pretrained: bool = False, **kwargs: Any) -> AlexNetGcp:
    return build_model_with_cfg(
        AlexNetGcp, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True), **kwargs)


_ARCH_FAMILY = gcp_archs(['alexnet_gcp'])


def _cfg(arch: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (13, 13),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.0', 'classifier': 'fc', 'license': 'apache-2.0', 'paper_ids': PAPER_IDS,
        'paper_name': PAPER_NAME, 'origin_url': ORIGIN_URL,
        **(head_cfg_fields(arch) if arch else {}), **kwargs,
    }


default_cfgs = generate_default_cfgs(build_cfgs(_ARCH_FAMILY, _ARCH_FAMILY, _cfg))
register_gcp_models(__name__, {'alexnet_gcp': ({}, 'BN AlexNet')}, _create_alexnet_gcp)
