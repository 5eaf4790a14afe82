"""Shared by the GCP model files: argument checks, pretrained-cfg assembly (defaults per architecture + zoo tags)
and the one place that registers ``<family>_<method>`` entrypoints with timm.

A backbone-only zoo tag names the timm pretrained model whose weights the backbone loads (``timm_model``); its cfg
is assembled here, at registration, from timm's own pretrained cfg of that model (weight source, license, input size,
interpolation, crop, mean, std, ...) over the GCP architecture's defaults (stem, classifier, pool size), plus what is
ours (notes naming the fresh layers). Nothing timm knows is copied into the zoo, so a timm release that changes a tag
changes ours with it."""
import dataclasses
import logging
import sys
from typing import Any, Callable, Collection, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch.nn as nn
from timm.models import PretrainedCfg, get_pretrained_cfg, register_model

from ..functional import METHODS
from ._head import GCP_POOL, head_kind, head_names
from ._zoo_cfgs import BACKBONE_TAGS, FULL_TAGS

__all__ = [
    'PAPER_IDS', 'PAPER_NAME', 'ORIGIN_URL', 'HEAD_PREFIXES', 'TIMM_WEIGHT_FIELDS', 'build_cfgs', 'check_gcp_args',
    'register_gcp_models', 'gcp_archs', 'head_cfg_fields', 'timm_weight_fields', 'with_fresh_head']

_logger = logging.getLogger(__name__)

PAPER_IDS = 'arXiv:2105.02498'
PAPER_NAME = 'Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?'
ORIGIN_URL = 'https://github.com/KingJamesSong/DifferentiableSVD'
_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))

# The PretrainedCfg fields a backbone-only tag takes from timm's cfg of its source model: where the weights are and
# how the images they were trained on were fed. The architecture's own fields (first_conv, classifier, pool_size) stay
# the GCP model's.
TIMM_WEIGHT_FIELDS = (
    'hf_hub_id', 'hf_hub_filename', 'num_classes', 'label_offset', 'license', 'origin_url', 'paper_ids',
    'input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct',
    'test_crop_pct', 'crop_mode', 'mean', 'std')


def check_gcp_args(
        global_pool: str,
        gcp_method: str,
        gcp_dim: Optional[int],
        gcp_kwargs: Optional[Mapping[str, Any]],
) -> None:
    """Validate the GCP arguments every GCP model takes, before anything is built (a typo should not cost a
    backbone build).

    Raises:
        ValueError: ``global_pool`` is neither 'gcp' nor ''; ``gcp_dim`` is not a positive int, 0 or None; a
            ``gcp_method`` that is neither a square-root method nor a head (``HEAD_KINDS``), or an option it does not
            take.
        TypeError: ``gcp_kwargs`` is not a dict of options.
    """
    if global_pool not in (GCP_POOL, ''):
        raise ValueError(f"global_pool must be '{GCP_POOL}' (covariance pooling) or '' (none), got {global_pool!r}")
    if gcp_dim is not None and (isinstance(gcp_dim, bool) or not isinstance(gcp_dim, int) or gcp_dim < 0):
        raise ValueError(f'gcp_dim must be a positive int (0 or None: no reduction), got {gcp_dim!r}')
    if gcp_kwargs is not None and not isinstance(gcp_kwargs, dict):
        raise TypeError(f'gcp_kwargs must be a dict of method options, got {type(gcp_kwargs).__name__}')
    head_kind(gcp_method).check(gcp_method, gcp_kwargs)


def timm_weight_fields(timm_cfg: Union[str, PretrainedCfg]) -> Dict[str, Any]:
    """The :data:`TIMM_WEIGHT_FIELDS` of timm's pretrained cfg ``timm_cfg`` or of the one timm registers under that
    name (``'<arch>.<tag>'``).

    Raises:
        ValueError: timm has no pretrained cfg with weights under that name.
    """
    cfg = timm_cfg
    if isinstance(timm_cfg, str):
        try:
            cfg = get_pretrained_cfg(timm_cfg)
        except RuntimeError:  # timm: an invalid tag of a known architecture
            cfg = None
        if cfg is None or not cfg.has_weights:
            raise ValueError(f'timm has no pretrained weights named {timm_cfg!r} (see timm.list_pretrained())')
    src = cfg.to_dict()
    return {k: src[k] for k in TIMM_WEIGHT_FIELDS if src.get(k) not in (None, '')}


def build_cfgs(
        archs: Iterable[str],
        family_of: Mapping[str, str],
        make_cfg: Callable[..., Dict[str, Any]],
        full_tags: Mapping[str, Mapping[str, Mapping[str, Any]]] = FULL_TAGS,
        backbone_tags: Mapping[str, Mapping[str, Mapping[str, Any]]] = BACKBONE_TAGS,
) -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': cfg}`` for ``generate_default_cfgs``.

    Full-model tags (``full_tags[arch][tag]``: PretrainedCfg fields) come first, so trained weights become the
    default; then the family's backbone-only tags (``backbone_tags[family][tag]``: ``timm_model`` and our own fields
    such as ``notes``), each made of :func:`timm_weight_fields` of ``timm_model`` and our fields. Each is overlaid on
    ``make_cfg(arch)``; an architecture with no tag gets one untagged cfg without weights. Fields that
    ``PretrainedCfg`` does not have are skipped with a log line; the weights' own ``paper_ids`` join the GCP paper's.
    """
    out = {}
    for arch in archs:
        merged = {tag: dict(fields) for tag, fields in full_tags.get(arch, {}).items()}
        for tag, ours in backbone_tags.get(family_of[arch], {}).items():
            fields = {k: v for k, v in ours.items() if k != 'timm_model'}
            merged.setdefault(tag, {**timm_weight_fields(ours['timm_model']), **fields})
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


def gcp_archs(families: Iterable[str], token_families: Collection[str] = ()) -> Dict[str, str]:
    """``{'<family>_<head>': family}`` for every family and every model-name token of ``head_names`` (the token-only
    heads, SoT, for ``token_families`` only)."""
    return {f'{family}_{name}': family for family in families for name in head_names(family in token_families)}


def head_cfg_fields(arch: str) -> Dict[str, str]:
    """The paper fields of a cfg of ``<family>_<head>`` for a head other than the covariance root (which cites the GCP
    paper): that head's paper and reference code; empty for the root heads."""
    kind = head_kind(arch.rpartition('_')[2])
    if not kind.paper_ids:
        return {}
    return {'paper_ids': kind.paper_ids, 'paper_name': kind.paper_name, 'origin_url': kind.origin_url}


def register_gcp_models(
        module_name: str,
        families: Mapping[str, Tuple[Dict[str, Any], str]],
        create_fn: Callable[..., nn.Module],
        token_families: Collection[str] = (),
) -> Dict[str, Callable[..., nn.Module]]:
    """Register ``<family>_<head>`` with timm for every family: every method of ``timm_gcp.METHODS`` (the
    covariance-root head) and every other head kind of ``HEAD_KINDS`` (``dropcov``; ``sot`` for ``token_families``).

    Each entrypoint calls ``create_fn(name, pretrained, **family_args, **head defaults, gcp_method=<token>,
    **kwargs)`` (a user's ``gcp_method`` wins, which is how an exported config rebuilds a model after the hybrid
    switch; the head kind's ``model_defaults``, e.g. DropCov's ``gcp_dim=128``, yield to the user's arguments). The
    entrypoints are set as attributes of ``module_name``, whose ``default_cfgs`` must already hold their cfgs (timm's
    ``register_model`` reads them from there).

    Args:
        module_name: the model module (``__name__``); timm lists the models under its last component.
        families: family (``<backbone>_gcp``) → (its model args, a few words naming the backbone).
        create_fn: ``_create_<family>(variant, pretrained, **kwargs)`` around ``build_model_with_cfg``.
        token_families: the families whose backbone hands its head tokens (they also get the token-only heads).

    Returns:
        name → registered entrypoint.
    """
    module = sys.modules[module_name]
    out = {}
    for family, (model_args, what) in families.items():
        for method in head_names(family in token_families):
            fn = _make_entrypoint(f'{family}_{method}', module_name, create_fn, model_args, method, what)
            setattr(module, fn.__name__, register_model(fn))
            out[fn.__name__] = fn
    return out


def _make_entrypoint(
        name: str,
        module_name: str,
        create_fn: Callable[..., nn.Module],
        model_args: Mapping[str, Any],
        method: str,
        what: str,
) -> Callable[..., nn.Module]:
    kind = head_kind(method)
    defaults = dict(kind.model_defaults)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_fn(name, pretrained, **{**model_args, **defaults, 'gcp_method': method, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module_name
    if method in METHODS:
        entrypoint.__doc__ = f'{what} with covariance pooling, matrix square root by {METHODS[method].paper_name}.'
    else:
        entrypoint.__doc__ = f'{what} with a {method} head: {kind.paper}.'
    return entrypoint


HEAD_PREFIXES = ('global_pool.', 'pre_logits.', 'fc.')  # the parameters of the GCP head in every GCP model


def with_fresh_head(backbone: Dict[str, Any], model: nn.Module, source: str) -> Dict[str, Any]:
    """``backbone`` (state-dict entries of the backbone only) completed with ``model``'s own, freshly initialised
    head tensors, so a strict load keeps the head as built; logs which modules stay fresh and marks the model
    (``_gcp_head_fresh``) for :func:`timm_gcp.models._head.note_fresh_head`."""
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    modules = sorted({k.rsplit('.', 1)[0] for k in fresh})
    _logger.info(f'Loaded backbone weights from {source}; GCP head freshly initialised ({", ".join(modules)})')
    model._gcp_head_fresh = True
    return {**backbone, **fresh}
