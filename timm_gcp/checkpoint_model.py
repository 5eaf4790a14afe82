"""Building a model from a checkpoint, and what a checkpoint records about how it was trained.

The one home of the checkpoint metadata that ``timm-gcp-validate``, ``timm-gcp-publish`` and ``timm-gcp-train`` act
on: the architecture and model kwargs to build (:func:`resolve_arch`), the preprocessing it was trained with
(:func:`checkpoint_data_config`), the strict, finite load (:func:`create_model_from_checkpoint`) and the matrix
square-root method a model uses now (:func:`model_gcp_method`). Files are read by :mod:`timm_gcp.checkpoint`.
"""
import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .checkpoint import CheckpointError, check_finite_state_dict, checkpoint_gcp_method, read_checkpoint
from .functional import portable_options
from .layers import get_gcp_method
from .models import resolve_model_name
from .models.naming import parse_gcp_name

__all__ = ['resolve_arch', 'create_model_from_checkpoint', 'checkpoint_data_config', 'model_gcp_method']

_logger = logging.getLogger(__name__)

# Model kwargs that load weights or configs from a file, a URL or the Hub: never taken from checkpoint metadata.
_UNTRUSTED_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir')
_REMOTE_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')


def _registered_arch(name: str, source: str) -> str:
    """``name`` if it is a registered timm (or timm-gcp) architecture; a name recorded in checkpoint metadata is never
    followed to the Hub, a URL or a folder.

    Raises:
        CheckpointError: anything else, asking for ``--model``.
    """
    import timm
    if name.startswith(_REMOTE_PREFIXES) or '://' in name:
        raise CheckpointError(
            f'{source} names the architecture {name!r}, a Hub repository, URL or folder: architectures recorded in '
            f'a checkpoint are never fetched or read from elsewhere. Pass --model NAME (a registered timm or '
            f'timm-gcp architecture) to build the model')
    if not timm.is_model(name):
        raise CheckpointError(f'{source} names the architecture {name!r}, which is not a registered timm or timm-gcp '
                              f'model; pass --model NAME')
    return name


def _checked(fn, what: str) -> Any:
    try:
        return fn()
    except ValueError as e:  # an unknown method in a name or in the metadata
        raise CheckpointError(f'{what}: {e}') from e


def _gcp_name(name: str, what: str):
    """``name`` parsed as ``<backbone>_gcp_<method>[.<tag>]`` (None when it is not a GCP name)."""
    return _checked(lambda: parse_gcp_name(name), what)


def _metadata_model_kwargs(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The training ``model_kwargs`` of a checkpoint, without those that would load something from elsewhere."""
    kwargs = args.get('model_kwargs')
    if not isinstance(kwargs, Mapping):
        return {}
    dropped = sorted(k for k in kwargs if k in _UNTRUSTED_KWARGS)
    if dropped:
        _logger.warning('ignoring model_kwargs %s recorded in the checkpoint: they would load weights or configs '
                        'from elsewhere', dropped)
    return {k: v for k, v in kwargs.items() if k not in _UNTRUSTED_KWARGS}


def resolve_arch(model_name: Optional[str], info: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Architecture to build and extra model kwargs, from ``--model`` and the checkpoint's metadata.

    The GCP method in effect when the checkpoint was written (:func:`timm_gcp.checkpoint.checkpoint_gcp_method`)
    selects the entrypoint of the same family: ``arch='resnet50_gcp_isqrt', gcp_method='pade'`` builds
    ``resnet50_gcp_pade``, and a stale ``gcp_method`` in the training ``model_kwargs`` is dropped, as are its
    ``gcp_kwargs`` (options of the method switched from) when the method changed; the options recorded with the method
    apply. The other training ``model_kwargs`` (e.g. ``gcp_dim``) are kept: they shape the architecture. An explicit
    ``model_name`` wins over the checkpoint's names.

    Nothing recorded in the checkpoint reaches the network or another file: the architecture it names must be a
    registered timm or timm-gcp model (not ``hf-hub:``, ``local-dir:`` or a URL), and training ``model_kwargs`` that
    load weights or configs (``pretrained_cfg_overlay``, ``checkpoint_path``, ...) are dropped.

    Raises:
        CheckpointError: no architecture recorded and none given, or a recorded one that is not registered.
    """
    args = info.get('args') or {}
    kwargs = _metadata_model_kwargs(args)
    built = _gcp_name(info.get('arch') or args.get('model') or '', 'the checkpoint\'s arch')
    built_method = kwargs.get('gcp_method') or (built.method if built else None)
    recorded = checkpoint_gcp_method(info)
    method = recorded[0] if recorded else kwargs.get('gcp_method')
    kwargs.pop('gcp_method', None)
    if method != built_method:  # switched (hybrid): the construction options belonged to the method switched from
        kwargs.pop('gcp_kwargs', None)
    if recorded and recorded[1]:
        kwargs['gcp_kwargs'] = dict(recorded[1])
    if model_name:
        given = _gcp_name(model_name, '--model')
        if method and given and given.method != method:
            _logger.warning('checkpoint says gcp_method=%r but --model %s was given; using --model', method, model_name)
        return resolve_model_name(model_name, kwargs)
    arch = info.get('arch') or args.get('model')
    if not arch or not isinstance(arch, str):
        raise CheckpointError('the checkpoint names no architecture (arch); pass --model')
    if method and built:
        arch = _checked(lambda: built.with_method(method).arch, 'the checkpoint\'s gcp_method')
    # <any timm model>_gcp_<method> is built as generic_gcp_<method> with that backbone, which must be registered too
    arch, kwargs = _checked(lambda: resolve_model_name(arch, kwargs), 'the checkpoint\'s arch')
    if 'backbone' in kwargs:
        _registered_arch(str(kwargs['backbone']), 'the checkpoint\'s backbone')
    return _registered_arch(arch, 'the checkpoint'), kwargs


def create_model_from_checkpoint(
        checkpoint: str,
        model_name: Optional[str] = None,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        **model_kwargs: Any,
) -> Tuple[torch.nn.Module, str, Dict[str, Any]]:
    """Build the named architecture and load the checkpoint into it strictly.

    The number of classes is taken from the checkpoint's classifier (the one the architecture's pretrained cfg names,
    e.g. ``fc`` or ``head.fc``) unless given.

    Returns:
        (model in eval mode, architecture name, checkpoint info).

    Raises:
        CheckpointError: the checkpoint cannot be read, holds NaN/inf weights (the message names the tensors), names
            no usable architecture, or does not load strictly (the message names missing/unexpected keys or the
            shapes that differ).
    """
    import timm

    sd, info = read_checkpoint(checkpoint, use_ema=use_ema)
    check_finite_state_dict(sd, f'{checkpoint}{" (EMA weights)" if use_ema else ""}')  # NaN logits would still rank
    arch, extra = resolve_arch(model_name, info)
    if num_classes is None:
        num_classes = _classifier_rows(sd, arch)
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    model = timm.create_model(arch, pretrained=False, **{**extra, **model_kwargs})
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes differ
        raise CheckpointError(f'{checkpoint} does not fit {arch}: {" ".join(str(e).split())[:600]}') from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{checkpoint} does not load strictly into {arch}: missing {result.missing_keys[:10]}, unexpected '
            f'{result.unexpected_keys[:10]}')
    return model.eval(), arch, info


def _classifier_rows(sd: Mapping[str, torch.Tensor], arch: str) -> Optional[int]:
    """Output count of the checkpoint's classifier, found under the name the architecture's pretrained cfg gives."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    names = getattr(cfg, 'classifier', None) or 'fc'
    for name in ([names] if isinstance(names, str) else list(names)):
        weight = sd.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None



def checkpoint_data_config(info: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing a checkpoint was trained and evaluated with, from its training arguments.

    Returns:
        Those of ``img_size`` (from ``img_size`` or ``input_size``), ``crop_pct``, ``interpolation``, ``mean``, ``std``
        the training run set; empty for files that record none (the pretrained cfg's then apply).
    """
    args = info.get('args') or {}
    out: Dict[str, Any] = {}
    input_size = args.get('input_size')
    size = args.get('img_size') or (input_size[-1] if input_size else None)
    if size:
        out['img_size'] = int(size)
    if args.get('crop_pct'):
        out['crop_pct'] = float(args['crop_pct'])
    if args.get('interpolation'):
        out['interpolation'] = str(args['interpolation'])
    for key in ('mean', 'std'):
        if args.get(key):
            out[key] = tuple(float(v) for v in args[key])
    return out




def model_gcp_method(model: torch.nn.Module, portable: bool = False) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The matrix square-root method of the model's GCP layers and its options, or None for a model without one.

    Args:
        model: the model (DDP/EMA wrappers are unwrapped).
        portable: options as ``config.json`` can hold them (dtypes and devices by name).
    """
    from timm.utils import unwrap_model
    try:
        method, options = get_gcp_method(unwrap_model(model))
    except ValueError:  # no MatrixSqrt in this model
        return None
    return method, (portable_options(options) if portable else dict(options))
