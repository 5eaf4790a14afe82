"""Parameter groups (head and backbone, decay and no-decay) and the switch of the GCP method of a run's models."""
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import MatrixSqrt, set_gcp_method

__all__ = ['head_param_names', 'head_param_groups', 'set_gcp_method_all']


def head_param_names(model: nn.Module) -> List[str]:
    """Names of the head parameters: the global pool, the GCP pooling (any module holding a ``MatrixSqrt``, wherever
    the model keeps it), ``head.*`` and the classifier of ``pretrained_cfg``."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'fc'
    gcp_pools = tuple(f'{name}.' for name, m in model.named_modules()
                      if name and any(isinstance(c, MatrixSqrt) for c in m.children()))
    prefixes = ('global_pool.', 'head.') + gcp_pools + tuple(
        f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def head_param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """Parameter groups for ``create_optimizer_v2``: backbone and head, each split into decay / no-decay.

    Biases and normalisation parameters (ndim <= 1) and ``model.no_weight_decay()`` get no weight decay; the head
    groups carry ``lr_scale = head_lr_mult``, which timm's schedulers apply to the scheduled learning rate.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    head = set(head_param_names(model))
    groups: Dict[Tuple[bool, bool], List[torch.Tensor]] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith('.bias') or name in skip)
        groups[(name in head, decay)].append(p)
    out = []
    for (is_head, decay), params in groups.items():
        if not params:
            continue
        g: Dict[str, Any] = dict(params=params, weight_decay=weight_decay if decay else 0.)
        if is_head and head_lr_mult != 1.0:
            g['lr_scale'] = head_lr_mult
        out.append(g)
    return out


def set_gcp_method_all(targets: Sequence[nn.Module], method: str, options: Dict[str, Any]) -> int:
    return sum(set_gcp_method(m, method, **options) for m in targets)

