"""Shims for older timm releases (``pyproject.toml`` allows timm >= 1.0.29) and the private timm names we rely on.

Each name here is either timm's own (re-exported; private ones named here once) or, where the installed timm lacks
it, a small stand-in with the same behaviour. Callers import from here, so a timm upgrade is checked in one file.
"""
import csv
import os
from typing import Any, Mapping

__all__ = ['search_split', 'trim_summary', 'get_model_input_config', 'generate_readme', 'saver_load_state_dict']

try:
    from timm.utils import trim_summary
except ImportError:  # timm < 1.0.31
    def trim_summary(filename: str, start_epoch: int) -> None:
        """Drop the rows of epochs >= ``start_epoch`` from a summary CSV (timm 1.0.31's helper)."""
        if not os.path.exists(filename):
            return
        with open(filename, newline='') as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
        with open(filename, 'w', newline='') as f:
            if keep:
                csv.writer(f).writerows([rows[0]] + keep)

# How timm's create_dataset picks the split folder of an image-folder root (train/ or its synonyms, validation/ or
# val/, ...; the root itself when none exists). Private in timm; used so our folder datasets pick the same folder.
from timm.data.dataset_factory import _search_split as search_split  # noqa: E402

# The model card writer of timm's push_to_hf_hub; timm exports no public name for it.
from timm.models._hub import generate_readme  # noqa: E402

try:  # timm >= 1.0.31: the input size a model was built for (img_size given at construction included)
    from timm.models import get_model_input_config
except ImportError:  # pragma: no cover - older timm
    get_model_input_config = None


def saver_load_state_dict(saver: Any, history: Mapping[str, Any]) -> bool:
    """Restore a ``CheckpointSaver``'s checkpoint history and best metric (timm >= 1.0.31; older savers have no
    state: returns False and the history starts afresh)."""
    if not hasattr(saver, 'load_state_dict'):
        return False
    saver.load_state_dict(history)
    return True
