"""How many positions a GCP head sees at a model's default input size, and a warning when that is fewer than 2."""
import logging
import math
from typing import Optional, Sequence

import torch.nn as nn

from ..layers.cov_pool import MIN_POSITIONS

__all__ = ['default_positions', 'warn_if_too_few_positions']

_logger = logging.getLogger(__name__)


def default_positions(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Optional[int]:
    """Positions H·W of the last feature map at ``input_size`` (default: the model's pretrained cfg), from the total
    stride timm records in ``feature_info`` (⌈H/stride⌉·⌈W/stride⌉); None where the model records none."""
    info = getattr(model, 'feature_info', None)
    size = input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    if not info or not size:
        return None
    stride = info[-1]['reduction']
    return math.ceil(size[-2] / stride) * math.ceil(size[-1] / stride)


def warn_if_too_few_positions(model: nn.Module, variant: str) -> None:
    """Log a WARNING when ``model``'s covariance pooling would see fewer than 2 positions at its default input size:
    every covariance is then 0, and the forward raises (with a larger input the model works)."""
    m = default_positions(model)
    if m is not None and m < MIN_POSITIONS:
        size = tuple(model.pretrained_cfg['input_size'])
        _logger.warning(f'{variant}: at its default input size {size} the last feature map has {m} position (total '
            f'stride {model.feature_info[-1]["reduction"]}); covariance pooling needs at least {MIN_POSITIONS}, so '
            f'feed larger images or build it with a smaller output_stride')
