"""Reading checkpoints and weight files: the one place every tool (train, validate, publish, convert) reads them.

Files are read with safetensors or ``torch.load(weights_only=True)`` only; nothing in a file can run code. A file
that cannot be read stops with a :class:`CheckpointError` that says what is wrong with it (missing, empty, truncated,
not a checkpoint, pickled objects the weights-only unpickler refuses, a corrupt ``.safetensors``) instead of a
traceback from deep inside ``torch.load``.

The keys of a ``timm-gcp-train`` checkpoint are documented once, in docs/training.md ("Checkpoint contents"); this
module is where they are read (:func:`read_checkpoint`), ``timm_gcp.train`` where they are written.
"""
import argparse
import logging
import math
import os
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from timm.models import clean_state_dict

__all__ = [
    'CheckpointError', 'load_state_dict_safely', 'unwrap_state_dict', 'read_checkpoint', 'checkpoint_info',
    'checkpoint_gcp_method', 'non_finite_entries', 'check_finite_state_dict', 'finite_metric']

_logger = logging.getLogger(__name__)

# Where a state dict sits inside a training checkpoint (timm's CheckpointSaver, torchvision/fast-MPN-COV scripts).
_WRAPPERS = ('state_dict', 'model')
_EMA_WRAPPERS = ('state_dict_ema', 'model_ema')
_PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))


class CheckpointError(ValueError):
    """A checkpoint cannot be read safely or does not fit; the message names the file or the keys."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable .safetensors file (truncated or corrupt: {_first_line(e)})') \
            from e


def _torch_load_error(path: str, e: Exception) -> CheckpointError:
    """What went wrong when ``torch.load(weights_only=True)`` failed on ``path``, in words."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK\x03\x04'):  # a torch.save zip archive
        if not zipfile.is_zipfile(path):
            return CheckpointError(f'{path} is truncated or corrupt (its zip archive is incomplete: an interrupted '
                                   f'save or copy?): {_first_line(e)}')
        unsafe: List[str] = []
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # older torch, or an archive too damaged to list
            pass
        unsafe = [g for g in unsafe if g != 'argparse.Namespace']
        if unsafe:
            return CheckpointError(
                f'refusing to load {path}: it holds pickled objects that torch.load(weights_only=True) does not '
                f'allow ({", ".join(unsafe[:5])}); loading them could run code from the file. Only tensors, plain '
                f'containers and argparse.Namespace are read; convert the file in a trusted environment to a plain '
                f'state dict or .safetensors first.')
        return CheckpointError(f'{path} is a corrupt PyTorch checkpoint ({_first_line(e)})')
    if head[:2] in _PICKLE_PROTOCOLS:  # a bare pickle (or torch's legacy format) the weights-only reader refuses
        return CheckpointError(
            f'refusing to load {path}: it is a pickle that torch.load(weights_only=True) cannot read '
            f'({_first_line(e)}); a pickle can run code when it is loaded. Save the weights with torch.save or as '
            f'.safetensors in a trusted environment first.')
    return CheckpointError(f'{path} is not a PyTorch checkpoint or .safetensors file (unrecognised content, '
                           f'{os.path.getsize(path)} bytes; {_first_line(e)})')


def load_state_dict_safely(path: str) -> Any:
    """Load a checkpoint or weights file without arbitrary unpickling.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``. timm's
    checkpoint saver stores ``args`` as an ``argparse.Namespace``, which the weights-only unpickler rejects; that one
    class is allowed (it holds plain values, it runs no code on load) and nothing else.

    Returns:
        The loaded object: a flat state dict or a dict holding one (``state_dict``, ``state_dict_ema``, ...).

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, a corrupt ``.safetensors``, or
            needs objects the weights-only unpickler refuses; the message says which.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} is not a file')
    if os.path.getsize(path) == 0:
        hint = ' (an interrupted save leaves an empty tmp.pth.tar: use last.pth.tar)' \
            if os.path.basename(path).startswith('tmp') else ''
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes){hint}')
    if path.endswith('.safetensors'):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), OSError (truncated), EOFError, ...
        raise _torch_load_error(path, e) from e


def unwrap_state_dict(obj: Any, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Flat ``{name: tensor}`` from a loaded checkpoint.

    Takes the first mapping among ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema`` (the EMA entries first
    when ``prefer_ema``), else the object itself, and strips the wrapper prefixes of DDP and ``torch.compile``
    (``module.``, ``_orig_mod.``) with timm's ``clean_state_dict``.

    Args:
        obj: what :func:`load_state_dict_safely` returned.
        prefer_ema: take the EMA weights when present (timm's saver writes both).

    Raises:
        CheckpointError: no state dict, or an entry that is not a tensor.
    """
    if isinstance(obj, Mapping):
        for key in (_EMA_WRAPPERS + _WRAPPERS) if prefer_ema else (_WRAPPERS + _EMA_WRAPPERS):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError('checkpoint holds no state dict (expected a mapping of tensors)')
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f'state dict entry {k!r} is a {type(v).__name__}, not a tensor')
    return clean_state_dict(dict(obj))


def _safetensors_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return dict(f.metadata() or {})


def checkpoint_info(obj: Mapping[str, Any]) -> Dict[str, Any]:
    """The metadata of a loaded training checkpoint (see :func:`read_checkpoint`), plain values only."""
    info: Dict[str, Any] = {}
    for key in ('arch', 'gcp_method', 'epoch', 'metric'):
        if key in obj and isinstance(obj[key], (str, int, float)):
            info[key] = obj[key]
    if isinstance(obj.get('gcp_kwargs'), Mapping):
        info['gcp_kwargs'] = dict(obj['gcp_kwargs'])
    names = obj.get('class_names')
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        info['class_names'] = list(names)
    args = obj.get('args')
    if isinstance(args, argparse.Namespace):
        info['args'] = vars(args)
    elif isinstance(args, Mapping):
        info['args'] = dict(args)
    return info


def read_checkpoint(path: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """State dict and metadata of a training checkpoint or weights file, loaded without arbitrary unpickling.

    Understands timm's ``CheckpointSaver`` files (``state_dict``, ``state_dict_ema``, ``arch``, ``args``),
    ``timm-gcp-train`` checkpoints (the same saver, plus ``gcp_method``, ``gcp_kwargs``, ``class_names``), bare state
    dicts and ``.safetensors`` files (architecture from their metadata when present).

    Returns:
        (flat state dict, info) where info may hold ``arch``, ``gcp_method``, ``gcp_kwargs``, ``class_names``,
        ``epoch``, ``metric``, ``ema`` (whether EMA weights were taken) and ``args`` (the training arguments as a
        dict). Nothing in info has been acted on: callers decide what to trust.

    Raises:
        CheckpointError: the file cannot be read (see :func:`load_state_dict_safely`), holds no state dict, or holds
            no EMA weights when ``use_ema`` asks for them.
    """
    obj = load_state_dict_safely(path)
    info: Dict[str, Any] = {}
    if os.fspath(path).endswith('.safetensors'):
        if use_ema:
            raise CheckpointError(f'{path} is a single set of weights (safetensors), it holds no separate EMA '
                                  f'weights; drop --use-ema')
        meta = _safetensors_metadata(path)
        if meta.get('arch'):
            info['arch'] = meta['arch']
    elif isinstance(obj, Mapping):
        info = checkpoint_info(obj)
        if use_ema and not any(isinstance(obj.get(k), Mapping) for k in _EMA_WRAPPERS):
            raise CheckpointError(f'{path} holds no state_dict_ema (EMA weights were requested)')
        info['ema'] = bool(use_ema)
    try:
        return unwrap_state_dict(obj, prefer_ema=use_ema), info
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from None


def checkpoint_gcp_method(info: Mapping[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The matrix square-root method (and its options) a checkpoint was written with, or None when it names none.

    Read from the top-level ``gcp_method``/``gcp_kwargs`` that ``timm-gcp-train`` writes; checkpoints of earlier
    versions kept them only in ``args.gcp_method``/``args.gcp_method_kwargs``, which are read when the top level has
    none.
    """
    if info.get('gcp_method'):
        return str(info['gcp_method']), dict(info.get('gcp_kwargs') or {})
    args = info.get('args') or {}
    if args.get('gcp_method'):
        return str(args['gcp_method']), dict(args.get('gcp_method_kwargs') or {})
    return None


def non_finite_entries(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf (one device sync in all)."""
    names = [k for k, v in state_dict.items()
             if torch.is_tensor(v) and v.is_floating_point() and v.numel() and v.device.type != 'meta']
    if not names:
        return []
    flags = [torch.isfinite(state_dict[k]).all() for k in names]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # tensors may sit on several devices
    return [k for k, ok in zip(names, finite) if not ok]


def check_finite_state_dict(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` when ``state_dict`` holds NaN/inf, naming the tensors (``what``: whose)."""
    bad = non_finite_entries(state_dict)
    if bad:
        raise CheckpointError(f'{what} holds NaN/inf in {len(bad)} tensor(s): {", ".join(bad[:8])}'
                              f'{" ..." if len(bad) > 8 else ""}')


def finite_metric(value: Any) -> bool:
    """Whether a recorded metric is a finite number (a checkpoint whose evaluation gave NaN is not a good one)."""
    return isinstance(value, (int, float)) and math.isfinite(value)
