"""The pretrained registry, its generated views and what timm lists as pretrained."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from timm_gcp import flops, zoo

from helpers.data import ROOT


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
    changed['pretrained'][0]['fresh'].append('pre_logits')  # appears in _zoo_cfgs.py only (in the notes)
    changed['families'][0]['description'] += ' (edited)'  # appears in MODEL_CARDS.md only
    path = tmp_path / 'registry.yaml'
    path.write_text(zoo.dump_registry(changed))
    assert _gen_zoo().main(['--check', '--registry', str(path)]) == 1
    err = capsys.readouterr().err
    assert '_zoo_cfgs.py' in err and 'MODEL_CARDS.md' in err and 'registry.yaml' not in err
    # A hand-edited (non-canonical) registry is stale too.
    path.write_text(zoo.dump_registry(registry).replace('schema: 1', 'schema:   1'))
    assert _gen_zoo().main(['--check', '--registry', str(path)]) == 1
    assert 'not in canonical form' in capsys.readouterr().err


@pytest.mark.slow
def test_script_runs_standalone():
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gen_zoo.py'), '--check'],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0 and 'agree' in res.stdout, res.stderr


def test_zoo_cfgs_module_matches_registry(registry):
    from timm_gcp.models import _zoo_cfgs
    tags = zoo.pretrained_tags(registry)
    assert _zoo_cfgs.FULL_TAGS == {k: v for k, v in tags.items() if zoo.arch_family(k, registry)}
    assert set(_zoo_cfgs.BACKBONE_TAGS) | set(_zoo_cfgs.FULL_TAGS) == set(tags)
    # tv_in1k is every ResNet family's default (first) tag; a1_in1k exists for the ResNet-50/101 families only.
    for fam in ('resnet18_gcp', 'resnet34_gcp', 'resnet50_gcp', 'resnet101_gcp', 'resnet50_ls1_gcp',
                'resnet101_ls1_gcp'):
        assert list(_zoo_cfgs.BACKBONE_TAGS[fam])[0] == 'tv_in1k'
        assert tags[fam]['tv_in1k']['hf_hub_id'] == f'timm/{fam.split("_")[0]}.tv_in1k'
    assert list(_zoo_cfgs.BACKBONE_TAGS['resnet50_gcp']) == ['tv_in1k', 'a1_in1k']
    assert _zoo_cfgs.BACKBONE_TAGS['resnet50_ls1_gcp']['a1_in1k']['timm_model'] == 'resnet50.a1_in1k'
    assert 'a1_in1k' not in _zoo_cfgs.BACKBONE_TAGS['resnet18_gcp']


def test_generated_cfgs_write_a_repeated_family_once(registry):
    """A family whose backbone-only tags equal an earlier family's is one assignment to that family's entry; the
    executed module still gives every family its own tags, in registry order, and nothing shared is repeated."""
    text = zoo.render_zoo_cfgs(registry)
    assert "BACKBONE_TAGS['resnet50_ls1_gcp'] = BACKBONE_TAGS['resnet50_gcp']" in text
    assert text.count("'timm_model': 'resnet50.a1_in1k'") == 1
    namespace = {}
    exec(compile(text, '_zoo_cfgs.py', 'exec'), namespace)
    expected = {}
    for e in registry['pretrained']:
        if e['weights'] == 'backbone-only':
            expected.setdefault(e['applies_to'], {})[e['tag']] = e['source']['timm_model']
    got = {fam: {tag: own['timm_model'] for tag, own in tags.items()}
           for fam, tags in namespace['BACKBONE_TAGS'].items()}
    assert got == expected
    for fam, tags in expected.items():
        assert list(namespace['BACKBONE_TAGS'][fam]) == list(tags)


# what timm's own pretrained cfg of a model says about its weights and their preprocessing
_TIMM_OWNED = ('hf_hub_id', 'hf_hub_filename', 'url', 'input_size', 'test_input_size', 'min_input_size',
               'fixed_input_size', 'interpolation', 'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std',
               'num_classes', 'license', 'label_offset')


def test_backbone_only_tags_copy_nothing_timm_knows(registry):
    """Neither the registry nor the generated module holds a timm field of a backbone-only tag: the registered cfg
    takes them from timm's cfg of source.timm_model, so a timm release that changes a tag changes ours."""
    import timm
    from timm_gcp.models import _zoo_cfgs
    entries = [e for e in registry['pretrained'] if e['weights'] == 'backbone-only']
    assert len(entries) == 19
    for e in entries:
        assert not {'cfg', 'license', 'metrics'} & set(e), e['tag']
        own = _zoo_cfgs.BACKBONE_TAGS[e['applies_to']][e['tag']]
        assert set(own) <= {'timm_model', 'notes', 'origin_url'}, own
        timm_cfg = timm.models.get_pretrained_cfg(e['source']['timm_model'])
        for arch in [a for a in zoo.family_archs(e['applies_to'], registry) if timm.is_model(a)]:  # SoT: token models
            cfg = timm.models.get_pretrained_cfg(f'{arch}.{e["tag"]}')
            for field in _TIMM_OWNED:
                if field != 'url':  # timm's hub copy is the weight source; its original URL is not repeated
                    assert getattr(cfg, field) == getattr(timm_cfg, field), (arch, e['tag'], field)
            assert cfg.notes == own['notes'] and ', '.join(e['fresh']) in cfg.notes
            assert cfg.classifier == 'fc'  # ours, not the timm model's ('head', 'head.fc', 'classifier')
    # what is ours over timm: an origin URL where timm's cfg has none (ConvNeXt), the GCP paper joined to the weights'
    convnext = timm.models.get_pretrained_cfg('convnext_tiny_gcp_svd.fb_in1k')
    assert timm.models.get_pretrained_cfg('convnext_tiny.fb_in1k').origin_url is None
    assert convnext.origin_url == 'https://github.com/facebookresearch/ConvNeXt'
    assert timm.models.get_pretrained_cfg('resnet50_gcp_svd.a1_in1k').paper_ids == 'arXiv:2105.02498, arXiv:2110.00476'
    assert timm.models.get_pretrained_cfg('resnet50_ls1_gcp_svd.tv_in1k').pool_size == (14, 14)


def test_backbone_tag_follows_a_changed_timm_cfg(monkeypatch):
    """The registration reads timm at build time: a timm cfg with another crop gives our tag that crop."""
    import timm
    from timm_gcp.models import _cfg_utils
    from timm_gcp.models.resnet_gcp import _cfg as resnet_cfg
    changed = timm.models.get_pretrained_cfg('resnet18.tv_in1k').to_dict()
    changed.update(crop_pct=0.5, interpolation='bicubic')
    monkeypatch.setattr(_cfg_utils, 'get_pretrained_cfg', lambda name: timm.models.PretrainedCfg(**changed))
    cfgs = _cfg_utils.build_cfgs(['resnet18_gcp_svd'], {'resnet18_gcp_svd': 'resnet18_gcp'}, resnet_cfg)
    assert cfgs['resnet18_gcp_svd.tv_in1k']['crop_pct'] == 0.5
    assert cfgs['resnet18_gcp_svd.tv_in1k']['interpolation'] == 'bicubic'


def test_no_full_model_weights_claimed(registry):
    # Nothing is published yet: no full-model entry, no metric anywhere, conversion targets are not cfgs.
    assert [e for e in registry['pretrained'] if e['weights'] == 'full'] == []
    assert all('metrics' not in e for e in registry['pretrained'])
    keys = set(zoo.pretrained_tags(registry))
    assert not keys & {t['arch'] for t in registry['conversion_targets']}
    cards = open(os.path.join(ROOT, 'MODEL_CARDS.md')).read()
    assert 'None published yet' in cards and 'not measured here' in cards


def test_cfg_fields_are_timm_pretrained_cfg_fields(registry):
    from timm.models import PretrainedCfg
    for fam, tags in zoo.pretrained_tags(registry).items():
        for tag, cfg in tags.items():
            pc = PretrainedCfg(**cfg)  # raises TypeError on an unknown field
            assert pc.num_classes == 1000 and pc.hf_hub_id.startswith('timm/')


def _full_entry(**cfg):
    return dict(tag='in1k', applies_to='resnet50_gcp_pade', weights='full', source=dict(kind='converted'),
                license='mit', cfg=dict(dict(hf_hub_id='org/repo@' + 'a' * 40, num_classes=1000, license='mit'), **cfg),
                metrics=[])


@pytest.mark.parametrize('mutate, message', [
    (lambda d: d['pretrained'].append(_full_entry(hf_hub_id='org/repo')), 'pin a revision'),
    (lambda d: d['pretrained'][0].update(applies_to='vgg16_gcp'), 'not one of'),
    (lambda d: d['pretrained'].append(_full_entry(bogus=1)), 'not allowed'),
    (lambda d: d['pretrained'].append(_full_entry(hf_hub_id='no-slash')), 'hf_hub_id'),
    (lambda d: d['pretrained'].append(dict(_full_entry(), metrics=[dict(dataset='x', top1=1.0, top5=2.0)])),
     'command'),
    (lambda d: d['pretrained'].append(copy.deepcopy(d['pretrained'][0])), 'duplicate'),
    (lambda d: d['pretrained'][0].update(cfg=dict(crop_pct=0.9)), 'takes its cfg and license from timm'),
    (lambda d: d['pretrained'][0]['source'].update(timm_model='resnet18.no_such_tag'), 'no pretrained weights'),
    (lambda d: d['pretrained'][0]['source'].update(timm_model='resnet50.tv_in1k'), "family's backbone"),
    (lambda d: d['pretrained'][0]['source'].update(origin_url='https://example.org'), 'repeats'),
    (lambda d: d['pretrained'][0].pop('fresh'), 'freshly initialised modules'),
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


def test_eig_flops_formula():
    """9 n^3 per image for the matrix that is decomposed: d x d on the covariance path, M x M on the Gram path."""
    assert flops.eig_flops(256, 49, 'svd', gram_path=False) == 9 * 256 ** 3
    assert flops.eig_flops(256, 49, 'pade', gram_path=True) == 9 * 49 ** 3
    assert flops.eig_flops(256, 49, 'isqrt', gram_path=False) == flops.eig_flops(256, 49, 'mpa', gram_path=True) == 0
    # the path is the functional package's own rule: the Gram matrix while M < d for the eigen-methods
    assert flops.eig_flops(256, 49, 'svd') == 9 * 49 ** 3 and flops.eig_flops(256, 256, 'svd') == 9 * 256 ** 3
    assert flops.gram_path_used(256, 49, 'svd', 'cov') is False


@pytest.mark.slow
def test_measure_counts_the_eigendecomposition_of_the_map_it_sees(registry):
    """The measured GFLOPs of an eigen-method include eig_flops of the real map (7 x 7 for ResNet-18 at 224 px) on
    the path that runs: 9 * 256^3 on the covariance path, 9 * 49^3 on the Gram path; isqrt has none."""
    fam = next(f for f in registry['families'] if f['name'] == 'resnet18_gcp')
    data = dict(families=[fam], methods=['isqrt', 'svd'])
    cov = flops.measure_archs(data, gcp_path='cov')
    gram = flops.measure_archs(data, gcp_path='gram')
    assert cov['resnet18_gcp_isqrt']['eig_gflops'] == gram['resnet18_gcp_isqrt']['eig_gflops'] == 0
    assert cov['resnet18_gcp_svd']['eig_gflops'] == round(9 * 256 ** 3 / 1e9, 3)
    assert gram['resnet18_gcp_svd']['eig_gflops'] == round(9 * 49 ** 3 / 1e9, 3)
    # the rest is counted as it runs: the Gram path's products cost less than the covariance path's
    assert gram['resnet18_gcp_svd']['gflops'] < cov['resnet18_gcp_svd']['gflops']


def test_cards_count_the_eigendecomposition(registry):
    """Every eigen-method column of MODEL_CARDS.md holds the eigendecomposition's estimate for the family's map."""
    from timm_gcp.functional import METHODS
    positions = {'alexnet_gcp': 13 * 13, 'resnet50_ls1_gcp': 196, 'resnet101_ls1_gcp': 196,
                 'vit_small_patch16_224_gcp': 196, 'deit_small_patch16_224_gcp': 196}
    archs = registry['measured']['archs']
    for fam in registry['families']:
        for method in registry['methods']:
            m = archs[f'{fam["name"]}_{method}']
            expected = flops.eig_flops(256, positions.get(fam['name'], 49), method) / 1e9
            assert m['eig_gflops'] == round(expected, 3), (fam['name'], method)
            assert (m['eig_gflops'] > 0) == METHODS[method].eigen
    assert 'eigendecomposition' in open(os.path.join(ROOT, 'MODEL_CARDS.md')).read()
