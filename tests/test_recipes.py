"""Every recipe in zoo/recipes loads in timm-gcp-train (and in timm's train.py when TIMM_SCRIPTS_DIR is set) and runs
two training steps on tiny data with tiny-size overrides."""
import glob
import os
import runpy
import subprocess
import sys

import pytest
import yaml

from timm_gcp import train as tr
from helpers.data import ROOT, load_checkpoint, subprocess_env, write_image_folder

RECIPES = sorted(glob.glob(os.path.join(ROOT, 'zoo', 'recipes', '*.yaml')))
SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR')


def _image_folder(root):
    return write_image_folder(root, classes=2, per_class=2, size=72)


def _offline_copy(recipe, tmp_path):
    """The recipe without `pretrained` (no network here); everything else as written."""
    cfg = yaml.safe_load(open(recipe))
    cfg.pop('pretrained', None)
    path = tmp_path / os.path.basename(recipe)
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_recipes_and_their_docs_agree():
    """docs/training.md lists every recipe in zoo/recipes, and every recipe the README and docs name exists."""
    import re
    names = {os.path.basename(r) for r in RECIPES}
    table = open(os.path.join(ROOT, 'docs', 'training.md'), encoding='utf-8').read()
    documented = set(re.findall(r'`([\w.]+\.yaml)`', table.split('## Recipes', 1)[1].split('\n## ', 1)[0]))
    assert documented == names
    for doc in ('README.md', os.path.join('docs', 'training.md')):
        named = set(re.findall(r'zoo/recipes/([\w.]+\.yaml)', open(os.path.join(ROOT, doc), encoding='utf-8').read()))
        assert named and named <= names, (doc, sorted(named - names))


@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_loads(recipe, tmp_path, caplog):
    with caplog.at_level('WARNING'):
        args, _ = tr.parse_args(['--config', recipe, '--data-dir', str(tmp_path)])
    assert not caplog.records, caplog.text  # every key is a timm-gcp-train dest
    cfg = yaml.safe_load(open(recipe))
    for k, v in cfg.items():
        assert getattr(args, k) == v, k
    if 'imagenet_hybrid' in recipe:  # the paper's protocol: switch at the last decay, clip 5 (ResNet)
        assert args.gcp_switch_epoch == args.decay_milestones[-1] and args.gcp_switch_method == 'pade'
        assert args.model.endswith('_gcp_isqrt')
    if recipe.endswith('_448.yaml'):
        assert args.img_size == 448 and 5 <= args.head_lr_mult <= 20 and args.pretrained


@pytest.mark.skipif(not SCRIPTS_DIR, reason='set TIMM_SCRIPTS_DIR to a timm checkout to check its train.py parser')
def test_recipe_keys_are_train_py_dests():
    g = runpy.run_path(os.path.join(SCRIPTS_DIR, 'train.py'), run_name='timm_train_py')
    dests = {a.dest for a in g['parser']._actions} | {a.dest for a in g['config_parser']._actions}
    ours = {a.dest for a in tr.args.build_parsers()[1]._actions} - set(tr.EXTRA_KEYS) - {'help'}
    assert ours <= dests, sorted(ours - dests)
    for recipe in RECIPES:
        extra = set(yaml.safe_load(open(recipe))) - dests
        assert extra <= set(tr.EXTRA_KEYS), (recipe, extra)


def _tiny_overrides(cfg, data, out):
    img = 64 if cfg['model'].startswith('alexnet') else 32
    kwargs = ['gcp_dim=8'] + (['output_stride=8'] if cfg['model'].startswith('resnet') else [])
    return ['--data-dir', str(data), '--num-classes', '2', '--img-size', str(img), '-b', '2', '--workers', '0',
            '--model-kwargs', *kwargs, '--train-batches-per-epoch', '2', '--output', str(out), '--experiment', 'r']


@pytest.mark.slow
@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_two_steps_timm_gcp_train(recipe, tmp_path):
    path, cfg = _offline_copy(recipe, tmp_path)
    data = _image_folder(tmp_path / 'data')
    extra = ['--epochs', '2', '--gcp-switch-epoch', '1'] if 'gcp_switch_epoch' in cfg else ['--epochs', '1']
    assert tr.main(['--config', str(path), *_tiny_overrides(cfg, data, tmp_path), *extra]) == 0
    ckpt = load_checkpoint(tmp_path / 'r' / 'last.pth.tar')
    assert ckpt['gcp_method'] == cfg.get('gcp_switch_method', cfg['model'].rsplit('_', 1)[-1])


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPTS_DIR, reason='set TIMM_SCRIPTS_DIR to a timm checkout to run its train.py')
@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_two_steps_timm_train_py(recipe, tmp_path):
    path, cfg = _offline_copy(recipe, tmp_path)
    data = _image_folder(tmp_path / 'data')
    env = subprocess_env()
    r = subprocess.run([sys.executable, '-m', 'timm_gcp.run_timm_script', os.path.join(SCRIPTS_DIR, 'train.py'),
                        '--config', str(path), *_tiny_overrides(cfg, data, tmp_path), '--epochs', '1',
                        '--device', 'cpu'], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'r' / 'last.pth.tar').exists()
