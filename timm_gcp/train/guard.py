"""What keeps a diverging run from writing bad checkpoints: the finite check of every saved state and the watch that
tells a divergence apart from a bug."""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import get_state_dict, unwrap_model

from ..checkpoint import non_finite_entries
from ..checkpoint_model import model_gcp_method
from ..functional import NonFiniteError
from .errors import NonFiniteLossError, describe_non_finite, first_lines

__all__ = ['CheckpointState', 'DivergenceWatch']


class CheckpointState:
    """What ``CheckpointSaver`` writes besides optimizer/args/epoch, through its ``task`` hook.

    The weights as timm's saver saves them without a task, after checking that every tensor is finite (a non-finite
    checkpoint is never written); the model's current matrix square-root method at the top level (``gcp_method``,
    ``gcp_kwargs``, read from the model's ``MatrixSqrt`` modules when the checkpoint is written); the class names of
    the training data (``class_names``, in label order), which ``timm-gcp-validate`` checks evaluation data against.
    """

    def __init__(self, model: nn.Module, model_ema: Optional[nn.Module], class_names: Optional[List[str]]):
        self.model, self.model_ema, self.class_names = model, model_ema, class_names

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        if ema:
            if self.model_ema is None:
                return {}
            return dict(state_dict_ema=_finite_state(get_state_dict(self.model_ema, unwrap_fn), 'the EMA model'))
        state: Dict[str, Any] = dict(state_dict=_finite_state(get_state_dict(self.model, unwrap_fn), 'the model'))
        current = model_gcp_method(self.model)
        if current is not None:
            state.update(gcp_method=current[0], gcp_kwargs=dict(current[1]))
        if self.class_names:
            state['class_names'] = list(self.class_names)
        return state


def _finite_state(state_dict: Dict[str, torch.Tensor], whose: str) -> Dict[str, torch.Tensor]:
    bad = non_finite_entries(state_dict)
    if bad:
        raise NonFiniteLossError(f'non-finite values in {whose} when saving: {describe_non_finite(bad)}')
    return state_dict



class DivergenceWatch:
    """Tells a diverging run apart from a bug when a forward or backward raises, and checks the models' state.

    An error is a divergence when a parameter or buffer of a watched model holds NaN/inf, or when it is a GCP
    layer's ``NonFiniteError`` (its input, the batch covariance, holds NaN/inf: often the first sign of a divergence,
    before any loss is NaN).
    """

    def __init__(self, named_models: Sequence[Tuple[str, Optional[nn.Module]]]):
        self.models = [(label, unwrap_model(m)) for label, m in named_models if m is not None]

    def non_finite_state(self) -> Optional[str]:
        """Which model holds NaN/inf in its parameters or buffers, or None."""
        for label, model in self.models:
            bad = non_finite_entries(model.state_dict())
            if bad:
                return f'the {label}\'s parameters/buffers: {describe_non_finite(bad)}'
        return None

    def explain(self, error: BaseException) -> Optional[str]:
        """Why ``error``, just raised, is a divergence, or None when nothing is non-finite (then it is a bug)."""
        reason = self.non_finite_state()
        if reason is None and isinstance(error, NonFiniteError):
            reason = f'a GCP layer\'s input: {first_lines(error, 1)}'
        return reason

