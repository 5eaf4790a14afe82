"""The head every timm-gcp model shares: the registry of head kinds, and how a head is built, reset and which
method it runs.

A GCP model has two head attributes, whatever its backbone: ``global_pool`` (a second-order pooling module, or no
pooling after ``global_pool=''``) and the classifier ``fc``; a model may put layers between them (AlexNet's two hidden
FC layers, ``pre_logits``). ``GcpHeadMixin`` builds and resets them for ResNet, AlexNet and the generic backbone
wrapper alike, so ``reset_classifier``, ``global_pool=''`` and the hybrid method switch behave the same on every model.

Which pooling a model gets is named by the token after ``_gcp_`` in its name (its ``gcp_method`` argument), looked up
in ``HEAD_KINDS``: every matrix square-root method of ``timm_gcp.METHODS`` gives the covariance-root head
(``CovPool``), ``dropcov`` DropCov's head (``DropCovPool``), ``sot`` SoT's token head (``SoTPool``). Adding a head is
one entry there.
"""
import dataclasses
import logging
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, get_device_dtype

from ..functional import METHODS, portable_options, resolve_method
from ..layers import CovPool, DropCovPool, SoTPool
from ..layers.dropcov import check_dropcov_options
from ..layers.sot import check_sot_options

__all__ = ['GCP_POOL', 'HeadKind', 'HEAD_KINDS', 'GCP_POOLS', 'head_kind', 'head_names', 'pool_method', 'GcpHeadMixin',
    'create_gcp_classifier', 'note_fresh_head']

_logger = logging.getLogger(__name__)

GCP_POOL = CovPool.pool_type  # the models' global_pool name for second-order pooling (every head kind)
_METHOD_ARGS = ('gcp_method', 'gcp_kwargs')


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """One kind of second-order head. Every pooling module but ``CovPool`` has ``head_name`` (its model-name token,
    the registry key) and ``get_method()``; ``timm_gcp.set_gcp_method`` refuses models holding such a module (no root
    to switch).

    Attributes:
        name: registry key; for the covariance-root head the model-name tokens are the ``METHODS`` keys instead.
        pool_cls: the pooling module it builds (``global_pool``).
        build: ``(in_chs, gcp_dim, method, options, input_fmt, num_prefix_tokens, cls_token, device, dtype)`` → pool.
        check: ``(method, options)`` → None; raises ``ValueError``/``TypeError`` on bad options.
        tokens_only: registered for token backbones only (``<token family>_gcp_<name>``).
        class_token: uses the class token's logits beside its own where the backbone has a class token.
        model_defaults: defaults of the model arguments for this head (a user's arguments win).
        paper: what the head does and where it comes from, for entrypoint docstrings.
        paper_ids, paper_name, origin_url: its paper and reference code, for the pretrained cfgs ('' for the
            covariance-root head, whose cfgs cite the GCP paper).
    """
    name: str
    pool_cls: type
    build: Callable[..., nn.Module]
    check: Callable[[str, Optional[Mapping[str, Any]]], None]
    tokens_only: bool = False
    class_token: bool = False
    model_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper: str = ''
    paper_ids: str = ''
    paper_name: str = ''
    origin_url: str = ''


def _build_root(
        in_chs: int,
        gcp_dim: Optional[int],
        method: str,
        options: Optional[Dict[str, Any]],
        **kwargs: Any,
) -> nn.Module:
    return CovPool(in_chs, gcp_dim, method, options, **kwargs)


def _build_dropcov(
        in_chs: int,
        gcp_dim: Optional[int],
        method: str,
        options: Optional[Dict[str, Any]],
        **kwargs: Any,
) -> nn.Module:
    return DropCovPool(in_chs, gcp_dim, **kwargs, **(options or {}))


def _build_sot(
        in_chs: int,
        gcp_dim: Optional[int],
        method: str,
        options: Optional[Dict[str, Any]],
        **kwargs: Any,
) -> nn.Module:
    return SoTPool(in_chs, **kwargs, **(options or {}))


HEAD_KINDS: Dict[str, HeadKind] = {
    'root': HeadKind(
        'root', CovPool, _build_root, lambda method, options: resolve_method(method, **(options or {})),
        paper='covariance pooling with a matrix square root'),
    DropCovPool.head_name: HeadKind(
        DropCovPool.head_name, DropCovPool, _build_dropcov, lambda method, options: check_dropcov_options(options),
        model_defaults={'gcp_dim': 128},
        paper='no matrix root: adaptive channel dropout in training (DropCov, NeurIPS 2022)',
        paper_ids='NeurIPS 2022 (DropCov)',
        paper_name='DropCov: A Simple yet Effective Method for Improving Deep Architectures',
        origin_url='https://github.com/mingzeG/DropCov'),
    SoTPool.head_name: HeadKind(
        SoTPool.head_name, SoTPool, _build_sot, lambda method, options: check_sot_options(options),
        tokens_only=True, class_token=True,
        paper='multi-head token cross-covariance with svPN, summed with the class-token classifier (SoT)',
        paper_ids='arXiv:2104.10935', paper_name='SoT: Delving Deeper into Classification Head for Transformer',
        origin_url='https://github.com/jiangtaoxie/SoT'),
}
GCP_POOLS = tuple(kind.pool_cls for kind in HEAD_KINDS.values())  # every second-order pooling module


def head_names(tokens: bool = True) -> Tuple[str, ...]:
    """Every model-name token after ``_gcp_``: the ``METHODS`` keys, then the other heads (without the token-only
    heads when ``tokens`` is False)."""
    others = tuple(k for k, kind in HEAD_KINDS.items() if k != 'root' and (tokens or not kind.tokens_only))
    return (*METHODS, *others)


def head_kind(method: str) -> HeadKind:
    """The head kind a ``gcp_method`` (model-name token) builds.

    Raises:
        ValueError: neither a ``METHODS`` key nor a head name (the message lists both).
    """
    if method in METHODS:
        return HEAD_KINDS['root']
    if method in HEAD_KINDS and method != 'root':
        return HEAD_KINDS[method]
    raise ValueError(f'unknown matrix square-root method {method!r} (and not a head either); valid methods: '
        f'{", ".join(METHODS)}; heads without a root: {", ".join(head_names()[len(METHODS):])}')


def pool_method(pool: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """``(method, options)`` of a second-order pooling module (the root's method, or the head's name)."""
    if isinstance(pool, CovPool):
        return pool.sqrtm.get_method()
    return pool.get_method()


def create_gcp_classifier(
        in_features: int,
        num_classes: int,
        pooled: bool,
        input_fmt: str = 'NCHW',
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The classifier ``fc``: Linear on the pooled vector; without pooling a classifier of every position/token
    (a 1×1 conv on NCHW maps, a Linear on the channels of NHWC maps and token sequences, as timm's heads with
    ``global_pool=''`` classify every position); Identity for ``num_classes`` 0."""
    dd = {'device': device, 'dtype': dtype}
    if num_classes <= 0:
        return nn.Identity()
    if not pooled and input_fmt == 'NCHW':
        return nn.Conv2d(in_features, num_classes, kernel_size=1, bias=True, **dd)
    return nn.Linear(in_features, num_classes, **dd)


class GcpHeadMixin:
    """The GCP head of a timm model: ``global_pool`` (the pooling of its head kind, or none), an optional
    ``pre_logits`` and ``fc``.

    Mixed in before the model's ``nn.Module`` base. The model sets ``num_classes`` and calls ``_init_gcp_head`` once
    its backbone is built; ``_build_pre_logits`` is the hook for layers between pooling and classifier.

    The method the model runs has one source of truth, its pooling module: the ``MatrixSqrt`` of a ``CovPool``
    (switched by ``timm_gcp.set_gcp_method``), or the name and options of a DropCov/SoT head: ``gcp_method``/
    ``gcp_kwargs`` and the ``gcp_method`` timm exports in ``config.json`` (``_model_args``) read it. Only while
    pooling is removed (``global_pool=''``) does the model keep the last method in use, which a pooling rebuilt by
    ``reset_classifier(n, 'gcp')`` takes.
    """
    global_pool: nn.Module
    fc: nn.Module
    num_classes: int
    head_hidden_size: int

    def _init_gcp_head(
            self,
            in_chs: int,
            num_classes: int,
            global_pool: str,
            gcp_method: str,
            gcp_dim: Optional[int],
            gcp_kwargs: Optional[Dict[str, Any]],
            input_fmt: str = 'NCHW',
            num_prefix_tokens: int = 0,
            cls_token: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Build the head for a backbone whose features reach it as ``in_chs`` channels in layout ``input_fmt``.

        Args:
            in_chs: channels of the features the pooling takes.
            num_classes: classifier outputs (0: none).
            global_pool: 'gcp' or '' (no pooling).
            gcp_method, gcp_dim, gcp_kwargs: the second-order pooling: a ``METHODS`` key or a head name
                (``HEAD_KINDS``), the reduction width (None or 0: no reduction; unused by SoT) and the method's or
                head's options.
            input_fmt, num_prefix_tokens, cls_token: the layout of the features, as in ``CovPool``.
        """
        self.num_classes = num_classes
        self.gcp_dim = gcp_dim or None
        self._gcp_in_chs = in_chs
        self._gcp_layout = dict(input_fmt=input_fmt, num_prefix_tokens=num_prefix_tokens, cls_token=cls_token)
        self._gcp_memory: Tuple[str, Dict[str, Any]] = (gcp_method, dict(gcp_kwargs or {}))
        self.global_pool = nn.Identity()  # placeholder: _build_gcp_head sees no pooling yet and builds one
        self._build_gcp_head(num_classes, global_pool, device=device, dtype=dtype)

    def _build_gcp_head(
            self,
            num_classes: int,
            global_pool: str,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """(Re)build pooling, pre-logits and classifier; an existing pooling module is kept when pooling stays on.

        Raises:
            ValueError: ``global_pool`` is neither 'gcp' nor '' (checked before anything changes).
        """
        if global_pool not in (GCP_POOL, ''):
            raise ValueError(f"global_pool must be '{GCP_POOL}', '' or None (keep), got {global_pool!r}")
        dd = {'device': device, 'dtype': dtype}
        pooled = global_pool == GCP_POOL
        new_pool = pooled and not isinstance(self.global_pool, GCP_POOLS)
        if new_pool:
            method, options = self._gcp_memory
            self.global_pool = head_kind(method).build(
                self._gcp_in_chs, self.gcp_dim, method, options, **self._gcp_layout, **dd)
        elif not pooled:
            self._gcp_memory = (self.gcp_method, self.gcp_kwargs)
            self.global_pool = SelectAdaptivePool2d(pool_type='', flatten=False)
        in_features = self.global_pool.out_features if pooled else self._gcp_in_chs
        self.head_hidden_size = self._build_pre_logits(in_features, pooled, new_pool, **dd)
        self.fc = create_gcp_classifier(
            self.head_hidden_size, num_classes, pooled, self._gcp_layout['input_fmt'], **dd)

    def _build_pre_logits(self, in_features: int, pooled: bool, new_pool: bool, **dd: Any) -> int:
        """Hook for layers between pooling and classifier; returns the classifier's input width.

        Args:
            in_features: width of the pooled vector (or the channels of the map when ``pooled`` is False).
            pooled: the head pools (``global_pool='gcp'``).
            new_pool: the pooling was just built (not kept from before).
            dd: ``device`` and ``dtype`` for the layers the hook builds.
        """
        return in_features

    def _gcp_head_modules(self) -> Tuple[nn.Module, ...]:
        return tuple(m for m in (self.global_pool, getattr(self, 'pre_logits', None), self.fc) if m is not None)

    @property
    def gcp_method(self) -> str:
        """The matrix square-root method the model runs (the one a rebuilt pooling takes while pooling is off)."""
        pool = self._modules.get('global_pool')
        return pool_method(pool)[0] if isinstance(pool, GCP_POOLS) else self._gcp_memory[0]

    @property
    def gcp_kwargs(self) -> Dict[str, Any]:
        """The options of ``gcp_method`` as given (defaults not filled in)."""
        pool = self._modules.get('global_pool')
        return pool_method(pool)[1] if isinstance(pool, GCP_POOLS) else dict(self._gcp_memory[1])

    @property
    def _model_args(self) -> Dict[str, Any]:
        # timm.create_model records the construction kwargs here and save_for_hf/push_to_hf_hub export them in
        # config.json: the method is added from the model itself, so an export after the hybrid switch rebuilds the
        # method in use, with dtype/device options by name (which JSON can hold)
        args = dict(self.__dict__.get('_gcp_model_args', {}))
        args['gcp_method'] = self.gcp_method
        options = portable_options(self.gcp_kwargs)
        if options:
            args['gcp_kwargs'] = options
        return args

    @_model_args.setter
    def _model_args(self, args: Dict[str, Any]) -> None:
        self.__dict__['_gcp_model_args'] = {k: v for k, v in dict(args).items() if k not in _METHOD_ARGS}

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a fresh ``fc`` of ``num_classes`` outputs (0: none).

        Args:
            num_classes: new number of classes.
            global_pool: None keeps the current pooling as it is ('gcp' too when it is covariance pooling: its trained
                reduction conv/BN, method, frozen/``requires_grad`` state and train/eval mode stay); 'gcp' on a model
                without pooling builds a fresh pooling (of the method or head last in use); '' removes pooling, and a
                classifier then classifies every position or token.

        New modules are trainable, on the model's device and dtype and in its train/eval mode.
        """
        dd = get_device_dtype(self)
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._build_gcp_head(num_classes, global_pool, **dd)  # raises before changing anything on bad arguments
        self.num_classes = num_classes
        for m in self._gcp_head_modules():
            m.train(self.training)


def note_fresh_head(model: nn.Module, variant: str, features_only: bool = False) -> None:
    """Log that ``model``'s pretrained weights held the backbone only; a WARNING when the model kept the checkpoint's
    classes, whose classifier a user may take for trained."""
    if features_only or not getattr(model, 'num_classes', 0):
        return
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if model.num_classes == cfg.get('num_classes'):
        _logger.warning(
            f'{variant}: the pretrained weights ({cfg.get("tag") or "given file"}) hold the backbone only; the GCP '
            f'head and the {model.num_classes}-class classifier are freshly initialised, so the model must be '
            f'fine-tuned before its predictions mean anything')
