"""Shared by the GCP model files: argument checks, the current-method attributes and pretrained-cfg assembly
(defaults per architecture + zoo tags)."""
import dataclasses
import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from timm.models import PretrainedCfg, clean_state_dict

from ..functional import portable_options, resolve_method
from ..layers import CovPool
from ._zoo_cfgs import PRETRAINED_TAGS

__all__ = [
    'PAPER_IDS', 'ORIGIN_URL', 'GCP_POOL', 'GcpMethodAttrs', 'build_cfgs', 'check_gcp_args', 'unwrap_state_dict']

_logger = logging.getLogger(__name__)

PAPER_IDS = 'arXiv:2105.02498'
ORIGIN_URL = 'https://github.com/KingJamesSong/DifferentiableSVD'
GCP_POOL = 'gcp'  # the models' global_pool name for covariance pooling
_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


def check_gcp_args(
        global_pool: str,
        gcp_method: str,
        gcp_dim: Optional[int],
        gcp_kwargs: Optional[Mapping[str, Any]],
) -> None:
    """Validate the GCP arguments every GCP model takes, before anything is built (a typo should not cost a
    backbone build).

    Raises:
        ValueError: ``global_pool`` is neither 'gcp' nor ''; ``gcp_dim`` is not a positive int, 0 or None; unknown
            ``gcp_method`` or an option it does not take.
        TypeError: ``gcp_kwargs`` is not a dict of method options.
    """
    if global_pool not in (GCP_POOL, ''):
        raise ValueError(f"global_pool must be '{GCP_POOL}' (covariance pooling) or '' (none), got {global_pool!r}")
    if gcp_dim is not None and (isinstance(gcp_dim, bool) or not isinstance(gcp_dim, int) or gcp_dim < 0):
        raise ValueError(f'gcp_dim must be a positive int (0 or None: no reduction), got {gcp_dim!r}')
    if gcp_kwargs is not None and not isinstance(gcp_kwargs, dict):
        raise TypeError(f'gcp_kwargs must be a dict of method options, got {type(gcp_kwargs).__name__}')
    resolve_method(gcp_method, **(gcp_kwargs or {}))


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict inside a checkpoint: the first of its ``state_dict``/``model``/``state_dict_ema`` entries that
    is a dict (else the checkpoint itself), with ``module.`` prefixes dropped (timm's ``clean_state_dict``)."""
    for wrapper in ('state_dict', 'model', 'state_dict_ema'):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
            checkpoint = checkpoint[wrapper]
            break
    return clean_state_dict(checkpoint)


class GcpMethodAttrs:
    """``gcp_method``/``gcp_kwargs`` of a GCP model: those of its pooling's ``MatrixSqrt``, so they follow
    ``timm_gcp.set_gcp_method`` (the hybrid switch); while pooling is removed (``global_pool=''``) the last ones in
    use, which a pooling rebuilt by ``reset_classifier(n, 'gcp')`` then takes."""
    _gcp_method: str
    _gcp_kwargs: Dict[str, Any]

    @property
    def gcp_method(self) -> str:
        pool = self._modules.get('global_pool')
        return pool.sqrtm.method if isinstance(pool, CovPool) else self._gcp_method

    @gcp_method.setter
    def gcp_method(self, method: str) -> None:
        self._gcp_method = method

    @property
    def gcp_kwargs(self) -> Dict[str, Any]:
        pool = self._modules.get('global_pool')
        return pool.sqrtm.get_method()[1] if isinstance(pool, CovPool) else dict(self._gcp_kwargs)

    @gcp_kwargs.setter
    def gcp_kwargs(self, options: Optional[Mapping[str, Any]]) -> None:
        self._gcp_kwargs = dict(options or {})

    @property
    def _model_args(self) -> Dict[str, Any]:
        return self.__dict__.get('_gcp_model_args', {})

    @_model_args.setter
    def _model_args(self, args: Mapping[str, Any]) -> None:
        # timm.create_model records the construction kwargs here and save_for_hf/push_to_hf_hub export them as
        # JSON: keep gcp_kwargs' dtype/device options by name so gcp_kwargs={'dtype': torch.float64} exports
        args = dict(args)
        if isinstance(args.get('gcp_kwargs'), Mapping):
            args['gcp_kwargs'] = portable_options(args['gcp_kwargs'])
        self.__dict__['_gcp_model_args'] = args

    def _remember_gcp_method(self) -> None:
        """Call before the pooling is replaced: keep its current method for a later rebuild."""
        self.gcp_method, self.gcp_kwargs = self.gcp_method, self.gcp_kwargs


def build_cfgs(
        archs: Iterable[str],
        family_of: Mapping[str, str],
        make_cfg: Callable[..., Dict[str, Any]],
        tags: Mapping[str, Mapping[str, Mapping[str, Any]]] = PRETRAINED_TAGS,
) -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': cfg}`` for ``generate_default_cfgs``.

    Tags under an exact architecture name come first (full-model weights become the default), then the family's tags
    (backbone-only weights, every method of the family), each overlaid on ``make_cfg(arch)``; an architecture with no
    tag gets one untagged cfg without weights. Fields that ``PretrainedCfg`` does not have are skipped with a log line;
    a tag's own ``paper_ids`` are appended to the GCP paper's.
    """
    out = {}
    for arch in archs:
        merged = {**dict(tags.get(arch, {}))}
        for tag, fields in tags.get(family_of[arch], {}).items():
            merged.setdefault(tag, fields)
        if not merged:
            out[arch] = make_cfg(arch)
            continue
        for tag, fields in merged.items():
            unknown = sorted(set(fields) - _CFG_FIELDS)
            if unknown:
                _logger.debug(f'{arch}.{tag}: ignoring fields that timm PretrainedCfg lacks: {", ".join(unknown)}')
            fields = {k: v for k, v in fields.items() if k in _CFG_FIELDS}
            if fields.get('paper_ids') and PAPER_IDS not in str(fields['paper_ids']):
                # the weights' own paper (e.g. a timm training recipe) joins the GCP paper, it does not replace it
                fields['paper_ids'] = f'{PAPER_IDS}, {fields["paper_ids"]}'
            out[f'{arch}.{tag}'] = make_cfg(arch, **fields)
    return out
