"""The pretrained registry (``zoo/registry.yaml``): loading, validation and the views generated from it.

The registry is the one source of truth for which weights exist. ``scripts/gen_zoo.py`` turns it into
``timm_gcp/models/_zoo_cfgs.py`` (``FULL_TAGS[arch][tag] -> PretrainedCfg fields`` for full-model weights,
``BACKBONE_TAGS[family][tag] -> timm_model + notes`` for backbone-only weights) and ``MODEL_CARDS.md``;
``timm-gcp-publish`` adds entries after a push. A backbone-only entry holds only what timm does not know (the timm
model whose weights the backbone loads, where they come from, which layers stay fresh, citations): its hub id, input
size, interpolation, crop, mean, std and license are timm's own pretrained cfg of ``source.timm_model``, read when
the models are registered. Only entries with weights that can be downloaded
(``hf_hub_id``) become pretrained cfgs; ``conversion_targets`` document official checkpoints that
``scripts/convert_official.py`` converts, with the numbers their authors report, and never become cfgs.

The file is written by :func:`save_registry` only (a fixed header + ``yaml.safe_dump``), so a programmatic update
loses nothing: there are no free comments, everything lives in ``description``/``notes`` fields.
"""
import copy
import dataclasses
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import yaml
from timm.models import PretrainedCfg

from .models._cfg_utils import timm_weight_fields
from .models.naming import parse_gcp_name

__all__ = [
    'REGISTRY_PATH', 'REGISTRY_HEADER', 'RegistryError', 'load_registry', 'validate_registry', 'dump_registry',
    'save_registry', 'pretrained_tags', 'render_zoo_cfgs', 'render_model_cards', 'write_generated',
    'family_archs', 'arch_family', 'upsert_pretrained', 'PRETRAINED_CFG_FIELDS', 'backbone_notes',
]

_logger = logging.getLogger(__name__)

REGISTRY_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'zoo', 'registry.yaml')

REGISTRY_HEADER = (
    '# timm-gcp pretrained registry: the one source of truth for published weights.\n'
    '# Regenerate timm_gcp/models/_zoo_cfgs.py and MODEL_CARDS.md after editing: python scripts/gen_zoo.py\n'
    '# (python scripts/gen_zoo.py --check fails when they are stale). This file is rewritten by tools\n'
    '# (gen_zoo.py --measure, timm-gcp-publish): put explanations in description/notes fields, not in comments.\n'
)

# timm.models.PretrainedCfg fields a registry cfg may set (checked against timm at validation time).
PRETRAINED_CFG_FIELDS = (
    'hf_hub_id', 'hf_hub_filename', 'input_size', 'test_input_size', 'min_input_size', 'fixed_input_size',
    'interpolation', 'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'num_classes', 'label_offset',
    'pool_size', 'test_pool_size', 'first_conv', 'classifier', 'license', 'description', 'origin_url', 'paper_name',
    'paper_ids', 'notes',
)
_TUPLE_FIELDS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size')
_WEIGHTS_KINDS = ('backbone-only', 'full')
_SOURCE_KINDS = ('timm-backbone', 'converted', 'trained')
_TAG_RE = re.compile(r'^[a-z0-9][a-z0-9_]*$')
_HUB_ID_RE = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+(@[0-9a-f]{40})?$')
_SHA_RE = re.compile(r'^[0-9a-f]{40}$')


class RegistryError(ValueError):
    """The registry file is malformed; the message names the entry and the field."""


def load_registry(path: Optional[str] = None) -> Dict[str, Any]:
    """Read and validate the registry.

    Args:
        path: registry file; defaults to the checkout's ``zoo/registry.yaml``.

    Returns:
        The registry as plain dicts/lists (``safe_load``: no Python objects are constructed).
    """
    path = path or REGISTRY_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f'registry file not found: {path} (the zoo registry lives in a source checkout)')
    with open(path, encoding='utf-8') as f:
        data = yaml.safe_load(f)
    validate_registry(data)
    return data


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise RegistryError(msg)


def validate_registry(data: Any) -> None:
    """Check the registry's structure and cross-references; raise :class:`RegistryError` naming the problem."""
    _require(isinstance(data, dict), 'registry must be a mapping')
    for key in ('schema', 'methods', 'families', 'citations', 'pretrained', 'conversion_targets'):
        _require(key in data, f'registry: missing top-level key {key!r}')
    _require(data['schema'] == 1, f'registry: unsupported schema {data["schema"]!r} (expected 1)')
    methods = data['methods']
    _require(isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods),
             'registry: methods must be a non-empty list of names')
    _require(len(set(methods)) == len(methods), 'registry: duplicate method names')
    fam_names = _validate_families(data['families'])
    _require(isinstance(data['citations'], dict), 'registry: citations must be a mapping key -> BibTeX')
    timm_fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    seen = set()
    for i, entry in enumerate(data['pretrained'] or []):
        key = _validate_pretrained_entry(i, entry, data, fam_names, timm_fields)
        _require(key not in seen, f'registry: duplicate pretrained entry {key[0]}.{key[1]}')
        seen.add(key)
    for i, entry in enumerate(data['conversion_targets'] or []):
        _validate_conversion_target(i, entry, data)
    for i, head in enumerate(data.get('heads') or []):
        _validate_head(i, head, data)
    measured = data.get('measured')
    if measured is not None:
        _require(isinstance(measured, dict) and 'command' in measured and 'archs' in measured,
                 'registry: measured must hold command and archs')
        for arch in measured['archs']:
            _require(arch_family(arch, data) is not None, f'registry: measured arch {arch!r} is unknown')


def _validate_families(families: Any) -> set:
    """Check the family list; returns the family names."""
    _require(isinstance(families, list) and families, 'registry: families must be a non-empty list')
    fam_names = set()
    for fam in families:
        _require(isinstance(fam, dict) and 'name' in fam, f'registry: family entry without a name: {fam!r}')
        name = fam['name']
        for key in ('backbone', 'description', 'input_size'):
            _require(key in fam, f'registry: family {name!r} misses {key!r}')
        _require(name.endswith('_gcp'), f'registry: family name {name!r} must end in "_gcp"')
        _require(name not in fam_names, f'registry: duplicate family {name!r}')
        fam_names.add(name)
    return fam_names


def _validate_pretrained_entry(i: int, entry: Any, data: Mapping[str, Any], fam_names: set,
                               timm_fields: set) -> tuple:
    """Check one ``pretrained`` entry; returns its ``(applies_to, tag)`` key."""
    where = f'pretrained[{i}]'
    _require(isinstance(entry, dict), f'registry: {where} must be a mapping')
    for key in ('tag', 'applies_to', 'weights', 'source'):
        _require(key in entry, f'registry: {where} misses {key!r}')
    tag, target = entry['tag'], entry['applies_to']
    where = f'pretrained[{i}] ({target}.{tag})'
    _require(isinstance(tag, str) and bool(_TAG_RE.match(tag)), f'registry: {where}: bad tag {tag!r}')
    _require(entry['weights'] in _WEIGHTS_KINDS,
             f'registry: {where}: weights must be one of {_WEIGHTS_KINDS}, got {entry["weights"]!r}')
    src = entry['source']
    _require(isinstance(src, dict) and src.get('kind') in _SOURCE_KINDS,
             f'registry: {where}: source.kind must be one of {_SOURCE_KINDS}')
    if entry['weights'] == 'backbone-only':
        _require(target in fam_names, f'registry: {where}: backbone-only weights apply to a family, '
                                      f'{target!r} is not one of {sorted(fam_names)}')
        _validate_backbone_entry(where, entry, data)
        return target, tag
    _require(arch_family(target, data) is not None, f'registry: {where}: {target!r} is not <family>_<method> for '
                                                    f'a known family and method')
    for key in ('license', 'cfg', 'metrics'):
        _require(key in entry, f'registry: {where} misses {key!r}')
    _validate_cfg(where, entry, timm_fields)
    _require(isinstance(entry['metrics'], list), f'registry: {where}: metrics must be a list')
    for j, m in enumerate(entry['metrics']):
        _require(isinstance(m, dict), f'registry: {where}: metrics[{j}] must be a mapping')
        for key in ('dataset', 'top1', 'top5', 'command'):
            _require(key in m, f'registry: {where}: metrics[{j}] misses {key!r} (metrics need their command)')
    return target, tag


def _validate_backbone_entry(where: str, entry: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """A backbone-only entry names a timm model with weights and keeps nothing of timm's cfg."""
    copied = sorted(k for k in ('cfg', 'license', 'metrics') if k in entry)
    _require(not copied, f'registry: {where}: a backbone-only tag takes its cfg and license from timm\'s pretrained '
                         f'cfg of source.timm_model and claims no metrics: remove {copied}')
    src = entry['source']
    _require(src['kind'] == 'timm-backbone', f'registry: {where}: backbone-only weights need source.kind timm-backbone')
    for key in ('timm_model', 'origin'):
        _require(isinstance(src.get(key), str) and src[key], f'registry: {where}: source.{key} is missing')
    try:
        timm_cfg = timm_weight_fields(src['timm_model'])
    except ValueError as e:
        raise RegistryError(f'registry: {where}: source.timm_model: {e}') from None
    backbone = next(f['backbone'] for f in data['families'] if f['name'] == entry['applies_to'])
    _require(src['timm_model'].split('.', 1)[0] == backbone,
             f'registry: {where}: source.timm_model {src["timm_model"]!r} is not a {backbone} (the family\'s backbone)')
    _require(not (src.get('origin_url') and timm_cfg.get('origin_url')),
             f'registry: {where}: source.origin_url repeats what timm\'s cfg of {src["timm_model"]} already has')
    fresh = entry.get('fresh')
    _require(isinstance(fresh, list) and fresh and all(isinstance(m, str) for m in fresh),
             f'registry: {where}: fresh must list the freshly initialised modules (e.g. [global_pool.conv, fc])')


def _validate_cfg(where: str, entry: Mapping[str, Any], timm_fields: set) -> None:
    cfg = entry['cfg']
    _require(isinstance(cfg, dict), f'registry: {where}: cfg must be a mapping')
    bad = sorted(set(cfg) - set(PRETRAINED_CFG_FIELDS))
    _require(not bad, f'registry: {where}: cfg fields not allowed: {bad}')
    bad = sorted(set(cfg) - timm_fields)
    _require(not bad, f'registry: {where}: cfg fields unknown to timm PretrainedCfg: {bad}')
    hub_id = cfg.get('hf_hub_id')
    _require(isinstance(hub_id, str) and bool(_HUB_ID_RE.match(hub_id)),
             f'registry: {where}: cfg.hf_hub_id must be "org/repo" or "org/repo@<40-hex commit>", got {hub_id!r}')
    if entry['weights'] == 'full':
        # Our own uploads are pinned to the commit the push returned; nothing unpinned can change under users.
        _require('@' in hub_id, f'registry: {where}: full-model weights must pin a revision (org/repo@<commit>)')
    _require(isinstance(cfg.get('num_classes'), int) and cfg['num_classes'] >= 0,
             f'registry: {where}: cfg.num_classes must be a non-negative int')
    _require(cfg.get('license') == entry['license'], f'registry: {where}: cfg.license must equal license')


def _validate_head(i: int, head: Any, data: Mapping[str, Any]) -> None:
    where = f'heads[{i}]'
    _require(isinstance(head, dict), f'registry: {where} must be a mapping')
    for key in ('name', 'models', 'description', 'origin_url', 'citation', 'reported'):
        _require(key in head, f'registry: {where} misses {key!r}')
    _require(head['citation'] in data['citations'], f'registry: {where}: unknown citation {head["citation"]!r}')
    for j, r in enumerate(head['reported']):
        for key in ('model', 'ours', 'baseline_top1', 'top1'):
            _require(key in r, f'registry: {where}: reported[{j}] misses {key!r}')


def _validate_conversion_target(i: int, entry: Any, data: Mapping[str, Any]) -> None:
    where = f'conversion_targets[{i}]'
    _require(isinstance(entry, dict), f'registry: {where} must be a mapping')
    for key in ('name', 'arch', 'layout', 'origin_url', 'reported'):
        _require(key in entry, f'registry: {where} misses {key!r}')
    _require(arch_family(entry['arch'], data) is not None,
             f'registry: {where}: arch {entry["arch"]!r} is not <family>_<method>')
    for j, r in enumerate(entry['reported']):
        for key in ('dataset', 'top1_err', 'top5_err', 'reported_by'):
            _require(key in r, f'registry: {where}: reported[{j}] misses {key!r}')


def family_archs(family: str, data: Mapping[str, Any]) -> List[str]:
    """Every architecture name a family may have: ``<family>_<method>`` for each registry method and
    ``<family>_<head>`` for each head of ``heads`` (SoT exists on token families only: filter by ``timm.is_model``)."""
    return [f'{family}_{m}' for m in data['methods']] + [f'{family}_{h["name"]}' for h in data.get('heads') or []]


def arch_family(arch: str, data: Mapping[str, Any]) -> Optional[str]:
    """The family of ``<family>_<method>``, or None when ``arch`` is not one of the registry's architectures."""
    try:
        name = parse_gcp_name(arch)
    except ValueError:  # a method timm_gcp does not have
        return None
    if name is None or name.tag or name.method not in data['methods']:
        return None
    return name.family if any(fam['name'] == name.family for fam in data['families']) else None


def _cfg_value(key: str, value: Any) -> Any:
    if key in _TUPLE_FIELDS and isinstance(value, list):
        return tuple(value)
    return value


def backbone_notes(entry: Mapping[str, Any]) -> str:
    """The ``notes`` of a backbone-only tag: whose weights the backbone loads and which layers stay fresh."""
    src = entry['source']
    return (f'Backbone-only: weights of timm {src["timm_model"]} ({src["origin"]}); the GCP head '
            f'({", ".join(entry["fresh"])}) is freshly initialised, so fine-tune before use.')


def _backbone_own_fields(entry: Mapping[str, Any]) -> Dict[str, Any]:
    """What a backbone-only tag adds to timm's cfg of its source model (the generated ``BACKBONE_TAGS`` value)."""
    own = {'timm_model': entry['source']['timm_model']}
    if entry['source'].get('origin_url'):
        own['origin_url'] = entry['source']['origin_url']
    own['notes'] = backbone_notes(entry)
    return own


def pretrained_tags(data: Mapping[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``{family_or_arch: {tag: PretrainedCfg fields}}`` for every published entry, in registry order.

    The first tag of a key is timm's default tag for it. Full-model entries give their own cfg (tuple-valued fields
    such as sizes and mean/std become tuples); backbone-only entries give timm's weight and preprocessing fields of
    ``source.timm_model`` with our own fields (notes, origin_url) over them, as the models register them.
    """
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for entry in data['pretrained'] or []:
        if entry['weights'] == 'backbone-only':
            own = _backbone_own_fields(entry)
            cfg = {**timm_weight_fields(own.pop('timm_model')), **own}
        else:
            cfg = {k: _cfg_value(k, v) for k, v in entry['cfg'].items()}
        out.setdefault(entry['applies_to'], {})[entry['tag']] = cfg
    return out


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for short scalar lists, literal blocks for multi-line text, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    flow = all(isinstance(v, (int, float, str, bool)) or v is None for v in value) and len(value) <= 12
    return dumper.represent_sequence('tag:yaml.org,2002:seq', value, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if '\n' in value:
        return dumper.represent_scalar('tag:yaml.org,2002:str', value, style='|')
    return dumper.represent_scalar('tag:yaml.org,2002:str', value)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)
_Dumper.add_representer(str, _represent_str)


def dump_registry(data: Mapping[str, Any]) -> str:
    """The canonical text of a registry (what :func:`save_registry` writes)."""
    return REGISTRY_HEADER + yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, width=118, allow_unicode=True, default_flow_style=False)


def save_registry(data: Mapping[str, Any], path: Optional[str] = None) -> None:
    """Validate and write the registry atomically."""
    validate_registry(data)
    path = path or REGISTRY_PATH
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(dump_registry(data))
    os.replace(tmp, path)
    _logger.info('wrote %s', path)


def upsert_pretrained(data: Dict[str, Any], entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Return a copy of ``data`` with ``entry`` added, replacing an entry with the same ``applies_to`` and ``tag``."""
    new = copy.deepcopy(data)
    entries = list(new.get('pretrained') or [])
    key = (entry['applies_to'], entry['tag'])
    for i, old in enumerate(entries):
        if (old['applies_to'], old['tag']) == key:
            entries[i] = dict(entry)
            break
    else:
        entries.append(dict(entry))
    new['pretrained'] = entries
    validate_registry(new)
    return new


# ---------------------------------------------------------------------------------------------------------------------
# Generated views: timm_gcp/models/_zoo_cfgs.py and MODEL_CARDS.md

ZOO_CFGS_DOC = (
    '"""Pretrained tags per architecture. GENERATED from zoo/registry.yaml by scripts/gen_zoo.py; do not edit.\n\n'
    'What the two tables hold: ``timm_gcp.zoo.render_zoo_cfgs``.\n"""\n')


def _literal(value: Any, indent: int = 0) -> str:
    """Python source of plain dicts, tuples, strings and numbers, one key per line, long strings wrapped."""
    pad = ' ' * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return '{}'
        items = ''.join(f'{pad}{k!r}: {_literal(v, indent + 4)},\n' for k, v in value.items())
        return '{\n' + items + ' ' * indent + '}'
    text = repr(value)
    if isinstance(value, str) and len(text) + indent > 100:
        import textwrap
        parts = textwrap.wrap(value, 100 - indent, drop_whitespace=False, break_on_hyphens=False)
        return '(\n' + ''.join(f'{pad}{p!r}\n' for p in parts) + ' ' * indent + ')'
    return text


def render_zoo_cfgs(data: Mapping[str, Any]) -> str:
    """Source text of ``timm_gcp/models/_zoo_cfgs.py``.

    ``FULL_TAGS[arch][tag]``: timm ``PretrainedCfg`` fields of full-model weights (the GCP head trained too), under
    the exact architecture name (``resnet50_gcp_pade``). ``BACKBONE_TAGS[family][tag]``: backbone-only weights for
    every ``<family>_<head>``; ``timm_model`` names the timm pretrained model whose weights the backbone loads, and
    its cfg (hub id, input size, interpolation, crop, mean, std, license) is timm's own, read when the models are
    registered; the rest (notes, origin URL) is ours. The GCP head of a backbone-only tag is freshly initialised. The
    first tag of each key is the default tag. A family whose tags are those of an earlier family (the stride-1
    ResNets load the weights of the stride-2 ones) is written as that family's entry, not as a second copy.
    """
    full: Dict[str, Dict[str, Any]] = {}
    backbone: Dict[str, Dict[str, Any]] = {}
    for entry in data['pretrained'] or []:
        if entry['weights'] == 'backbone-only':
            backbone.setdefault(entry['applies_to'], {})[entry['tag']] = _backbone_own_fields(entry)
        else:
            cfg = {k: _cfg_value(k, v) for k, v in entry['cfg'].items()}
            full.setdefault(entry['applies_to'], {})[entry['tag']] = cfg
    unique: Dict[str, Dict[str, Any]] = {}
    same_as: Dict[str, str] = {}  # family -> the earlier family whose tags it has
    for family, tags in backbone.items():
        first = next((f for f, t in unique.items() if t == tags), None)
        if first is None:
            unique[family] = tags
        else:
            same_as[family] = first
    text = (f"{ZOO_CFGS_DOC}__all__ = ['FULL_TAGS', 'BACKBONE_TAGS']\n\nFULL_TAGS = {_literal(full)}\n\n"
            f'BACKBONE_TAGS = {_literal(unique)}\n')
    if same_as:
        text += '\n# the same weights as the family named on the right\n'
        text += ''.join(f'BACKBONE_TAGS[{f!r}] = BACKBONE_TAGS[{first!r}]\n' for f, first in same_as.items())
    return text


def _fmt_num(value: Optional[float], digits: int = 2) -> str:
    return '—' if value is None else f'{value:.{digits}f}'


def _hub_link(hub_id: str) -> str:
    repo, _, rev = hub_id.partition('@')
    url = f'https://huggingface.co/{repo}' + (f'/tree/{rev}' if rev else '')
    return f'[`{hub_id if not rev else repo + "@" + rev[:10]}`]({url})'


def render_model_cards(data: Mapping[str, Any]) -> str:
    """Text of ``MODEL_CARDS.md``: architectures with measured size/cost, published tags, conversion targets."""
    entries = data['pretrained'] or []
    lines = _cards_intro() + _cards_architectures(data) + ['## Pretrained tags', '']
    lines += _cards_full_weights([e for e in entries if e['weights'] == 'full'])
    lines += _cards_backbone_weights(data)
    lines += _cards_conversion_targets(data) + _cards_heads(data) + _cards_citations(data)
    return '\n'.join(lines).rstrip() + '\n'


def _cards_intro() -> List[str]:
    return [
        '# timm-gcp model cards',
        '',
        '<!-- GENERATED from zoo/registry.yaml by scripts/gen_zoo.py; do not edit. -->',
        '',
        'Every `*_gcp_*` model is registered with timm by `import timm_gcp`. A tag is listed as pretrained only',
        'when its weights can be downloaded; metrics appear only when measured here (with the command) or cited',
        'with their source. Usage:',
        '',
        '```python',
        'import timm_gcp  # registers the models; import it before timm.create_model',
        'import timm',
        "model = timm.create_model('resnet50_gcp_pade.tv_in1k', pretrained=True, num_classes=200)",
        '```',
        '',
        '## Architectures',
        '',
    ]


def _cards_architectures(data: Mapping[str, Any]) -> List[str]:
    """The table of families with the measured parameter counts and GFLOPs of every method."""
    methods = data['methods']
    measured = data.get('measured') or {}
    archs = measured.get('archs', {})
    lines: List[str] = []
    if measured:
        lines += [
            f'Parameters and GFLOPs per image at the default input size (1000 classes), measured by '
            f'`{measured["command"]}` ({measured.get("counter", "")}; torch {measured.get("torch", "?")}, '
            f'timm {measured.get("timm", "?")}). {measured.get("note", "")}'.rstrip(),
            '',
        ]
    else:
        lines += ['Parameters and GFLOPs: not measured yet (run `python scripts/gen_zoo.py --measure`).', '']
    header = '| family | backbone | input | params (M) | ' + ' | '.join(f'GFLOPs `{m}`' for m in methods) + ' |'
    lines += [header, '|' + '---|' * (4 + len(methods))]
    for fam in data['families']:
        name = fam['name']
        params = [archs.get(f'{name}_{m}', {}).get('params_m') for m in methods]
        known = sorted({p for p in params if p is not None})
        p_txt = '—' if not known else ' / '.join(_fmt_num(p) for p in known)
        flops = [_fmt_num(archs.get(f'{name}_{m}', {}).get('gflops')) for m in methods]
        size = 'x'.join(str(s) for s in fam['input_size'][1:])
        lines.append(f'| `{name}_<method>` | {fam["backbone"]} | {size} | {p_txt} | ' + ' | '.join(flops) + ' |')
    lines += ['', 'Families: ' + '; '.join(f'`{f["name"]}`: {f["description"]}' for f in data['families']) + '.', '']
    return lines


def _cards_full_weights(full: List[Mapping[str, Any]]) -> List[str]:
    lines = ['### Full-model weights', '']
    if not full:
        lines += ['None published yet. Converted official checkpoints and our trained models are added by',
                  '`timm-gcp-publish` once their weights are on the Hub.', '']
    else:
        lines += ['| model | weights | source | license | metrics (measured here) |', '|---|---|---|---|---|']
        for e in full:
            metrics = '<br>'.join(
                f'{m["dataset"]}: top-1 {m["top1"]:.2f}, top-5 {m["top5"]:.2f} (`{m["command"]}`)'
                for m in e['metrics']) or '—'
            src = e['source'].get('description') or e['source']['kind']
            if e['source'].get('recipe'):
                src += f' (recipe `{e["source"]["recipe"]}`)'
            if e['source'].get('model_args'):
                src += '; model args ' + ', '.join(f'`{k}={v!r}`' for k, v in e['source']['model_args'].items())
            lines.append(f'| `{e["applies_to"]}.{e["tag"]}` | {_hub_link(e["cfg"]["hf_hub_id"])} | {src} | '
                         f'{e["license"]} | {metrics} |')
        lines.append('')
    return lines


def _cards_backbone_weights(data: Mapping[str, Any]) -> List[str]:
    lines = ['### Backbone-only weights (GCP head freshly initialised)', '',
             'These tags load a timm ImageNet backbone; the GCP head (`global_pool.conv`, `global_pool.bn`,',
             '`fc`) is newly initialised, so the model must be fine-tuned (the paper\'s fine-grained experiments',
             'start from the torchvision weights, `tv_in1k`). No accuracy is claimed for them. The first tag of a',
             'family is its default. Weights, license, input size, interpolation, crop and normalisation are timm\'s',
             'own pretrained cfg of the backbone model named in the weights column.', '',
             '| models | tag | weights | backbone origin | license | input (train / test) | interpolation, crop |',
             '|---|---|---|---|---|---|---|']
    tags = pretrained_tags(data)
    for e in data['pretrained'] or []:
        if e['weights'] != 'backbone-only':
            continue
        cfg = tags[e['applies_to']][e['tag']]
        size = 'x'.join(str(s) for s in cfg['input_size'][1:])
        if cfg.get('test_input_size'):
            size += ' / ' + 'x'.join(str(s) for s in cfg['test_input_size'][1:])
        lines.append(f'| `{e["applies_to"]}_<method>` | `{e["tag"]}` | {_hub_link(cfg["hf_hub_id"])} | '
                     f'{e["source"]["origin"]} | {cfg.get("license", "—")} | {size} | '
                     f'{cfg.get("interpolation", "")}, {cfg.get("crop_pct", "")} |')
    lines += ['', f'`<method>` is any of: {", ".join(f"`{m}`" for m in data["methods"])}.', '']
    return lines


def _cards_conversion_targets(data: Mapping[str, Any]) -> List[str]:
    lines = ['## Conversion targets (official checkpoints, not published here)', '',
             '`python scripts/convert_official.py CHECKPOINT --output OUT.safetensors` converts these into our',
             'architectures. The numbers are **reported by their source, not measured here**; they become metrics of',
             'a tag only after a converted checkpoint is evaluated with `timm-gcp-validate` and published.', '',
             '| checkpoint | converts to | layout | reported top-1 / top-5 error (%) | reported by |',
             '|---|---|---|---|---|']
    for t in data['conversion_targets'] or []:
        for i, r in enumerate(t['reported']):
            name = f'[{t["name"]}]({t["origin_url"]})' if i == 0 else '〃'
            lines.append(f'| {name} | `{t["arch"]}` | {t["layout"]} | {r["top1_err"]:.2f} / {r["top5_err"]:.2f} '
                         f'({r["dataset"]}) | {r["reported_by"]} |')
    return lines


def _cards_heads(data: Mapping[str, Any]) -> List[str]:
    """The heads without a matrix root (DropCov, SoT): what they are and the numbers their papers report."""
    heads = data.get('heads') or []
    if not heads:
        return []
    lines = ['', '## Other second-order heads (no weights published; numbers reported by their papers)', '',
             '| head | models | reported ImageNet top-1 (%), baseline → head | our model | params (M), reported |',
             '|---|---|---|---|---|']
    for h in heads:
        for i, r in enumerate(h['reported']):
            name = f'[`{h["name"]}`]({h["origin_url"]})' if i == 0 else '〃'
            models = h['models'] if i == 0 else '〃'
            ours = f'`{r["ours"]}`' if r.get('ours') else '—'
            lines.append(f'| {name} | {models} | {r["model"]}: {r["baseline_top1"]} → {r["top1"]} | {ours} | '
                         f'{_fmt_num(r.get("params_m"), 1)} |')
    lines += [''] + [f'- `{h["name"]}`: {h["description"]}.' for h in heads]
    lines += ['', 'A family\'s backbone-only tags load the backbone of its `_dropcov`/`_sot` models too (the head '
              'stays fresh).']
    return lines


def _cards_citations(data: Mapping[str, Any]) -> List[str]:
    lines = ['', '## Citations', '']
    for key, bib in data['citations'].items():
        lines += ['```bibtex', bib.rstrip(), '```', '']
    return lines


def write_generated(data: Mapping[str, Any], root: str) -> List[str]:
    """Write ``timm_gcp/models/_zoo_cfgs.py`` and ``MODEL_CARDS.md`` under the checkout ``root``; return the paths."""
    outputs = {os.path.join(root, 'timm_gcp', 'models', '_zoo_cfgs.py'): render_zoo_cfgs(data),
               os.path.join(root, 'MODEL_CARDS.md'): render_model_cards(data)}
    for path, text in outputs.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        _logger.info('wrote %s', path)
    return list(outputs)
