"""``timm-gcp-train``: train and fine-tune GCP models with timm's components, including the hybrid NS→SVD protocol.

The paper (ICCV 2021, https://arxiv.org/abs/2105.02498) trains with Newton–Schulz (``isqrt``) and switches the same
weights to an eigen-method (e.g. SVD-Padé) for the last stage. Here that is one flag pair, ``--gcp-switch-epoch E
--gcp-switch-method pade``: at epoch E the matrix square root of every GCP head (and of the EMA copy) is switched in
place; the method the model uses is written into every checkpoint (``gcp_method``, ``gcp_kwargs``) and restored by
``--resume``.

A run guards its output: a checkpoint is written only when every parameter and buffer is finite and its evaluation
was finite, a diverging run stops with a message naming the last good checkpoint (exit status 2), and the run folder is
locked for the run's lifetime so that a second process cannot write into it. docs/training.md states these guarantees.

Flags and YAML ``--config`` keys are named as in timm's ``train.py`` where they overlap, so one recipe file serves both
trainers. With no data arguments the command trains a small GCP ResNet-18 and the same backbone with average pooling on
a built-in dataset whose classes differ only in channel covariance, and prints both accuracies side by side.

The package holds one concern per module: ``args`` (flags and YAML), ``data`` (datasets, loaders, split checks),
``params`` (parameter groups, the GCP method switch), ``loop`` (the training epoch), ``guard`` (finite checks and the
divergence watch), ``run_dir`` (the locked run folder), ``state`` (what the phases of a run share), ``prepare`` (the
phases before the epochs: model, optimizer, resume, EMA and method, loaders and schedule), ``run`` (output folder,
epochs, saving), ``demo`` and ``cli``.

Examples::

    timm-gcp-train                                       # the built-in demo (GCP vs average pooling)
    timm-gcp-train --data-dir /data/imagenet --config zoo/recipes/resnet50_gcp_imagenet_hybrid.yaml
    torchrun --nproc_per_node 2 -m timm_gcp.train --data-dir DIR --model resnet50_gcp_isqrt ...
"""
from .args import DEMO_DEFAULTS, EXTRA_KEYS, parse_args
from .cli import main
from .errors import CheckpointWriteError, NonFiniteLossError, TrainSetupError
from .loop import train_one_epoch
from .params import head_param_groups, head_param_names
from .run import train_model

__all__ = [
    'main', 'parse_args', 'train_model', 'train_one_epoch', 'NonFiniteLossError', 'TrainSetupError',
    'CheckpointWriteError', 'head_param_groups', 'head_param_names', 'DEMO_DEFAULTS', 'EXTRA_KEYS']
