"""Global covariance pooling heads on any timm backbone: ConvNeXt, EfficientNet, RegNet, ViT, DeiT, Swin, and a
generic path for every other timm model.

Papers:
* `Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?` (ICCV 2021)
  - https://arxiv.org/abs/2105.02498
* `So-ViT: Mind Visual Tokens for Vision Transformer` (the class token's classifier beside the GCP one)
  - https://arxiv.org/abs/2104.10935

``GcpNet`` holds a timm model as ``backbone`` (built by timm with its classifier and its global pooling removed) and
the GCP head of every timm-gcp model (``global_pool`` = ``CovPool``, ``fc``). The head takes the backbone's features
where the backbone's own pooling would take them (``backbone.forward_head(x, pre_logits=True)`` with pooling off):

* NCHW maps (ConvNeXt, EfficientNet, RegNet, MobileNet, ...), NHWC maps (Swin) and NLC token sequences (ViT, DeiT,
  EVA, MLP-Mixer, ...); the layout is read from what the backbone returns (a meta-device forward at construction).
* Prefix tokens (class, register, distillation) are not samples of the covariance: it is formed over the patch
  tokens, as So-ViT and SoT do. ``gcp_cls_token=True`` adds the class token's own classifier and sums the logits
  (So-ViT): the class token is put in front of the pooled vector and ``fc`` classifies both.
* Whatever the backbone's head applies before its pooling stays, per position or token, with its pretrained weights:
  ConvNeXt's final LayerNorm (``head.norm``, ConvNeXt's "head norm first" layout), ViT's ``fc_norm`` where the model
  has one (``norm`` otherwise ends ``forward_features``), MobileNetV3's ``conv_head``. It is the trained end of the
  representation, and a per-position norm or 1×1 conv keeps every sample of the covariance separate.

Heads other than the matrix root: ``<backbone>_gcp_dropcov`` (DropCov, NeurIPS 2022) for every family below, and
``<backbone>_gcp_sot`` (SoT, arXiv:2104.10935: multi-head token cross-covariance, its logits summed with the class
token's) for ViT-S, DeiT-S, Swin-T and the generic path.

Named models ``<backbone>_gcp_<method>`` exist for the backbones below, with backbone-pretrained tags from the zoo
registry; ``generic_gcp_<method>`` takes any timm model as ``backbone=`` (what ``timm_gcp.create_model`` builds for
``<any timm model>_gcp_<method>``, and what timm's own train.py builds with
``--model generic_gcp_pade --model-kwargs backbone=NAME``).
"""
import itertools
import logging
import re
from collections.abc import Iterable as IterableABC
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.models import (
    PretrainedCfg, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, resolve_pretrained_cfg,
    split_model_name_tag)
from timm.models._features import feature_take_indices

from .._compat import get_model_input_config
from ..checkpoint import unwrap_state_dict
from ..layers import MatrixSqrt
from ._cfg_utils import (
    ORIGIN_URL, PAPER_IDS, PAPER_NAME, build_cfgs, check_gcp_args, gcp_archs, head_cfg_fields, register_gcp_models,
    timm_weight_fields, with_fresh_head)
from ._head import GCP_POOL, GCP_POOLS, GcpHeadMixin, head_kind, note_fresh_head
from ._zoo_cfgs import BACKBONE_TAGS
from .naming import parse_gcp_name


__all__ = ['GcpNet', 'GENERIC_FAMILY', 'DEFAULT_BACKBONE', 'checkpoint_filter_fn', 'create_model',
    'resolve_model_name', 'fixed_input_size', 'head_input_layout']  # register_model adds each entrypoint

_logger = logging.getLogger(__name__)

GENERIC_FAMILY = 'generic_gcp'  # generic_gcp_<method>: any timm model as backbone=...
DEFAULT_BACKBONE = 'resnet50'  # of generic_gcp_<method> without a backbone argument
_BACKBONE_PREFIX = 'backbone.'
# pretrained_cfg_overlay entries that point at weights: such weights are loaded into the GCP model as a whole
_WEIGHT_SOURCES = ('file', 'url', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source')


class _LayoutError(ValueError):
    """The backbone's head input is neither a feature map nor a token sequence."""


class _HeadInput(nn.Module):
    """What the backbone hands to its pooling: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


def _input_size(backbone: nn.Module, in_chans: int) -> Tuple[int, int, int]:
    if get_model_input_config is not None:
        size = get_model_input_config(backbone)['input_size']
    else:
        size = (backbone.pretrained_cfg or {}).get('input_size') or (3, 224, 224)
        img_size = getattr(getattr(backbone, 'patch_embed', None), 'img_size', None)
        if img_size:
            size = (size[0], *img_size)
    return (in_chans, *size[-2:])


def _probe_head_input(backbone: nn.Module, in_chans: int) -> torch.Size:
    """The shape of what ``backbone`` hands to its pooling, from a forward on the meta device (no compute, the
    backbone's own parameters untouched)."""
    tensors = {f'backbone.{n}': torch.empty_like(t, device='meta')
        for n, t in itertools.chain(backbone.named_parameters(), backbone.named_buffers())}
    ref = next(iter(tensors.values()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.empty(1, *_input_size(backbone, in_chans), device='meta', dtype=dtype)
    with torch.no_grad():
        out = torch.func.functional_call(_HeadInput(backbone), tensors, (x,))
    if not isinstance(out, torch.Tensor):
        raise _LayoutError(f'the backbone hands its pooling a {type(out).__name__}, not a tensor')
    return out.shape


def head_input_layout(backbone: nn.Module, name: str, in_chans: int = 3) -> Tuple[str, int, int]:
    """``(input_fmt, channels, num_prefix_tokens)`` of the features ``backbone`` hands to its pooling.

    Read from a meta-device forward; where that forward cannot run (a model whose code needs real values), from the
    timm attributes ``output_fmt``, ``num_prefix_tokens``, ``head_hidden_size``/``num_features``.

    Raises:
        ValueError: the features are neither a feature map nor a token sequence (the message names the shape and
            the layout it got).
    """
    try:
        shape = _probe_head_input(backbone, in_chans)
    except _LayoutError as e:
        raise _LayoutError(f'{name}: {e}') from None
    except Exception as e:  # noqa: BLE001 - any model code may refuse meta tensors; the attributes still tell
        _logger.info(f'{name}: layout of the head input from attributes (meta-device forward failed: {e})')
        if hasattr(backbone, 'num_prefix_tokens'):
            fmt = 'NLC'
        else:
            fmt = 'NHWC' if getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC' else 'NCHW'
        chs = getattr(backbone, 'head_hidden_size', None) or backbone.num_features
        return fmt, chs, getattr(backbone, 'num_prefix_tokens', 0) if fmt == 'NLC' else 0
    if len(shape) == 4:
        fmt = 'NHWC' if str(getattr(backbone, 'output_fmt', 'NCHW')) == 'NHWC' else 'NCHW'
        if (shape[2] * shape[3] if fmt == 'NCHW' else shape[1] * shape[2]) < 2:
            _logger.warning(f'{name}: its head input at the default input size is a single position {tuple(shape)}; '
                'a covariance needs several (use a larger input)')
        return fmt, shape[-1] if fmt == 'NHWC' else shape[1], 0
    if len(shape) == 3:
        prefix = int(getattr(backbone, 'num_prefix_tokens', 0) or 0)
        if shape[1] <= prefix:
            raise _LayoutError(f'{name}: its head input is a token sequence {tuple(shape)} (NLC) with no patch token '
                f'after its {prefix} prefix tokens')
        if shape[1] - prefix < 2:
            _logger.warning(f'{name}: its head input at the default input size has a single patch token '
                f'{tuple(shape)}; a covariance needs several (use a larger input or a smaller patch size)')
        return 'NLC', shape[-1], prefix
    what = 'a pooled vector' if len(shape) == 2 else f'a {len(shape)}-d tensor'
    raise _LayoutError(
        f'{name}: a GCP head needs a feature map (NCHW or NHWC) or a token sequence (NLC) where the backbone pools, '
        f'but with its pooling removed it gives {what} of shape {tuple(shape)}')


def _use_class_token(
        backbone: nn.Module,
        name: str,
        gcp_method: str,
        requested: bool,
        input_fmt: str,
        num_prefix: int,
) -> bool:
    """Whether the head puts the class token in front of its pooled vector: when asked (``gcp_cls_token``), and
    always for a head kind that sums the class token's logits with its own (SoT) where the backbone has one.

    Raises:
        ValueError: asked for on a backbone without a class token.
    """
    has_cls = input_fmt == 'NLC' and num_prefix > 0 and getattr(backbone, 'has_class_token', True)
    if requested and not has_cls:
        raise ValueError(f'gcp_cls_token=True needs a backbone with a class token; {name} gives {input_fmt} features '
            f'with {num_prefix} prefix tokens')
    return bool(requested or (head_kind(gcp_method).class_token and has_cls))


class _BackboneGroups:
    """``group_matcher`` of ``GcpNet``: backbone parameters grouped by the backbone's own matcher, the GCP head (and
    any backbone parameter that matcher leaves out) in the last group, as timm groups unmatched layers."""

    def __init__(self, matcher: Union[Dict[str, Any], Callable[[str], Any], None]) -> None:
        self.fn = matcher if callable(matcher) else None
        self.compiled = []
        for ordinal, spec in enumerate((matcher or {}).items() if not callable(matcher) else ()):
            _, mspec = spec
            if mspec is None:
                continue
            if isinstance(mspec, (tuple, list)):
                self.compiled += [(re.compile(s[0]), (ordinal,), s[1]) for s in mspec]
            else:
                self.compiled.append((re.compile(mspec), (ordinal,), None))

    def __call__(self, name: str) -> Tuple[float, ...]:
        if not name.startswith(_BACKBONE_PREFIX):
            return (float('inf'),)
        name = name[len(_BACKBONE_PREFIX):]
        if self.fn is not None:
            ordinal = self.fn(name)
            return tuple(ordinal) if isinstance(ordinal, IterableABC) else (ordinal,)
        for regex, prefix, suffix in self.compiled:
            m = regex.match(name)
            if m:
                return tuple(map(float, itertools.chain.from_iterable(filter(None, (prefix, m.groups(), suffix)))))
        return (float('inf'),) if self.compiled else (0.,)


class GcpNet(GcpHeadMixin, nn.Module):
    """A timm backbone with a global covariance pooling head.

    State-dict keys: the backbone's own keys under ``backbone.`` (its classifier removed), then ``global_pool.conv``,
    ``global_pool.bn`` (the reduction) and ``fc``. ``num_features`` is the channel count of ``forward_features``
    (the backbone's), ``head_hidden_size`` the pooled length (d(d+1)/2, plus C with ``gcp_cls_token``); the timm
    API (``features_only``, ``forward_intermediates``, ``group_matcher``, gradient checkpointing, ...) is the
    backbone's, with the GCP head as the last layer group.
    """

    def __init__(
            self,
            backbone: str = DEFAULT_BACKBONE,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = GCP_POOL,
            gcp_method: str = 'pade', gcp_dim: Optional[int] = 256, gcp_kwargs: Optional[Dict[str, Any]] = None,
            gcp_cls_token: bool = False,
            drop_rate: float = 0.,
            pretrained_backbone: bool = False,
            backbone_cache_dir: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **backbone_kwargs: Any,
    ) -> None:
        """
        Args:
            backbone: a timm model name, optionally with a pretrained tag (``convnext_tiny.fb_in1k``).
            num_classes: classifier outputs, 0 for no classifier (``forward`` returns the pooled vector).
            in_chans: input image channels.
            global_pool: 'gcp' (covariance pooling) or '' (no pooling: ``forward_head`` returns what the backbone
                would pool, or with ``num_classes`` > 0 the logits of every position/token).
            gcp_method: matrix square-root method, a key of ``timm_gcp.METHODS``; or a head of its own: ``'dropcov'``
                (DropCov: no root, adaptive channel dropout in training) or ``'sot'`` (SoT's multi-head token
                cross-covariance; h, r and dropout from SoT's preset for the backbone width unless ``gcp_kwargs``
                gives ``num_heads``/``head_dim``/``drop``).
            gcp_dim: channels after the reduction (256; DropCov's entrypoints 128); None or 0 skips the reduction.
                SoT has no reduction and ignores it.
            gcp_kwargs: method or head options, e.g. ``{'iters': 3}``, ``{'norm': 'svd'}`` for SoT.
            gcp_cls_token: token backbones with a class token: add the class token's classifier to the GCP
                classifier (So-ViT); the pooled vector starts with the class token. Always on for SoT where the
                backbone has a class token (SoT sums the two logits); SoT on Swin uses the visual logits alone.
            drop_rate: dropout before the classifier.
            pretrained_backbone: load the backbone's timm weights (of the tag in ``backbone``) through timm's own
                loader; the GCP head stays freshly initialised. ``create_model(pretrained=True)`` with a
                backbone-only tag sets it.
            backbone_cache_dir: cache directory for those weights.
            **backbone_kwargs: arguments of the backbone (``drop_path_rate``, ``img_size``, ``depths``, ...); unknown
                ones raise ``TypeError`` from the backbone.

        Raises:
            ValueError: bad GCP arguments, a backbone that is not a timm model or already has a GCP head, or one
                whose features are neither a feature map nor a token sequence.
        """
        super().__init__()
        check_gcp_args(global_pool, gcp_method, gcp_dim, gcp_kwargs)
        arch, tag = split_model_name_tag(backbone)
        if not timm.is_model(arch):
            raise ValueError(f'backbone {backbone!r} is not a timm model (see timm.list_models())')
        if parse_gcp_name(arch) is not None:
            raise ValueError(f'backbone {backbone!r} is a GCP model already; give its backbone ({arch})')
        self.backbone = timm.create_model(
            backbone if pretrained_backbone else arch, pretrained=pretrained_backbone, num_classes=0,
            in_chans=in_chans, cache_dir=backbone_cache_dir, device=device, dtype=dtype, **backbone_kwargs)
        if any(isinstance(m, (MatrixSqrt, *GCP_POOLS)) for m in self.backbone.modules()):
            raise ValueError(f'backbone {backbone!r} has a GCP head already')
        # timm's factory records its arguments on the backbone; the model's own are what an export must rebuild
        self.backbone.__dict__.pop('_model_args', None)
        try:
            self.backbone.reset_classifier(0, '')
        except (AssertionError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f'backbone {arch!r} cannot remove its global pooling (reset_classifier(0, \'\') '
                f'failed: {e}); a GCP head takes the features where that pooling would') from e
        self.backbone_name = arch
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.backbone.num_features
        output_fmt = getattr(self.backbone, 'output_fmt', None)
        if output_fmt is not None:
            self.output_fmt = str(output_fmt)
        self.feature_info = self._prefixed_feature_info()
        input_fmt, chs, num_prefix = head_input_layout(self.backbone, arch, in_chans)
        gcp_cls_token = _use_class_token(self.backbone, arch, gcp_method, gcp_cls_token, input_fmt, num_prefix)
        self.head_drop = nn.Dropout(drop_rate)
        self._init_gcp_head(
            chs, num_classes, global_pool, gcp_method, gcp_dim, gcp_kwargs, input_fmt=input_fmt,
            num_prefix_tokens=num_prefix, cls_token=gcp_cls_token, device=device, dtype=dtype)

    def _prefixed_feature_info(self) -> List[Dict[str, Any]]:
        return [dict(info, module=_BACKBONE_PREFIX + info['module']) if info.get('module') else dict(info)
            for info in getattr(self.backbone, 'feature_info', None) or []]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """The backbone's layer groups (its stem first), then the GCP head (``global_pool``, ``fc``) last."""
        inner = self.backbone.group_matcher(coarse=coarse) if hasattr(self.backbone, 'group_matcher') else None
        return _BackboneGroups(inner)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The backbone's exemptions (e.g. position embeddings, class token); none in the GCP head by name."""
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, 'no_weight_decay') else set()
        return {_BACKBONE_PREFIX + n for n in inner}

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            **kwargs: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's ``forward_intermediates`` (its ``feature_info`` taps and its final features).

        Args:
            x: input images.
            indices: taps to return (last n if int, all if None), as the backbone counts them.
            kwargs: the backbone's own further arguments, with its defaults (``norm``, ``stop_early``,
                ``output_fmt``, ``intermediates_only``, and any it adds, e.g. a ViT's ``return_prefix_tokens``).

        Raises:
            NotImplementedError: the backbone has no ``forward_intermediates`` (use ``feature_cls='hook'`` or
                ``'fx'`` for ``features_only``).
        """
        if not hasattr(self.backbone, 'forward_intermediates'):
            raise NotImplementedError(f'backbone {self.backbone_name} has no forward_intermediates; build '
                f"features_only=True models of it with feature_cls='hook' or 'fx'")
        return self.backbone.forward_intermediates(x, indices=indices, **kwargs)

    @torch.jit.ignore
    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Prune the backbone after the last tap in ``indices`` (its own method); the GCP head goes with
        ``prune_head`` or when the backbone's final features change."""
        if hasattr(self.backbone, 'prune_intermediate_layers'):
            take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        else:
            take, _ = feature_take_indices(len(self.feature_info), indices)
        changed = self.backbone.num_features != self.num_features
        self.num_features = self.backbone.num_features
        self.feature_info = self._prefixed_feature_info()
        if prune_head or changed:
            self.reset_classifier(0, '')
            try:  # what a GCP head rebuilt by reset_classifier(n, 'gcp') would take
                fmt, chs, prefix = head_input_layout(self.backbone, self.backbone_name, self.in_chans)
                self._gcp_layout.update(input_fmt=fmt, num_prefix_tokens=prefix)
            except ValueError:
                chs = self.num_features
            self._gcp_in_chs = self.head_hidden_size = chs
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(self.backbone.forward_head(x, pre_logits=True)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: GcpNet) -> Dict[str, torch.Tensor]:
    """Map a checkpoint onto a ``GcpNet``'s keys.

    * a GCP checkpoint of this layout (``backbone.*`` keys) passes through unchanged;
    * a plain checkpoint of the backbone (its own keys, e.g. ``--pretrained-path`` with a timm ConvNeXt's weights)
      loads into ``backbone.*``: keys the backbone without its classifier does not have (the classifier) are
      dropped, the GCP head keeps its fresh initialisation and a log line says so.

    Wrappers (``state_dict``/``model`` entries, ``module.`` prefixes) are removed.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(_BACKBONE_PREFIX) for k in state_dict):
        return state_dict
    own = model.backbone.state_dict()
    backbone = {_BACKBONE_PREFIX + k: v for k, v in state_dict.items() if k in own}
    dropped = sorted(k for k in state_dict if k not in own)
    if dropped:
        _logger.info(f'{model.backbone_name} checkpoint: not loaded (not in the backbone without its classifier): '
            f'{", ".join(dropped[:8])}{" ..." if len(dropped) > 8 else ""}')
    return with_fresh_head(backbone, model, f'a plain {model.backbone_name} checkpoint')


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained cfgs: from the backbone's timm cfg

# the fields of a backbone's cfg that describe its architecture and input (kept in a GCP cfg without weights)
_ARCH_FIELDS = ('input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean',
    'std', 'pool_size')


def gcp_cfg_from_backbone(backbone_cfg: PretrainedCfg, weights: bool, **kwargs: Any) -> Dict[str, Any]:
    """A GCP model's pretrained cfg made from its backbone's: input and normalisation as the backbone's, stem
    (``first_conv``) under ``backbone.``, classifier ``fc``; with ``weights`` the backbone's weight source, license,
    test sizes and paper (:func:`timm_weight_fields`; the GCP head is fresh: no GCP weights are claimed)."""
    src = backbone_cfg.to_dict()
    first_conv = src.get('first_conv') or ()
    cfg = {k: src[k] for k in _ARCH_FIELDS if src.get(k) is not None}
    cfg.update(
        num_classes=1000, license='apache-2.0', classifier='fc',
        first_conv=(_BACKBONE_PREFIX + first_conv if isinstance(first_conv, str)
            else tuple(_BACKBONE_PREFIX + c for c in first_conv)),
        paper_ids=PAPER_IDS, paper_name=PAPER_NAME, origin_url=ORIGIN_URL)
    if weights:
        cfg.update(timm_weight_fields(backbone_cfg))
        if src.get('paper_ids'):
            cfg['paper_ids'] = f'{PAPER_IDS}, {src["paper_ids"]}'
        cfg['notes'] = (f'Backbone-only: timm {backbone_cfg.architecture}'
            f'{"." + backbone_cfg.tag if backbone_cfg.tag else ""} weights; the GCP head (global_pool.conv, '
            f'global_pool.bn, fc) is freshly initialised, so fine-tune before use.')
    cfg.update(kwargs)
    return cfg


def _backbone_cfg(arch: str, tag: Optional[str], variant: str) -> PretrainedCfg:
    name = f'{arch}.{tag}' if tag else arch
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm: an invalid tag of a known architecture
        cfg = None
    if cfg is None and not tag:
        return PretrainedCfg(architecture=arch)  # a timm model registered without any cfg
    if cfg is None:
        tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{arch}.*')]
        raise ValueError(f'{variant}: the backbone {arch} has no pretrained tag {tag!r} in timm (its tags: '
            f'{", ".join(tags) or "none"})')
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Model creation

def _create_gcp_net(
        variant: str,
        pretrained: bool = False,
        backbone: Optional[str] = None,
        pretrained_cfg: Optional[Union[str, Dict[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        **kwargs: Any,
) -> GcpNet:
    """Build ``variant`` (``<family>_<method>``) with ``build_model_with_cfg``.

    Where the weights come from:
    * a backbone-only tag (the zoo's tags of the named families; any timm tag of the backbone for
      ``generic_gcp_<method>``) without a weight source in ``pretrained_cfg_overlay``: the backbone is built by timm
      with ``pretrained=True`` (timm's own loader and checkpoint filter: input-channel adaptation, position-embedding
      resampling for another ``img_size``), the GCP head stays fresh;
    * anything else (full GCP weights, a hub config, a file given in the overlay): the GCP model's checkpoint, through
      ``checkpoint_filter_fn``.
    """
    family = parse_gcp_name(variant).family
    fixed = _FAMILIES[family][0].get('backbone')
    if fixed is not None:
        if backbone is not None:
            raise TypeError(f"{variant} is built on {fixed}; the backbone argument belongs to "
                f"{GENERIC_FAMILY}_<method> models")
        backbone = fixed
    arch, bb_tag = split_model_name_tag(backbone or DEFAULT_BACKBONE)
    if not timm.is_model(arch):
        raise ValueError(f'{variant}: backbone {backbone!r} is not a timm model (see timm.list_models())')
    overlay = dict(pretrained_cfg_overlay or {})
    full_weights = isinstance(pretrained_cfg, (dict, PretrainedCfg)) or any(overlay.get(k) for k in _WEIGHT_SOURCES)
    if fixed is not None:
        tag = resolve_pretrained_cfg(variant, pretrained_cfg, overlay).tag if not full_weights else None
        source = BACKBONE_TAGS.get(family, {}).get(tag)  # the zoo tag's timm model, '<arch>.<timm tag>'
        backbone_only = source is not None
        if backbone_only:
            tag = split_model_name_tag(source['timm_model'])[1]
    else:
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else bb_tag
        if not full_weights:
            pretrained_cfg = gcp_cfg_from_backbone(
                _backbone_cfg(arch, tag, variant), weights=True, architecture=variant, tag=tag or None)
        backbone_only = not full_weights
    backbone_only = pretrained and backbone_only and not full_weights
    if backbone_only:
        kwargs.update(pretrained_backbone=True, backbone_cache_dir=cache_dir)
    model = build_model_with_cfg(
        GcpNet, variant, pretrained and not backbone_only, pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay or None, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=None), cache_dir=cache_dir,
        backbone=f'{arch}.{tag}' if backbone_only and tag else arch, **kwargs)
    head_fresh = model.__dict__.pop('_gcp_head_fresh', False)  # set by checkpoint_filter_fn
    if backbone_only or head_fresh:
        if backbone_only:
            _logger.info(f'{variant}: backbone weights from timm {arch}{"." + tag if tag else ""}; GCP head freshly '
                f'initialised')
        note_fresh_head(model, variant, kwargs.get('features_only', False))
    return model


# family → (GcpNet args, words naming the backbone). ``backbone`` is the timm model each family is built on.
_FAMILIES: Dict[str, Tuple[Dict[str, Any], str]] = {
    'convnext_tiny_gcp': (dict(backbone='convnext_tiny'), 'ConvNeXt-T'),
    'convnext_small_gcp': (dict(backbone='convnext_small'), 'ConvNeXt-S'),
    'efficientnet_b0_gcp': (dict(backbone='efficientnet_b0'), 'EfficientNet-B0'),
    'regnety_032_gcp': (dict(backbone='regnety_032'), 'RegNetY-3.2GF'),
    'vit_small_patch16_224_gcp': (dict(backbone='vit_small_patch16_224'), 'ViT-S/16'),
    'deit_small_patch16_224_gcp': (dict(backbone='deit_small_patch16_224'), 'DeiT-S/16'),
    'swin_tiny_patch4_window7_224_gcp': (dict(backbone='swin_tiny_patch4_window7_224'), 'Swin-T'),
    GENERIC_FAMILY: ({}, f'Any timm model as backbone=... (default {DEFAULT_BACKBONE})'),
}
# the families whose backbone hands its head tokens: they also get the token-only heads (<family>_gcp_sot)
_TOKEN_FAMILIES = ('vit_small_patch16_224_gcp', 'deit_small_patch16_224_gcp', 'swin_tiny_patch4_window7_224_gcp',
    GENERIC_FAMILY)
_ARCH_FAMILY = gcp_archs(_FAMILIES, _TOKEN_FAMILIES)


def _cfg(arch: str = '', **kwargs: Any) -> Dict[str, Any]:
    backbone = _FAMILIES[_ARCH_FAMILY[arch]][0].get('backbone', DEFAULT_BACKBONE)
    return gcp_cfg_from_backbone(get_pretrained_cfg(backbone), weights=False, **{**head_cfg_fields(arch), **kwargs})


default_cfgs = generate_default_cfgs(build_cfgs(_ARCH_FAMILY, _ARCH_FAMILY, _cfg))
# the entrypoints pass no backbone: _create_gcp_net takes it from _FAMILIES (named) or the caller (generic)
register_gcp_models(
    __name__, {f: ({}, what) for f, (_, what) in _FAMILIES.items()}, _create_gcp_net, token_families=_TOKEN_FAMILIES)


# ---------------------------------------------------------------------------------------------------------------------
# Any timm model by name

def resolve_model_name(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[str, Dict[str, Any]]:
    """The registered timm name and the kwargs that build ``model_name``.

    A registered name (``resnet50_gcp_pade``, ``convnext_tiny_gcp_isqrt.fb_in1k``), a hub/directory source
    (``hf-hub:…``, ``local-dir:…``) or any non-GCP name is returned as it is. ``<timm model>_gcp_<method>[.<tag>]``
    becomes ``generic_gcp_<method>[.<tag>]`` with ``backbone='<timm model>'`` (the tag is the backbone's).

    Raises:
        ValueError: a GCP name whose method is unknown, or whose backbone is not a timm model; a ``backbone`` in
            ``model_kwargs`` that contradicts the name.
    """
    kwargs = dict(model_kwargs or {})
    parsed = parse_gcp_name(model_name)
    if parsed is None or timm.is_model(parsed.arch):
        return model_name, kwargs
    if not timm.is_model(parsed.backbone):
        raise ValueError(f'{model_name!r} is not a registered GCP model and {parsed.backbone!r} is not a timm model '
            f'(<timm model>_gcp_<method> builds a GCP head on any model of timm.list_models())')
    if kwargs.get('backbone', parsed.backbone) != parsed.backbone:
        raise ValueError(f'{model_name!r} names the backbone {parsed.backbone!r}, but backbone={kwargs["backbone"]!r} '
            f'was given too')
    kwargs['backbone'] = parsed.backbone
    generic = f'{GENERIC_FAMILY}_{parsed.method}'
    return (f'{generic}.{parsed.tag}' if parsed.tag else generic), kwargs


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that also builds ``<any timm model>_gcp_<method>[.<tag>]``.

    ``timm_gcp.create_model('mobilenetv3_large_100_gcp_pade', pretrained=True, num_classes=200)`` is
    ``timm.create_model('generic_gcp_pade', backbone='mobilenetv3_large_100', ...)``: the backbone's timm ImageNet
    weights (its default tag, or the one after the name) with a fresh GCP head. Registered names and ``hf-hub:``/
    ``local-dir:`` sources go to ``timm.create_model`` unchanged; kwargs are those of ``timm.create_model`` and of the
    model (``gcp_dim``, ``gcp_kwargs``, ``num_classes``, the backbone's own, ...).
    """
    name, kwargs = resolve_model_name(model_name, kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def fixed_input_size(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None) -> bool:
    """Whether the model ``model_name`` builds takes images of one size only (a ViT or Swin without
    ``dynamic_img_size``), so a script training or evaluating it at another size must pass ``img_size``: its
    pretrained cfg's ``fixed_input_size`` (for ``<any timm model>_gcp_<method>`` and ``generic_gcp_<method>``, the
    backbone's). Names timm does not know give False."""
    name, kwargs = resolve_model_name(model_name, model_kwargs)
    arch, _ = split_model_name_tag(name)
    parsed = parse_gcp_name(arch)
    if parsed is not None and parsed.family == GENERIC_FAMILY:
        arch, _ = split_model_name_tag(kwargs.get('backbone') or DEFAULT_BACKBONE)
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:
        return False
    return bool(cfg is not None and cfg.fixed_input_size and not kwargs.get('dynamic_img_size'))
