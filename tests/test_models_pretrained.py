"""Pretrained loading through timm's real path: an offline Hub cache, local .safetensors/.pth, cfg generation."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
from timm.models import generate_default_cfgs

from timm_gcp.models._cfg_utils import build_cfgs
from timm_gcp.models._zoo_cfgs import BACKBONE_TAGS, FULL_TAGS
from timm_gcp.models.resnet_gcp import _cfg as resnet_cfg

from helpers.data import subprocess_env
from helpers.models import ALL_NAMES, BACKBONE_NAMES, EIGEN_METHOD, NS_METHOD, make_hub_cache

NAME = f'resnet18_gcp_{EIGEN_METHOD}'
HEAD = ('global_pool.', 'fc.')


class NotWeights:
    """An arbitrary pickled object: a weights_only load must refuse it."""


def _build(name=NAME, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{'gcp_dim': 8, **kwargs})


def _assert_same(a, b, keys):
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope='module')
def gcp_checkpoint():
    model = _build(seed=1).eval()
    # non-trivial BN statistics so a skipped buffer would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gcp_checkpoint_from_safetensors_and_pth(tmp_path, gcp_checkpoint):
    st_path = tmp_path / 'gcp.safetensors'
    safetensors.torch.save_file(gcp_checkpoint, str(st_path))
    pth_path = tmp_path / 'gcp.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in gcp_checkpoint.items()}, 'epoch': 3}, str(pth_path))
    for path in (st_path, pth_path):
        model = _build(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        _assert_same(model.state_dict(), gcp_checkpoint, gcp_checkpoint)


def test_pth_is_loaded_with_weights_only(tmp_path, gcp_checkpoint):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': gcp_checkpoint, 'obj': NotWeights()}, str(path))
    with pytest.raises(Exception, match='(?i)weights_only|unpickl|global'):
        _build(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_gcp_checkpoint_into_other_num_classes_and_in_chans(tmp_path, gcp_checkpoint):
    path = tmp_path / 'gcp.safetensors'
    safetensors.torch.save_file(gcp_checkpoint, str(path))
    fresh = _build(seed=5, num_classes=10).state_dict()
    model = _build(seed=5, num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    assert sd['fc.weight'].shape == (10, 36)
    _assert_same(sd, gcp_checkpoint, [k for k in sd if not k.startswith('fc.')])
    _assert_same(sd, fresh, ['fc.weight', 'fc.bias'])  # classifier re-initialised, as timm does
    gray = _build(in_chans=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    # timm's adapt_input_conv sums the RGB filters for one input channel
    torch.testing.assert_close(gray['conv1.weight'], gcp_checkpoint['conv1.weight'].sum(1, keepdim=True))
    _assert_same(gray, gcp_checkpoint, [k for k in gray if k != 'conv1.weight'])


def test_plain_resnet_state_dict_loads_backbone_and_keeps_fresh_head(tmp_path, caplog):
    torch.manual_seed(3)
    plain = {k: v.clone() for k, v in timm.create_model('resnet18').state_dict().items()}
    assert plain['fc.weight'].shape == (1000, 512)
    path = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(plain, str(path))
    fresh = _build(seed=0).state_dict()
    with caplog.at_level(logging.INFO, logger='timm_gcp'):
        model = _build(seed=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    backbone = [k for k in sd if not k.startswith(HEAD)]
    assert backbone == [k for k in plain if not k.startswith('fc.')]
    _assert_same(sd, plain, backbone)
    _assert_same(sd, fresh, [k for k in sd if k.startswith(HEAD)])
    assert any('GCP head freshly initialised' in r.getMessage() for r in caplog.records)
    headless = _build(seed=0, num_classes=0, global_pool='', pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    assert list(headless) == backbone
    _assert_same(headless, plain, backbone)


def test_backbone_only_weights_warn_when_the_checkpoints_classes_are_kept(tmp_path, caplog):
    """pretrained=True with the checkpoint's 1000 classes but a backbone-only source gives an untrained classifier:
    that gets a WARNING; a new class count (fine-tuning) or features_only gets only the INFO line."""
    plain = timm.create_model('resnet18').state_dict()
    path = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(plain, str(path))
    overlay = dict(file=str(path))

    def warnings_of(**kwargs):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger='timm_gcp'):
            _build(pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    warned = warnings_of()
    assert len(warned) == 1 and 'must be fine-tuned' in warned[0] and '1000-class classifier' in warned[0]
    assert warnings_of(num_classes=10) == []
    assert warnings_of(features_only=True) == []
    assert warnings_of(num_classes=0) == []


def test_official_layout_is_refused_with_the_converter_named(tmp_path, gcp_checkpoint):
    official = {('layer_reduce.weight' if k == 'global_pool.conv.weight' else k): v for k, v in gcp_checkpoint.items()}
    path = tmp_path / 'mpncovresnet.safetensors'
    safetensors.torch.save_file(official, str(path))
    with pytest.raises(ValueError, match='timm_gcp.convert'):
        _build(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_features_only_from_a_gcp_checkpoint(tmp_path, gcp_checkpoint):
    path = tmp_path / 'gcp.safetensors'
    safetensors.torch.save_file(gcp_checkpoint, str(path))
    feat = _build(features_only=True, out_indices=(2, 4), pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = feat.state_dict()
    _assert_same(sd, gcp_checkpoint, sd)


@pytest.mark.slow
def test_offline_hub_cache_backbone_tag(tmp_path):
    """timm's Hub download path with HF_HUB_OFFLINE=1 against a cache laid out as huggingface_hub leaves it."""
    torch.manual_seed(7)
    plain = timm.create_model('resnet18').state_dict()
    snap = make_hub_cache(str(tmp_path / 'hub'), 'timm/resnet18.tv_in1k', plain)
    script = textwrap.dedent(f'''
        import json, logging, sys
        import safetensors.torch, timm, torch
        import timm_gcp
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        name = {NAME!r}
        tagged = name + '.tv_in1k'
        has_tag = tagged in timm.list_pretrained(tagged)
        kw = dict(gcp_dim=8, num_classes=1000)
        torch.manual_seed(0)
        fresh = timm.create_model(name, **kw).state_dict()
        torch.manual_seed(0)
        if has_tag:
            model = timm.create_model(tagged, pretrained=True, **kw)
        else:  # before the zoo registry lists the tag: the same cfg, given explicitly
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(
                hf_hub_id='timm/resnet18.tv_in1k'), **kw)
        plain = safetensors.torch.load_file({os.path.join(snap, 'model.safetensors')!r})
        sd = model.state_dict()
        bad = [k for k in sd if not k.startswith(('global_pool.', 'fc.')) and not torch.equal(sd[k], plain[k])]
        bad += [k for k in sd if k.startswith(('global_pool.', 'fc.')) and not torch.equal(sd[k], fresh[k])]
        print(json.dumps(dict(bad=bad, has_tag=has_tag, n=len(sd))))
    ''')
    env = subprocess_env(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub'), HF_HOME=str(tmp_path / 'home'))
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['bad'] == [] and result['n'] > 100
    assert 'Loading pretrained weights from Hugging Face hub (timm/resnet18.tv_in1k)' in proc.stderr
    assert 'GCP head freshly initialised' in proc.stderr


def test_build_cfgs_family_and_arch_tags():
    archs = {f'resnet50_gcp_{m}': 'resnet50_gcp' for m in (NS_METHOD, EIGEN_METHOD)}
    archs['resnet18_gcp_x'] = 'resnet18_gcp'
    full = f'resnet50_gcp_{EIGEN_METHOD}'
    backbone_tags = {'resnet50_gcp': {
        'tv_in1k': dict(timm_model='resnet50.tv_in1k', top1=76.1),
        'a1_in1k': dict(timm_model='resnet50.a1_in1k', notes='ours'),
    }}
    full_tags = {full: {'in1k': dict(hf_hub_id='org/full-model', notes=('trained',))}}
    cfgs = build_cfgs(archs, archs, lambda arch, **kw: resnet_cfg(f'resnet50_gcp_{EIGEN_METHOD}', **kw), full_tags,
        backbone_tags)
    expected = [f'resnet50_gcp_{NS_METHOD}.tv_in1k', f'resnet50_gcp_{NS_METHOD}.a1_in1k', f'{full}.in1k',
        f'{full}.tv_in1k', f'{full}.a1_in1k', 'resnet18_gcp_x']
    assert list(cfgs) == expected
    tv, a1 = cfgs[f'resnet50_gcp_{NS_METHOD}.tv_in1k'], cfgs[f'resnet50_gcp_{NS_METHOD}.a1_in1k']
    assert 'top1' not in tv and 'timm_model' not in tv  # not PretrainedCfg fields
    # timm's own cfg of the source model: hub id, interpolation, crop, test size, license
    assert (tv['hf_hub_id'], tv['interpolation'], tv['crop_pct'], tv['license']) == (
        'timm/resnet50.tv_in1k', 'bilinear', 0.875, 'bsd-3-clause')
    assert (a1['hf_hub_id'], a1['interpolation'], a1['crop_pct'], a1['test_input_size']) == (
        'timm/resnet50.a1_in1k', 'bicubic', 0.95, (3, 288, 288))
    assert a1['notes'] == 'ours' and a1['first_conv'] == 'conv1' and a1['classifier'] == 'fc'
    assert tv['paper_ids'] == 'arXiv:2105.02498'
    assert a1['paper_ids'] == 'arXiv:2105.02498, arXiv:2110.00476'
    default = generate_default_cfgs(cfgs)
    assert default[f'resnet50_gcp_{NS_METHOD}'].tags[0] == 'tv_in1k'  # the first backbone tag is the default
    assert default[full].tags[0] == 'in1k'  # full-model weights first
    assert not default['resnet18_gcp_x'].is_pretrained


def test_build_cfgs_names_an_unknown_timm_model():
    archs = {'resnet50_gcp_svd': 'resnet50_gcp'}
    with pytest.raises(ValueError, match="no pretrained weights named 'resnet50.no_such_tag'"):
        build_cfgs(archs, archs, resnet_cfg, {}, {'resnet50_gcp': {'x': dict(timm_model='resnet50.no_such_tag')}})


def test_registered_tags_apply_to_every_method_of_their_family():
    for key, tagmap in {**BACKBONE_TAGS, **FULL_TAGS}.items():
        archs = [n for n in ALL_NAMES + BACKBONE_NAMES if n == key or n.rsplit('_', 1)[0] == key]
        assert archs, f'zoo tag key {key!r} matches no registered architecture'
        for arch in archs:
            if key != arch:  # a family's first tag is the default unless the arch has tags of its own
                assert timm.models.get_pretrained_cfg(arch).tag == (list(FULL_TAGS.get(arch, {})) or
                    list(tagmap))[0]
            for tag in tagmap:
                cfg = timm.models.get_pretrained_cfg(f'{arch}.{tag}')
                assert cfg is not None and cfg.has_weights, f'{arch}.{tag}'
                assert cfg.paper_ids.startswith('arXiv:2105.02498')
                source = tagmap[tag].get('timm_model')
                hub_id = timm.models.get_pretrained_cfg(source).hf_hub_id if source else tagmap[tag]['hf_hub_id']
                assert cfg.hf_hub_id == hub_id


@pytest.mark.network
@pytest.mark.skipif(os.environ.get('TIMM_GCP_NETWORK_TESTS') != '1', reason='needs the Hugging Face Hub')
def test_pretrained_backbone_from_the_hub():
    name = f'resnet18_gcp_{EIGEN_METHOD}'
    tag = '.tv_in1k' if timm.list_pretrained(name + '.tv_in1k') else ''
    overlay = None if tag else dict(hf_hub_id='timm/resnet18.tv_in1k')
    model = timm.create_model(name + tag, pretrained=True, pretrained_cfg_overlay=overlay)
    ref = timm.create_model('resnet18.tv_in1k', pretrained=True)
    torch.testing.assert_close(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight, rtol=0, atol=0)


def test_alexnet_checkpoint_into_other_num_classes(tmp_path):
    name = f'alexnet_gcp_{NS_METHOD}'
    src = _build(name, seed=2, mlp_dim=16).state_dict()
    path = tmp_path / 'alexnet.safetensors'
    safetensors.torch.save_file(src, str(path))
    fresh = _build(name, seed=4, mlp_dim=16, num_classes=5).state_dict()
    sd = _build(name, seed=4, mlp_dim=16, num_classes=5, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    _assert_same(sd, src, [k for k in sd if not k.startswith('fc.')])  # features, pooling and MLP loaded
    _assert_same(sd, fresh, ['fc.weight', 'fc.bias'])


def test_wrapped_checkpoint_given_as_a_state_dict(gcp_checkpoint):
    """Sources timm does not unwrap itself (a state dict in the cfg, Hub/URL files): the filter removes a training
    checkpoint's wrapper and DDP's 'module.' prefixes."""
    wrapped = {'state_dict': {'module.' + k: v for k, v in gcp_checkpoint.items()}, 'epoch': 3}
    model = _build(pretrained=True, pretrained_cfg_overlay=dict(state_dict=wrapped))
    _assert_same(model.state_dict(), gcp_checkpoint, gcp_checkpoint)


def test_alexnet_checkpoint_into_one_input_channel(tmp_path):
    """timm adapts the stem named by the cfg's first_conv ('features.0', with its bias kept as is)."""
    name = f'alexnet_gcp_{NS_METHOD}'
    src = _build(name, seed=2, mlp_dim=16).state_dict()
    path = tmp_path / 'alexnet.safetensors'
    safetensors.torch.save_file(src, str(path))
    sd = _build(name, seed=4, mlp_dim=16, in_chans=1, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    torch.testing.assert_close(sd['features.0.weight'], src['features.0.weight'].sum(1, keepdim=True))
    _assert_same(sd, src, [k for k in sd if k != 'features.0.weight'])
