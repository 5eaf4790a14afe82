"""Convert the official GCP checkpoints into timm-gcp architectures.

Two published layouts are understood:

* fast-MPN-COV iSQRT-COV ResNet-50/101 (Li et al., CVPR 2018, arXiv 1712.01034): ``MPNCOVResNet`` state dicts with
  torchvision backbone keys (last stage stride 1, no dilation), head ``layer_reduce.weight``, ``layer_reduce_bn.*``,
  ``fc.weight`` [classes x 32896], ``fc.bias``; possibly prefixed by ``module.`` and wrapped in ``state_dict``.
  Target: ``resnet{50,101}_ls1_gcp_isqrt``.
* DifferentiableSVD SVD-Pade ResNet-50 (Song et al., ICCV 2021, arXiv 2105.02498): ``features.module.<i>.*`` with
  i = 0 conv1, 1 bn1, 4-7 layer1-4 (torchvision ResNet children, stride-2 last stage),
  ``representation.conv_dr_block.{0,1}.*`` (reduction conv, BN) and ``classifier.{weight,bias}``. Target:
  ``resnet50_gcp_pade`` (``resnet101_gcp_pade`` for a 23-block layer3).

Vectorisation order: both official codes select the upper triangle with ``torch.ones(d, d).triu().reshape(-1)
.nonzero()``, i.e. flat indices ``i*d + j`` (j >= i) in increasing order, which is row-major upper-triangle order,
the order of ``torch.triu_indices(d, d)`` that :func:`timm_gcp.functional.triu_vec` uses. The classifier columns
therefore map one to one and no permutation is applied (``tests/test_convert.py`` checks the equality of the orders).

torchvision's Bottleneck (v1.5, stride on the 3x3 conv) and timm's ResNet use the same parameter names and the same
stride placement, so backbone tensors keep their names.

Files are read by :mod:`timm_gcp.checkpoint` (safetensors or ``torch.load(weights_only=True)`` only); this module
checks and converts. A checkpoint is refused, naming the tensors, when it holds NaN/inf values, a tensor that is not
floating point (integer BatchNorm counters aside) or one of the wrong rank; the output is written next to its final
name and moved there only when complete, with the permissions the user's umask gives new files, and never over an
existing file.
"""
import logging
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import models  # noqa: F401  (registers the *_gcp_* entrypoints that target_shapes builds)
from .checkpoint import CheckpointError, non_finite_entries, read_checkpoint

__all__ = [
    'detect_layout', 'pick_arch', 'map_keys', 'check_tensors', 'convert_state_dict', 'target_shapes', 'convert_file',
    'LAYOUTS',
]

_logger = logging.getLogger(__name__)

LAYOUTS = ('fast-mpn-cov', 'differentiable-svd')

_BN_SUFFIXES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
# torchvision ResNet children index -> timm ResNet module name (2 = relu, 3 = maxpool have no parameters).
_TV_CHILDREN = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}
_BACKBONE_RE = re.compile(r'^(conv1|bn1|layer[1-4])\.')


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Recognise an official layout from its keys.

    Returns:
        One of :data:`LAYOUTS`.

    Raises:
        CheckpointError: neither layout matches (the message shows a sample of the keys).
    """
    keys = set(sd)
    if 'layer_reduce.weight' in keys and 'fc.weight' in keys and 'conv1.weight' in keys:
        return 'fast-mpn-cov'
    if ('representation.conv_dr_block.0.weight' in keys and 'classifier.weight' in keys
            and any(k.startswith('features.') for k in keys)):
        return 'differentiable-svd'
    sample = ', '.join(sorted(keys)[:8])
    raise CheckpointError(
        f'unrecognised checkpoint layout: expected fast-MPN-COV keys (layer_reduce.weight, fc.weight, conv1.weight) '
        f'or DifferentiableSVD keys (features.module.<i>.*, representation.conv_dr_block.0.weight, '
        f'classifier.weight); found {len(keys)} keys, e.g. {sample}')


def _layer3_blocks(names: Sequence[str]) -> int:
    blocks = {int(m.group(1)) for n in names for m in [re.match(r'^layer3\.(\d+)\.', n)] if m}
    return max(blocks) + 1 if blocks else 0


def pick_arch(layout: str, mapped_names: Sequence[str]) -> str:
    """Architecture for a converted layout: ResNet-50 vs -101 from layer3's block count (6 vs 23)."""
    depth = {6: 50, 23: 101}.get(_layer3_blocks(mapped_names))
    if depth is None:
        raise CheckpointError(f'cannot tell the ResNet depth: layer3 has {_layer3_blocks(mapped_names)} blocks '
                              f'(expected 6 for ResNet-50 or 23 for ResNet-101); pass --arch')
    return f'resnet{depth}_ls1_gcp_isqrt' if layout == 'fast-mpn-cov' else f'resnet{depth}_gcp_pade'


def _map_key(layout: str, key: str) -> Optional[str]:
    if layout == 'fast-mpn-cov':
        if _BACKBONE_RE.match(key) or key in ('fc.weight', 'fc.bias'):
            return key
        if key == 'layer_reduce.weight':
            return 'global_pool.conv.weight'
        if key.startswith('layer_reduce_bn.') and key.split('.', 1)[1] in _BN_SUFFIXES:
            return 'global_pool.bn.' + key.split('.', 1)[1]
        return None
    m = re.match(r'^features\.(?:module\.)?(\d+)\.(.+)$', key)
    if m:
        head = _TV_CHILDREN.get(m.group(1))
        return f'{head}.{m.group(2)}' if head else None
    if key == 'representation.conv_dr_block.0.weight':
        return 'global_pool.conv.weight'
    m = re.match(r'^representation\.conv_dr_block\.1\.(.+)$', key)
    if m and m.group(1) in _BN_SUFFIXES:
        return 'global_pool.bn.' + m.group(1)
    m = re.match(r'^classifier\.(weight|bias)$', key)
    if m:
        return 'fc.' + m.group(1)
    return None


def map_keys(layout: str, sd: Mapping[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Rename every source tensor into timm-gcp names; raise naming the source keys that have no place."""
    if layout not in LAYOUTS:
        raise ValueError(f'unknown layout {layout!r}; valid: {", ".join(LAYOUTS)}')
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    unmapped = []
    for k, v in sd.items():
        new = _map_key(layout, k)
        if new is None:
            unmapped.append(k)
        elif new in out:
            raise CheckpointError(f'two source tensors map to {new!r} (second: {k!r})')
        else:
            out[new] = v
    if unmapped:
        raise CheckpointError(f'{len(unmapped)} source tensor(s) of the {layout} layout have no place in timm-gcp: '
                              f'{", ".join(unmapped[:20])}{" ..." if len(unmapped) > 20 else ""}')
    return out


def target_shapes(arch: str, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of an architecture's state dict, built on the meta device (no memory, no compute)."""
    import timm
    if arch not in timm.list_models(arch):
        raise CheckpointError(f'unknown architecture {arch!r}: is it registered by timm_gcp?')
    with torch.device('meta'):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(sd: Mapping[str, Any]) -> None:
    """Refuse what no conversion should carry over, naming the source tensors: entries that are not tensors,
    non-floating-point weights (BatchNorm ``num_batches_tracked`` counters must be integers), NaN/inf values.

    Raises:
        CheckpointError: with every offending name (the first 8 of each kind).
    """
    def names(keys: List[str]) -> str:
        return ', '.join(keys[:8]) + (' ...' if len(keys) > 8 else '')

    problems = []
    not_tensors = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if not_tensors:
        problems.append(f'entries that are not tensors: {names(not_tensors)}')
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    counters = [k for k in tensors if k.endswith('num_batches_tracked')]
    bad_dtype = [f'{k} ({tensors[k].dtype})' for k in counters
                 if tensors[k].is_floating_point() or tensors[k].is_complex() or tensors[k].dtype == torch.bool]
    bad_dtype += [f'{k} ({v.dtype})' for k, v in tensors.items() if k not in counters and not v.is_floating_point()]
    if bad_dtype:
        problems.append('tensors of the wrong dtype (weights must be floating point, BatchNorm counters integers): '
                        + names(bad_dtype))
    non_finite = non_finite_entries(tensors)
    if non_finite:
        problems.append(f'NaN/inf values in {len(non_finite)} tensor(s): {names(non_finite)}')
    if problems:
        raise CheckpointError('refusing to convert this checkpoint: ' + ' | '.join(problems))


def convert_state_dict(
        sd: Mapping[str, torch.Tensor],
        arch: Optional[str] = None,
        shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> Tuple['OrderedDict[str, torch.Tensor]', str, str]:
    """Convert an official state dict into a timm-gcp one, checking that it fills the target exactly.

    Args:
        sd: flat official state dict (``module.`` already stripped, see :func:`timm_gcp.checkpoint.unwrap_state_dict`).
        arch: target architecture; picked from the layout and layer3's block count when None.
        shapes: target ``{name: shape}``; built from ``arch`` on the meta device when None (tests pass their own).

    Returns:
        (converted state dict in target order, architecture name, layout name).

    Raises:
        CheckpointError: a tensor is refused by :func:`check_tensors`, the classifier is not a matrix, a source tensor
            has no place, a target tensor stays empty, or a shape differs; the message names the keys. The one
            exception: BatchNorm ``num_batches_tracked`` counters absent from checkpoints written before torch 0.4.1
            are filled with 0 (they only matter when BN momentum is None) and logged.
    """
    layout = detect_layout(sd)
    check_tensors(sd)
    mapped = map_keys(layout, sd)
    fc = mapped['fc.weight']
    if fc.dim() != 2:
        source = 'fc.weight' if layout == 'fast-mpn-cov' else 'classifier.weight'
        raise CheckpointError(f'{source} must be a 2-D [classes x features] matrix, got shape {tuple(fc.shape)}')
    if arch is None:
        arch = pick_arch(layout, list(mapped))
    num_classes = int(fc.shape[0])
    if shapes is None:
        shapes = target_shapes(arch, num_classes)
    missing = [k for k in shapes if k not in mapped and not k.endswith('num_batches_tracked')]
    extra = [k for k in mapped if k not in shapes]
    bad_shape = [f'{k}: source {tuple(mapped[k].shape)} vs target {tuple(shapes[k])}'
                 for k in mapped if k in shapes and tuple(mapped[k].shape) != tuple(shapes[k])]
    problems: List[str] = []
    if missing:
        problems.append(f'target tensors not filled: {", ".join(missing[:20])}{" ..." if len(missing) > 20 else ""}')
    if extra:
        problems.append(f'converted tensors unknown to {arch}: {", ".join(extra[:20])}'
                        f'{" ..." if len(extra) > 20 else ""}')
    if bad_shape:
        problems.append('shape mismatches: ' + '; '.join(bad_shape[:10]) + (' ...' if len(bad_shape) > 10 else ''))
    if problems:
        raise CheckpointError(f'{layout} checkpoint does not convert cleanly into {arch}: ' + ' | '.join(problems))
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    filled = []
    for k in shapes:
        if k in mapped:
            out[k] = mapped[k].contiguous()
        else:
            out[k] = torch.zeros((), dtype=torch.long)
            filled.append(k)
    if filled:
        _logger.info('filled %d absent BatchNorm num_batches_tracked counters with 0', len(filled))
    return out, arch, layout


def convert_file(path: str, output: str, arch: Optional[str] = None, overwrite: bool = False) -> str:
    """Convert an official checkpoint file and write it as ``.safetensors``.

    The file is written beside ``output`` first and moved into place only when complete (a failed write leaves
    nothing behind); it gets the mode the user's umask gives new files; an existing ``output`` is never replaced
    unless ``overwrite``.

    Returns:
        The architecture name; ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=output))``
        loads the result.

    Raises:
        CheckpointError: the output is not ``.safetensors`` or exists, the checkpoint is unreadable or refused, or
            the write failed (the message names the path and the cause).
    """
    if not output.endswith('.safetensors'):
        raise CheckpointError(f'output must be a .safetensors file, got {output}')
    if os.path.exists(output) and not overwrite:
        raise CheckpointError(f'refusing to overwrite existing {output}')
    sd = read_checkpoint(path)[0]
    converted, arch, layout = convert_state_dict(sd, arch=arch)
    _write_safetensors(dict(converted), output, dict(format='pt', arch=arch, converted_from=layout), overwrite)
    _logger.info('converted %s (%s, %d tensors) -> %s as %s', path, layout, len(converted), output, arch)
    return arch


def _new_file_mode() -> int:
    """The mode a new regular file gets under the process umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_safetensors(tensors: Dict[str, torch.Tensor], output: str, metadata: Dict[str, str],
                       overwrite: bool) -> None:
    from safetensors.torch import save_file
    tmp = f'{output}.tmp-{os.getpid()}'
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _new_file_mode())  # safetensors creates its files 0600
        if overwrite:
            os.replace(tmp, output)
        else:
            os.link(tmp, output)  # fails, atomically, when output appeared meanwhile
    except FileExistsError:
        raise CheckpointError(f'refusing to overwrite existing {output}') from None
    except (OSError, RuntimeError) as e:  # safetensors reports I/O errors as RuntimeError/SafetensorError
        raise CheckpointError(f'could not write {output}: {e}; nothing was written') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
