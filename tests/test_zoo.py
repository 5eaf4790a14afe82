"""The pretrained registry, its generated views and what timm lists as pretrained."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from timm_gcp import zoo
from _data_helpers import ROOT


@pytest.fixture(scope='module')
def registry():
    return zoo.load_registry(os.path.join(ROOT, 'zoo', 'registry.yaml'))


def _gen_zoo():
    spec = importlib.util.spec_from_file_location('gen_zoo', os.path.join(ROOT, 'scripts', 'gen_zoo.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_agree_with_registry(capsys):
    assert _gen_zoo().main(['--check']) == 0, capsys.readouterr().err


def test_check_mode_detects_stale_cards(tmp_path, registry, capsys):
    # Edit a copy of the registry: the generated files of the checkout no longer match it.
    changed = copy.deepcopy(registry)
    changed['pretrained'][0]['cfg']['notes'] += ' (edited)'  # appears in _zoo_cfgs.py only
    changed['pretrained'][0]['source']['origin'] += ' (edited)'  # appears in MODEL_CARDS.md only
    path = tmp_path / 'registry.yaml'
    path.write_text(zoo.dump_registry(changed))
    assert _gen_zoo().main(['--check', '--registry', str(path)]) == 1
    err = capsys.readouterr().err
    assert '_zoo_cfgs.py' in err and 'MODEL_CARDS.md' in err and 'registry.yaml' not in err
    # A hand-edited (non-canonical) registry is stale too.
    path.write_text(zoo.dump_registry(registry).replace('schema: 1', 'schema:   1'))
    assert _gen_zoo().main(['--check', '--registry', str(path)]) == 1
    assert 'not in canonical form' in capsys.readouterr().err


def test_script_runs_standalone():
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gen_zoo.py'), '--check'],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0 and 'agree' in res.stdout, res.stderr


def test_zoo_cfgs_module_matches_registry(registry):
    from timm_gcp.models import _zoo_cfgs
    assert _zoo_cfgs.PRETRAINED_TAGS == zoo.pretrained_tags(registry)
    # tv_in1k is every ResNet family's default (first) tag; a1_in1k exists for the ResNet-50/101 families only.
    for fam in ('resnet18_gcp', 'resnet34_gcp', 'resnet50_gcp', 'resnet101_gcp', 'resnet50_ls1_gcp',
                'resnet101_ls1_gcp'):
        tags = list(_zoo_cfgs.PRETRAINED_TAGS[fam])
        assert tags[0] == 'tv_in1k'
        assert _zoo_cfgs.PRETRAINED_TAGS[fam]['tv_in1k']['hf_hub_id'] == f'timm/{fam.split("_")[0]}.tv_in1k'
    assert list(_zoo_cfgs.PRETRAINED_TAGS['resnet50_gcp']) == ['tv_in1k', 'a1_in1k']
    assert 'a1_in1k' not in _zoo_cfgs.PRETRAINED_TAGS['resnet18_gcp']
    assert _zoo_cfgs.BACKBONE_ONLY['resnet50_gcp'] == ('tv_in1k', 'a1_in1k')


def test_no_full_model_weights_claimed(registry):
    # Nothing is published yet: no full-model entry, no metric anywhere, conversion targets are not cfgs.
    assert [e for e in registry['pretrained'] if e['weights'] == 'full'] == []
    assert all(e['metrics'] == [] for e in registry['pretrained'])
    keys = set(zoo.pretrained_tags(registry))
    assert not keys & {t['arch'] for t in registry['conversion_targets']}
    cards = open(os.path.join(ROOT, 'MODEL_CARDS.md')).read()
    assert 'None published yet' in cards and 'not measured here' in cards


def test_cfg_fields_are_timm_pretrained_cfg_fields(registry):
    from timm.models import PretrainedCfg
    for fam, tags in zoo.pretrained_tags(registry).items():
        for tag, cfg in tags.items():
            pc = PretrainedCfg(**cfg)  # raises TypeError on an unknown field
            assert pc.num_classes == 1000 and pc.classifier == 'fc'


@pytest.mark.parametrize('mutate, message', [
    (lambda d: d['pretrained'][0].update(applies_to='resnet50_gcp_pade', weights='full'), 'pin a revision'),
    (lambda d: d['pretrained'][0].update(applies_to='vgg16_gcp'), 'not one of'),
    (lambda d: d['pretrained'][0]['cfg'].update(bogus=1), 'not allowed'),
    (lambda d: d['pretrained'][0]['cfg'].update(hf_hub_id='no-slash'), 'hf_hub_id'),
    (lambda d: d['pretrained'][0]['metrics'].append(dict(dataset='x', top1=1.0, top5=2.0)), 'command'),
    (lambda d: d['pretrained'].append(copy.deepcopy(d['pretrained'][0])), 'duplicate'),
    (lambda d: d['conversion_targets'][0].update(arch='resnet50_gcp_nomethod'), 'arch'),
    (lambda d: d.pop('citations'), 'citations'),
])
def test_validation_names_the_problem(registry, mutate, message):
    bad = copy.deepcopy(registry)
    mutate(bad)
    with pytest.raises(zoo.RegistryError, match=message):
        zoo.validate_registry(bad)


def test_upsert_replaces_same_tag_and_round_trips(registry, tmp_path):
    entry = dict(
        tag='in1k', applies_to='resnet50_gcp_pade', weights='full',
        source=dict(kind='converted', description='test'), license='apache-2.0',
        cfg=dict(hf_hub_id='org/repo@' + 'a' * 40, num_classes=1000, license='apache-2.0'),
        metrics=[dict(dataset='imagenet-1k', top1=77.0, top5=93.0, command='timm-gcp-validate ...')])
    new = zoo.upsert_pretrained(registry, entry)
    new = zoo.upsert_pretrained(new, dict(entry, cfg=dict(entry['cfg'], hf_hub_id='org/repo@' + 'b' * 40)))
    assert len(new['pretrained']) == len(registry['pretrained']) + 1
    assert zoo.pretrained_tags(new)['resnet50_gcp_pade']['in1k']['hf_hub_id'].endswith('b' * 40)
    path = tmp_path / 'r.yaml'
    zoo.save_registry(new, str(path))
    assert zoo.load_registry(str(path)) == new
    assert yaml.safe_load(path.read_text()) == new


def test_timm_lists_exactly_the_published_tags(registry):
    import timm
    expected = set()
    for key, tags in zoo.pretrained_tags(registry).items():
        archs = zoo.family_archs(key, registry) if zoo.arch_family(key, registry) is None else [key]
        archs = [a for a in archs if a in timm.list_models('*gcp*')]
        expected |= {f'{a}.{t}' for a in archs for t in tags}
    assert set(timm.list_pretrained('*gcp*')) == expected
    assert 'resnet50_gcp_pade.tv_in1k' in expected


def test_registry_methods_match_functional_registry(registry):
    from timm_gcp.functional import METHODS
    assert set(registry['methods']) == set(METHODS)
