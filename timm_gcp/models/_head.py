"""The head every timm-gcp model shares: how it is built, reset and which square-root method it runs.

A GCP model has two head attributes, whatever its backbone: ``global_pool`` (a ``CovPool``, or no pooling after
``global_pool=''``) and the classifier ``fc``; a model may put layers between them (AlexNet's two hidden FC layers,
``pre_logits``). ``GcpHeadMixin`` builds and resets them for ResNet, AlexNet and the generic backbone wrapper alike,
so ``reset_classifier``, ``global_pool=''`` and the hybrid method switch behave the same on every model.
"""
import logging
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, get_device_dtype

from ..functional import portable_options
from ..layers import CovPool

__all__ = ['GCP_POOL', 'GcpHeadMixin', 'create_gcp_classifier', 'note_fresh_head']

_logger = logging.getLogger(__name__)

GCP_POOL = CovPool.pool_type  # the models' global_pool name for covariance pooling
_METHOD_ARGS = ('gcp_method', 'gcp_kwargs')


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
    """The GCP head of a timm model: ``global_pool`` (``CovPool`` or none), an optional ``pre_logits`` and ``fc``.

    Mixed in before the model's ``nn.Module`` base. The model sets ``num_classes`` and calls ``_init_gcp_head`` once
    its backbone is built; ``_build_pre_logits`` is the hook for layers between pooling and classifier.

    The method the model runs has one source of truth, the ``MatrixSqrt`` of its ``CovPool`` (switched by
    ``timm_gcp.set_gcp_method``): ``gcp_method``/``gcp_kwargs`` and the ``gcp_method`` timm exports in ``config.json``
    (``_model_args``) read it. Only while pooling is removed (``global_pool=''``) does the model keep the last method
    in use, which a pooling rebuilt by ``reset_classifier(n, 'gcp')`` takes.
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
            gcp_method, gcp_dim, gcp_kwargs: the covariance pooling (``gcp_dim`` None or 0: no reduction).
            input_fmt, num_prefix_tokens, cls_token: the layout of the features, as in ``CovPool``.
        """
        self.num_classes = num_classes
        self.gcp_dim = gcp_dim or None
        self._gcp_in_chs = in_chs
        self._gcp_layout = dict(input_fmt=input_fmt, num_prefix_tokens=num_prefix_tokens, cls_token=cls_token)
        self._gcp_memory: Tuple[str, Dict[str, Any]] = (gcp_method, dict(gcp_kwargs or {}))
        self.global_pool = nn.Identity()  # placeholder: _build_gcp_head sees no CovPool yet and builds one
        self._build_gcp_head(num_classes, global_pool, device=device, dtype=dtype)

    def _build_gcp_head(
            self,
            num_classes: int,
            global_pool: str,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """(Re)build pooling, pre-logits and classifier; an existing ``CovPool`` is kept when pooling stays on.

        Raises:
            ValueError: ``global_pool`` is neither 'gcp' nor '' (checked before anything changes).
        """
        if global_pool not in (GCP_POOL, ''):
            raise ValueError(f"global_pool must be '{GCP_POOL}', '' or None (keep), got {global_pool!r}")
        dd = {'device': device, 'dtype': dtype}
        pooled = global_pool == GCP_POOL
        new_pool = pooled and not isinstance(self.global_pool, CovPool)
        if new_pool:
            method, options = self._gcp_memory
            self.global_pool = CovPool(self._gcp_in_chs, self.gcp_dim, method, options, **self._gcp_layout, **dd)
        elif not pooled:
            self._gcp_memory = (self.gcp_method, self.gcp_kwargs)
            self.global_pool = SelectAdaptivePool2d(pool_type='', flatten=False)
        in_features = self.global_pool.out_features if pooled else self._gcp_in_chs
        self.head_hidden_size = self._build_pre_logits(in_features, pooled, new_pool, **dd)
        self.fc = create_gcp_classifier(
            self.head_hidden_size, num_classes, pooled, self._gcp_layout['input_fmt'], **dd)

    def _build_pre_logits(
            self,
            in_features: int,
            pooled: bool,
            new_pool: bool,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> int:
        """Hook for layers between pooling and classifier; returns the classifier's input width."""
        return in_features

    def _gcp_head_modules(self) -> Tuple[nn.Module, ...]:
        return tuple(m for m in (self.global_pool, getattr(self, 'pre_logits', None), self.fc) if m is not None)

    @property
    def gcp_method(self) -> str:
        """The matrix square-root method the model runs (the one a rebuilt pooling takes while pooling is off)."""
        pool = self._modules.get('global_pool')
        return pool.sqrtm.method if isinstance(pool, CovPool) else self._gcp_memory[0]

    @property
    def gcp_kwargs(self) -> Dict[str, Any]:
        """The options of ``gcp_method`` as given (defaults not filled in)."""
        pool = self._modules.get('global_pool')
        return pool.sqrtm.get_method()[1] if isinstance(pool, CovPool) else dict(self._gcp_memory[1])

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
                without pooling builds a fresh ``CovPool`` (with the method last in use); '' removes pooling, and a
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
