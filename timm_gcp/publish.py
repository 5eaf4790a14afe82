"""Publish timm-gcp checkpoints to the Hugging Face Hub: ``timm-gcp-publish``.

::

    timm-gcp-publish output/train/model_best.pth.tar --repo-id ORG/resnet50_gcp_pade.in1k --tag in1k \\
        --data-dir /data/imagenet [--model resnet50_gcp_pade] [--dry-run]

Steps: load the checkpoint safely (``torch.load(weights_only=True)``, or safetensors) and strictly into the named
architecture; evaluate it with :mod:`timm_gcp.validate` when ``--data-dir`` is given; write the Hub folder with
timm's own ``save_for_hf`` (``model.safetensors``, ``config.json`` with ``model_args.gcp_method``) and a model card
``README.md`` made by timm's ``generate_readme``; check that the folder loads back (``local-dir:``) with identical
logits. Without ``--dry-run`` it uploads that checked folder (huggingface_hub's ``create_repo`` + ``upload_folder``;
a republish replaces the model card too), then pins the registry entry to the commit the upload returned and
regenerates ``_zoo_cfgs.py`` and ``MODEL_CARDS.md``.

The output folder is never allowed to clobber files this tool did not write: a non-empty folder is refused unless
its marker file lists every file in it.
"""
import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import zoo
from ._compat import generate_readme
from .checkpoint import CheckpointError
from .checkpoint_model import checkpoint_data_config, create_model_from_checkpoint, model_gcp_method, resolve_arch
from .cli import add_eval_args, data_dir_error, error_message, eval_args_error, setup_cli_logging
from .validate import validate

__all__ = [
    'MARKER', 'prepare_output_dir', 'build_model_card', 'export_pretrained_cfg', 'export_folder', 'registry_entry',
    'publish', 'main']

_logger = logging.getLogger(__name__)

MARKER = '.timm-gcp-publish.json'
_HUB_FILES = ('model.safetensors', 'config.json', 'README.md')
# the papers a published model's card cites, by its method or head (the ICCV 2021 paper for every other method)
_CITATIONS_FOR_METHOD = {'isqrt': ['li2018towards', 'song2021approximate'], 'dropcov': ['wang2022dropcov'],
    'sot': ['xie2021sot']}


def prepare_output_dir(path: str) -> None:
    """Create ``path`` or make it reusable; refuse a folder holding files this tool did not write.

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without our marker, or with files the marker does
            not list (the message names them).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f'output path {path} exists and is not a folder')
    os.makedirs(path, exist_ok=True)
    present = sorted(os.listdir(path))
    if not present:
        return
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise FileExistsError(f'refusing to write into non-empty folder {path}: it was not created by '
                              f'timm-gcp-publish (no {MARKER}); found {", ".join(present[:10])}')
    try:
        with open(marker, encoding='utf-8') as f:
            ours = set(json.load(f)['files'])
    except (ValueError, KeyError, TypeError) as e:
        raise FileExistsError(f'refusing to write into {path}: unreadable marker {marker}') from e
    foreign = [p for p in present if p != MARKER and p not in ours]
    if foreign:
        raise FileExistsError(f'refusing to write into {path}: it holds files timm-gcp-publish did not write: '
                              f'{", ".join(foreign)}')
    for p in present:
        if p != MARKER:
            os.remove(os.path.join(path, p))


def _citations(method: Optional[str]) -> List[str]:
    keys = _CITATIONS_FOR_METHOD.get(method or '', ['song2021approximate'])
    try:
        cites = zoo.load_registry()['citations']
    except FileNotFoundError:
        return []
    return [cites[k] for k in keys if k in cites]


def build_model_card(
        repo_id: str,
        arch: str,
        method: Optional[str],
        num_classes: int,
        license: str,
        source: str,
        metrics: Sequence[Mapping[str, Any]],
        model_args: Mapping[str, Any],
        recipe: Optional[str] = None,
) -> Dict[str, Any]:
    """The ``model_card`` dict for timm's ``generate_readme`` (usage with ``import timm_gcp`` first)."""
    usage = (
        '```python\n'
        'import timm_gcp  # registers the GCP architectures with timm: import it before create_model\n'
        'import timm\n\n'
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        'cfg = timm.data.resolve_data_config(model=model)\n'
        'transform = timm.data.create_transform(**cfg)\n'
        '# logits = model(transform(pil_image).unsqueeze(0))\n'
        '```\n\n'
        'Needs the timm-gcp package installed: the architecture code lives in that timm plugin, not in timm.\n')
    if metrics:
        rows = '\n'.join(f'| {m["dataset"]} | {m["top1"]:.3f} | {m["top5"]:.3f} | {m.get("images", "")} | '
                         f'`{m["command"]}` |' for m in metrics)
        comparison = ('Measured by timm-gcp-validate on the data named below, with the command that produced the '
                      'numbers:\n\n| data | top-1 (%) | top-5 (%) | images | command |\n|---|---|---|---|---|\n'
                      + rows + '\n')
    else:
        comparison = 'Not evaluated: no metrics are claimed for these weights.\n'
    details = {
        'Model Type': 'Image classification, global covariance pooling (matrix square-root) head',
        'Architecture': f'`{arch}` (timm-gcp)',
        'Matrix square root': f'`{method}`' if method else 'n/a',
        'Classes': num_classes,
        'Weights': source,
        **({'Recipe': f'`{recipe}` (timm-gcp-train --config)'} if recipe else {}),
        'Papers': ['Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling? '
                   '(ICCV 2021): https://arxiv.org/abs/2105.02498'],
        'Code': 'timm-gcp',
    }
    if method == 'isqrt':
        details['Papers'].append('Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix '
                                 'Square Root Normalization (CVPR 2018): https://arxiv.org/abs/1712.01034')
    extra_args = {k: v for k, v in model_args.items() if k not in ('num_classes', 'in_chans', 'global_pool')}
    if extra_args:
        details['Model arguments'] = {k: json.dumps(v) for k, v in extra_args.items()}
    return dict(
        tags=['image-classification', 'timm', 'timm-gcp'], library_name='timm', license=license,
        description=f'`{arch}` with weights from {source}. Load it with `import timm_gcp` first.',
        details=details, usage=usage, comparison=comparison, citation=_citations(method))


def export_folder(
        model: torch.nn.Module,
        out_dir: str,
        make_card: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        model_args: Mapping[str, Any],
        pretrained_cfg: Mapping[str, Any],
        repo_name: str,
) -> Tuple[List[str], Dict[str, Any], Dict[str, Any]]:
    """Write ``model.safetensors``, ``config.json`` (timm's ``save_for_hf``) and ``README.md`` into ``out_dir``.

    Args:
        make_card: builds the ``generate_readme`` model-card dict from the written ``config.json``.
        model_args: the model's construction arguments (written as given; timm >= 1.0.31 also merges the ones its
            factory recorded, older timm writes only these).
        pretrained_cfg: the complete ``pretrained_cfg`` to write (see :func:`export_pretrained_cfg`): timm >= 1.0.31
            merges it into the model's, older timm writes it in place of the model's.

    Returns:
        (files written, config.json contents, model card dict).
    """
    from timm.models import save_for_hf
    prepare_output_dir(out_dir)
    # The marker goes first: an interrupted export leaves a folder this tool may clean up on the next run.
    with open(os.path.join(out_dir, MARKER), 'w', encoding='utf-8') as f:
        json.dump({'files': list(_HUB_FILES)}, f)
    save_for_hf(model, out_dir, model_config={'pretrained_cfg': dict(pretrained_cfg)}, model_args=dict(model_args),
                safe_serialization=True)
    with open(os.path.join(out_dir, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    card = dict(make_card(config))
    with open(os.path.join(out_dir, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(generate_readme(card, repo_name))
    files = sorted(p for p in os.listdir(out_dir) if p != MARKER)
    _apply_umask(out_dir, files + [MARKER])
    unexpected = sorted(set(files) - set(_HUB_FILES))
    if unexpected:
        raise RuntimeError(f'save_for_hf wrote unexpected files {unexpected} into {out_dir}')
    return files, config, card


def check_folder_loads(model: torch.nn.Module, out_dir: str) -> None:
    """Reload the folder through ``local-dir:`` and require identical logits (what a Hub user will get)."""
    import timm
    reloaded = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
    size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(x), reloaded(x)
    if not torch.equal(a, b):
        raise RuntimeError(f'{out_dir} does not reload to the same model (max logit difference '
                           f'{(a - b).abs().max().item():.3g})')


def _validate_config(cfg: Mapping[str, Any], arch: str, num_classes: int, method: Optional[str]) -> None:
    if cfg.get('architecture') != arch or cfg.get('num_classes') != num_classes:
        raise RuntimeError(f'config.json names {cfg.get("architecture")}/{cfg.get("num_classes")} classes, '
                           f'expected {arch}/{num_classes}')
    if method and cfg.get('model_args', {}).get('gcp_method') != method:
        raise RuntimeError(f'config.json model_args.gcp_method is {cfg.get("model_args", {}).get("gcp_method")!r}, '
                           f'expected {method!r}')


def registry_entry(
        arch: str,
        tag: str,
        hub_id: str,
        config: Mapping[str, Any],
        license: str,
        source_kind: str,
        source: str,
        metrics: Sequence[Mapping[str, Any]],
        method: Optional[str],
        recipe: Optional[str] = None,
) -> Dict[str, Any]:
    """The registry entry for published full-model weights (``hub_id`` pinned as ``org/repo@commit``)."""
    pcfg = config['pretrained_cfg']
    cfg = {k: pcfg[k] for k in zoo.PRETRAINED_CFG_FIELDS if k in pcfg and pcfg[k] is not None and k != 'hf_hub_id'}
    cfg = {'hf_hub_id': hub_id, **cfg, 'num_classes': config['num_classes'], 'license': license}
    extra_args = {k: v for k, v in config.get('model_args', {}).items()
                  if k not in ('num_classes', 'in_chans', 'global_pool', 'gcp_method')}
    entry = dict(
        tag=tag, applies_to=arch, weights='full',
        source=dict(kind=source_kind, description=source, **({'recipe': recipe} if recipe else {}),
                    **({'model_args': extra_args} if extra_args else {})),
        license=license, cfg=cfg,
        metrics=[{k: m[k] for k in ('dataset', 'top1', 'top5', 'images', 'command') if k in m} for m in metrics],
        citations=_CITATIONS_FOR_METHOD.get(method or '', ['song2021approximate']),
    )
    return entry


def export_pretrained_cfg(
        model: torch.nn.Module,
        overrides: Mapping[str, Any],
        data_config: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``pretrained_cfg`` of published weights: the model's (sources and nulls dropped) with ``overrides`` and
    the preprocessing of ``data_config`` (``img_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``; test-time
    variants of the source tag are cleared when the size or crop is given)."""
    from timm.models import filter_pretrained_cfg
    cfg = filter_pretrained_cfg({k: v for k, v in model.pretrained_cfg.items() if k != 'state_dict'},
                                remove_source=True, remove_null=True)
    cfg.pop('architecture', None)
    cfg.update(overrides)
    data_config = data_config or {}
    if data_config.get('img_size'):
        chans = (cfg.get('input_size') or (3,))[0]
        cfg.update(input_size=(chans, data_config['img_size'], data_config['img_size']), test_input_size=None)
    if data_config.get('crop_pct'):
        cfg.update(crop_pct=data_config['crop_pct'], test_crop_pct=None)
    if data_config.get('interpolation'):
        cfg['interpolation'] = data_config['interpolation']
    for key in ('mean', 'std'):
        if data_config.get(key):
            cfg[key] = tuple(data_config[key])
    return cfg


def _data_config(args: argparse.Namespace, info: Mapping[str, Any]) -> Dict[str, Any]:
    """Evaluation/export preprocessing: ``--img-size``/``--crop-pct``/``--interpolation``, else the checkpoint's
    training preprocessing (:func:`timm_gcp.checkpoint_model.checkpoint_data_config`).

    A model fine-tuned at 448 px (the fine-grained recipes) keeps its architecture's default cfg (224 px, from the
    backbone tag); without this its config.json would tell every user to feed it 224 px images.
    """
    out = checkpoint_data_config(info)
    given = dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def _evaluate_for_card(
        args: argparse.Namespace,
        model: torch.nn.Module,
        arch: str,
        info: Mapping[str, Any],
        data_config: Mapping[str, Any],
) -> List[Dict[str, Any]]:
    """Evaluate on ``--data-dir`` (when given) the way the quoted ``timm-gcp-validate`` command does; the metrics for
    the model card and the registry, each with that command."""
    if not args.data_dir:
        return []
    ckpt_args = ['--use-ema'] if args.use_ema else []
    size_args = [a for k, v in data_config.items() if k in ('img_size', 'crop_pct', 'interpolation')
                 for a in (f'--{k.replace("_", "-")}', str(v))]
    cmd = ['timm-gcp-validate', '--model', arch, '--checkpoint', args.checkpoint, '--data-dir', args.data_dir,
           *(['--dataset', args.dataset] if args.dataset else []), '--split', args.split, *ckpt_args, *size_args]
    r = validate(arch, args.data_dir, model=model, dataset=args.dataset, split=args.split, batch_size=args.batch_size,
                 workers=args.workers, device=args.device, class_names=info.get('class_names'), **data_config)
    model.cpu()
    return [dict(dataset=f'{args.dataset or "folder"}:{os.path.basename(os.path.normpath(args.data_dir))}/{args.split}',
                 top1=r['top1'], top5=r['top5'], images=r['images'], command=' '.join(shlex.quote(c) for c in cmd))]


def _export_model_args(args: argparse.Namespace, model: torch.nn.Module, info: Mapping[str, Any]) -> Dict[str, Any]:
    """The construction arguments config.json must rebuild this model with (e.g. ``gcp_dim``) and the method with its
    options, as the model uses them now; written explicitly because timm < 1.0.31 records none of them itself."""
    model_args = {k: v for k, v in resolve_arch(args.model, info)[1].items()
                  if k not in ('num_classes', 'gcp_method', 'gcp_kwargs')}
    gcp = model_gcp_method(model, portable=True)
    if gcp:
        model_args['gcp_method'] = gcp[0]
        if gcp[1]:
            model_args['gcp_kwargs'] = gcp[1]
    return model_args


def _push_folder(args: argparse.Namespace, out_dir: str, arch: str) -> Tuple[str, Optional[str]]:
    """Upload the folder just written and checked, model card included; returns (``org/repo@commit``, commit URL).

    (timm's push_to_hf_hub would serialise the model again and write a README only into a repository that has none,
    leaving an earlier card's source and metrics on top of new weights.)
    """
    from huggingface_hub import HfApi
    from timm import __version__ as timm_version
    api = HfApi(library_name='timm', library_version=timm_version)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=out_dir, revision=args.revision, allow_patterns=list(_HUB_FILES),
        commit_message=args.commit_message or f'Add {arch}.{args.tag} (timm-gcp-publish)')
    oid = getattr(commit, 'oid', None)
    if not oid:
        raise RuntimeError(f'the push returned no commit id ({commit!r}); the registry was not updated')
    return f'{args.repo_id}@{oid}', getattr(commit, 'commit_url', None)


def _update_registry(args: argparse.Namespace, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Pin the pushed weights in the registry and regenerate its views; what the summary reports about it."""
    registry_path = args.registry or zoo.REGISTRY_PATH
    if not os.path.isfile(registry_path):
        # Installed without a source checkout: the push stands; hand the entry over instead of failing after it.
        _logger.warning('no registry at %s; add this entry to zoo/registry.yaml by hand', registry_path)
        return dict(registry_entry=zoo.dump_registry({'pretrained': [entry]})[len(zoo.REGISTRY_HEADER):])
    data = zoo.upsert_pretrained(zoo.load_registry(registry_path), entry)
    zoo.save_registry(data, registry_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(registry_path)))
    return dict(registry=registry_path, generated=zoo.write_generated(data, root))


def _remove_export(out_dir: str, existed: bool) -> None:
    """Remove what a failed export wrote: the folder when this run created it, else only the files the marker lists
    (a folder this tool wrote before holds nothing else; anything else is never touched)."""
    marker = os.path.join(out_dir, MARKER)
    if not os.path.isfile(marker):  # refused before writing anything (a foreign folder), or nothing written yet
        if not existed and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        return
    for name in _HUB_FILES + (MARKER,):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    if not existed and not os.listdir(out_dir):
        os.rmdir(out_dir)
    _logger.warning('removed the partial export %s', out_dir)


def _apply_umask(out_dir: str, names: Sequence[str]) -> None:
    """Give the written files the user's umask (the safetensors writer creates them 0600, like a temporary file)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)


def publish(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the publish steps for parsed CLI arguments: load strictly, evaluate, export and check the Hub folder, then
    (unless ``--dry-run``) push it and pin it in the registry. Returns a summary dict."""
    model, arch, info = create_model_from_checkpoint(args.checkpoint, args.model, use_ema=args.use_ema)
    gcp = model_gcp_method(model, portable=True)
    method = gcp[0] if gcp else None
    num_classes = model.num_classes
    _logger.info('loaded %s strictly into %s (%d classes, method %s)', args.checkpoint, arch, num_classes, method)
    data_config = _data_config(args, info)
    if data_config:
        _logger.info('preprocessing of the published weights: %s', data_config)
    metrics = _evaluate_for_card(args, model, arch, info, data_config)

    repo_name = args.repo_id.split('/')[-1]
    out_dir = args.output_dir or os.path.join('hub_export', args.repo_id.replace('/', '__'))
    source = args.source or f'{info.get("arch", arch)} checkpoint {os.path.basename(args.checkpoint)}' + (
        f' (epoch {info["epoch"]})' if 'epoch' in info else '') + (' (EMA weights)' if args.use_ema else '')
    # Replace the fields the architecture's default (backbone-only) tag put into model.pretrained_cfg.
    pretrained_cfg = export_pretrained_cfg(model, dict(
        tag=args.tag, license=args.license, origin_url=args.origin_url, notes=f'Full-model weights: {source}.',
        num_classes=num_classes), data_config)

    def make_card(config: Mapping[str, Any]) -> Dict[str, Any]:
        return build_model_card(args.repo_id, arch, method, num_classes, args.license, source, metrics,
                                config.get('model_args', {}), recipe=args.recipe)

    existed = os.path.isdir(out_dir)
    prepare_output_dir(out_dir)  # a folder holding files this tool did not write is refused before anything changes
    try:
        files, config, card = export_folder(
            model, out_dir, make_card, _export_model_args(args, model, info), pretrained_cfg, repo_name)
        _validate_config(config, arch, num_classes, method)
        check_folder_loads(model, out_dir)
    except BaseException:
        _remove_export(out_dir, existed)
        raise
    summary = dict(arch=arch, method=method, output_dir=out_dir, files=files, metrics=metrics)
    if args.dry_run:
        return summary
    hub_id, commit_url = _push_folder(args, out_dir, arch)
    summary.update(hub_id=hub_id, commit_url=commit_url)
    if not args.no_registry:
        summary.update(_update_registry(args, registry_entry(
            arch, args.tag, hub_id, config, args.license, args.source_kind, source, metrics, method,
            recipe=args.recipe)))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='timm-gcp-publish', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='training checkpoint (.pth.tar) or converted .safetensors')
    p.add_argument('--repo-id', required=True, help='Hub repository, ORG/NAME')
    p.add_argument('--tag', required=True, help='pretrained tag, e.g. in1k, cub200_ft_in1k')
    add_eval_args(p, 'evaluate on this data before publishing (ImageFolder root holding the --split folder); the '
                     'preprocessing flags also go into config.json')
    p.add_argument('--output-dir', default=None, help='local Hub folder (default hub_export/ORG__NAME)')
    p.add_argument('--dry-run', action='store_true', help='write and check the folder only; no push')
    p.add_argument('--license', default='apache-2.0')
    p.add_argument('--source', default=None, help='one line on where the weights come from (model card, registry)')
    p.add_argument('--source-kind', default='trained', choices=('trained', 'converted'))
    p.add_argument('--recipe', default=None, help='training recipe the weights came from, e.g. '
                                                  'zoo/recipes/resnet50_gcp_pade_cub200_448.yaml')
    p.add_argument('--origin-url', default=None, help='where the weights/recipe are documented (pretrained_cfg)')
    p.add_argument('--revision', default=None, help='branch to push to (default main)')
    p.add_argument('--private', action='store_true')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--registry', default=None, help='registry file to update (default: the checkout\'s)')
    p.add_argument('--no-registry', action='store_true', help='do not update the registry after the push')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of ``timm-gcp-publish``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    problem = (f'--repo-id must be ORG/NAME, got {args.repo_id!r}' if '/' not in args.repo_id else None) or \
        eval_args_error(args) or data_dir_error(args.data_dir, args.dataset)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        summary = publish(args)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        print(f'error: {error_message(e)}', file=sys.stderr)
        return 2
    for m in summary['metrics']:
        print(f'metrics: {m["dataset"]} top1={m["top1"]:.3f} top5={m["top5"]:.3f} ({m["command"]})')
    print(f'wrote {summary["output_dir"]}: {", ".join(summary["files"])}')
    if 'hub_id' in summary:
        print(f'pushed: {summary["hub_id"]}')
    if 'registry_entry' in summary:
        print('no registry checkout found; add this entry under pretrained: in zoo/registry.yaml, then run '
              'python scripts/gen_zoo.py:\n' + summary['registry_entry'])
    if 'registry' in summary:
        print(f'updated {summary["registry"]} and regenerated {", ".join(summary["generated"])}')
    print(f'arch: {summary["arch"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
