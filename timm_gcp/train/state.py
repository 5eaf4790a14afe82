"""The state the phases of one training run share."""
import argparse
from contextlib import nullcontext
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, unwrap_model

from .guard import DivergenceWatch
from .run_dir import RunLock

__all__ = ['RunState']


class RunState:
    """The state one training run's phases share (set up by :mod:`.prepare`, used by :mod:`.run`)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.primary = args, device, args.rank == 0
        self.model: Any = None
        self.model_ema: Optional[ModelEmaV3] = None
        self.optimizer: Any = None
        self.loss_scaler: Optional[NativeScaler] = None
        self.amp_autocast: Any = nullcontext
        self.data_config: Dict[str, Any] = {}
        self.datasets: Optional[Tuple[Any, Any]] = None
        self.class_names: Optional[List[str]] = None
        self.loader_train: Any = None
        self.loader_eval: Any = None
        self.lr_scheduler: Any = None
        self.num_epochs = args.epochs
        self.num_batches = 0
        self.start_epoch = 0
        self.resumed: Optional[Mapping[str, Any]] = None  # the --resume checkpoint as loaded
        self.head_params: List[torch.Tensor] = []
        self.output_dir: Optional[str] = None
        self.lock: Optional[RunLock] = None
        self.saver: Optional[CheckpointSaver] = None
        self.watch: Optional[DivergenceWatch] = None
        self.last_good: Optional[Tuple[str, int]] = None  # (path, epoch) of the last checkpoint known to be good

    def gcp_targets(self) -> List[nn.Module]:
        return [unwrap_model(self.model)] + ([self.model_ema.module] if self.model_ema is not None else [])
