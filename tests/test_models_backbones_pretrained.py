"""Pretrained loading of the GcpNet models (timm backbones) through timm's real paths, offline: backbone tags from a
locally laid-out Hub cache, checkpoint files, save_for_hf/local-dir and push_to_hf_hub/hf-hub round trips."""
import importlib
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch

import timm_gcp
from timm_gcp import get_gcp_method, set_gcp_method

from helpers.data import subprocess_env
from helpers.hub_server import HubServer
from helpers.models import TINY_BACKBONE_KWARGS, make_hub_cache

CONVNEXT = TINY_BACKBONE_KWARGS['convnext_tiny_gcp']
VIT = TINY_BACKBONE_KWARGS['vit_small_patch16_224_gcp']
HEAD = ('global_pool.', 'fc.')
# timm >= 1.0.31 records create_model's arguments and exports them; older timm exports only the model_args it is given
TIMM_RECORDS_MODEL_ARGS = hasattr(importlib.import_module('timm.models._hub'), 'get_model_args')


def _x(b=2, size=64, chans=3):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(0))


def _plain(name, seed=7, **kwargs):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model(name, **kwargs).state_dict().items()}


def _env(tmp_path, **extra):
    return subprocess_env(**{'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'hub'),
        'HF_HOME': str(tmp_path / 'home'), 'HF_HUB_DISABLE_TELEMETRY': '1', **extra})


def _run(script, env):
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_backbone_tags_from_an_offline_hub_cache(tmp_path):
    """Backbone-only tags load the backbone's timm weights through timm's own loader (for a ViT at another image
    size, with its position embeddings resampled as timm resamples them) and leave the GCP head fresh; a named family
    and the generic path alike."""
    hub = str(tmp_path / 'hub')
    make_hub_cache(hub, 'timm/convnext_tiny.fb_in1k', _plain('convnext_tiny', **CONVNEXT))
    make_hub_cache(hub, 'timm/vit_small_patch16_224.augreg_in1k', _plain('vit_small_patch16_224', **VIT))
    make_hub_cache(hub, 'timm/test_vit.r160_in1k', _plain('test_vit'))
    out, log = _run(f'''
        import json, logging, sys
        import safetensors.torch, timm, torch
        import timm_gcp
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        cache = {hub!r}

        def plain(repo):
            import glob
            files = glob.glob(f'{{cache}}/models--timm--{{repo}}/snapshots/*/model.safetensors')
            return safetensors.torch.load_file(files[0])

        def check(model, fresh, repo, skip=()):
            sd, ref = model.state_dict(), plain(repo)
            bad = [k for k in sd
                   if k.startswith('backbone.') and k[9:] not in skip and not torch.equal(sd[k], ref[k[9:]])]
            bad += [k for k in sd if k.startswith(('global_pool.', 'fc.')) and not torch.equal(sd[k], fresh[k])]
            return bad

        out = {{}}
        kw = dict(gcp_dim=8, num_classes=1000, **{CONVNEXT!r})
        torch.manual_seed(0); fresh = timm.create_model('convnext_tiny_gcp_pade', **kw).state_dict()
        torch.manual_seed(0); model = timm.create_model('convnext_tiny_gcp_pade.fb_in1k', pretrained=True, **kw)
        out['convnext'] = check(model, fresh, 'convnext_tiny.fb_in1k')
        out['convnext_tag'] = model.pretrained_cfg['tag']

        kw = dict(gcp_dim=8, num_classes=10, **{dict(VIT, img_size=96)!r})
        torch.manual_seed(0); fresh = timm.create_model('vit_small_patch16_224_gcp_svd', **kw).state_dict()
        torch.manual_seed(0)
        model = timm.create_model('vit_small_patch16_224_gcp_svd.augreg_in1k', pretrained=True, **kw)
        out['vit'] = check(model, fresh, 'vit_small_patch16_224.augreg_in1k', skip=('pos_embed',))
        ref = timm.create_model('vit_small_patch16_224.augreg_in1k', pretrained=True, **{dict(VIT, img_size=96)!r})
        pos = model.backbone.pos_embed
        out['vit_pos_embed'] = [list(pos.shape), torch.equal(pos, ref.pos_embed)]

        torch.manual_seed(0); fresh = timm_gcp.create_model('test_vit_gcp_isqrt', gcp_dim=8, num_classes=3).state_dict()
        torch.manual_seed(0)
        model = timm_gcp.create_model('test_vit_gcp_isqrt.r160_in1k', pretrained=True, gcp_dim=8, num_classes=3)
        out['generic'] = check(model, fresh, 'test_vit.r160_in1k')
        out['generic_cfg'] = [model.pretrained_cfg[k] for k in ('architecture', 'tag', 'hf_hub_id')]
        feat = timm_gcp.create_model('test_vit_gcp_isqrt.r160_in1k', pretrained=True, features_only=True)
        sd, ref = feat.state_dict(), plain('test_vit.r160_in1k')
        out['features_only'] = all(torch.equal(v, ref[k[len('model.backbone.'):]]) for k, v in sd.items())
        print(json.dumps(out))
    ''', _env(tmp_path))
    assert out['convnext'] == [] and out['convnext_tag'] == 'fb_in1k'
    assert out['vit'] == [] and out['vit_pos_embed'] == [[1, 37, 32], True]  # 6x6 patches + class token
    assert out['generic'] == [] and out['features_only'] is True
    assert out['generic_cfg'] == ['generic_gcp_isqrt', 'r160_in1k', 'timm/test_vit.r160_in1k']
    assert 'Loading pretrained weights from Hugging Face hub (timm/convnext_tiny.fb_in1k)' in log
    assert 'convnext_tiny_gcp_pade: backbone weights from timm convnext_tiny.fb_in1k; GCP head freshly' in log
    # the 1000 ImageNet classes were kept for the ConvNeXt: its classifier is untrained, and a warning says so
    assert 'convnext_tiny_gcp_pade: the pretrained weights (fb_in1k) hold the backbone only' in log
    assert 'vit_small_patch16_224_gcp_svd: the pretrained weights' not in log


def test_checkpoint_files_into_a_gcp_net(tmp_path, caplog):
    """A plain backbone checkpoint given as a file fills backbone.* (classifier dropped, head fresh); a GCP
    checkpoint loads whole, into other class counts and one input channel as timm adapts them."""
    kw = dict(gcp_dim=8, **CONVNEXT)
    plain = _plain('convnext_tiny', **CONVNEXT)
    path = tmp_path / 'convnext.safetensors'
    safetensors.torch.save_file(plain, str(path))
    torch.manual_seed(0)
    fresh = timm.create_model('convnext_tiny_gcp_svd', **kw).state_dict()
    with caplog.at_level(logging.INFO, logger='timm_gcp'):
        torch.manual_seed(0)
        model = timm.create_model('convnext_tiny_gcp_svd', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
            **kw)
    sd = model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(v, fresh[k] if k.startswith(HEAD) else plain[k[len('backbone.'):]], rtol=0, atol=0)
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'not loaded (not in the backbone without its classifier): head.fc.bias, head.fc.weight' in messages
    assert 'GCP head freshly initialised' in messages

    gcp = {k: v.clone() for k, v in timm.create_model('convnext_tiny_gcp_svd', **kw).state_dict().items()}
    path = tmp_path / 'gcp.safetensors'
    safetensors.torch.save_file(gcp, str(path))
    model = timm.create_model('convnext_tiny_gcp_svd', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=7, **kw)
    sd = model.state_dict()
    assert sd['fc.weight'].shape == (7, 36)
    for k in sd:
        if not k.startswith('fc.'):
            torch.testing.assert_close(sd[k], gcp[k], rtol=0, atol=0)
    gray = timm.create_model('convnext_tiny_gcp_svd', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        in_chans=1, **kw).state_dict()
    torch.testing.assert_close(gray['backbone.stem.0.weight'], gcp['backbone.stem.0.weight'].sum(1, keepdim=True))


def test_generic_model_round_trips_through_save_for_hf_and_local_dir(tmp_path):
    """timm's own export of a generic GCP model (after the hybrid switch) names the generic architecture with the
    backbone and method in model_args; timm.create_model('local-dir:...') rebuilds it exactly."""
    model = timm_gcp.create_model('test_convnext_gcp_isqrt', gcp_dim=8, num_classes=4).eval()
    set_gcp_method(model, 'svd')
    given = None if TIMM_RECORDS_MODEL_ARGS else dict(backbone='test_convnext', gcp_dim=8, gcp_method='svd')
    timm.models.save_for_hf(model, str(tmp_path), model_args=given)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'generic_gcp_isqrt' and config['num_classes'] == 4
    assert config['model_args']['backbone'] == 'test_convnext' and config['model_args']['gcp_method'] == 'svd'
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.backbone_name == 'test_convnext' and get_gcp_method(loaded) == ('svd', {})
    x = _x()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_push_to_hf_hub_and_create_from_hf_hub(tmp_path):
    """push_to_hf_hub into a loopback Hub server; a fresh process with only ``import timm_gcp`` rebuilds the generic
    model and a named one from ``hf-hub:`` with identical logits."""
    server = HubServer().start()
    try:
        env = _env(tmp_path, HF_ENDPOINT=server.url, HF_TOKEN='loopback-test-token', HF_HUB_OFFLINE='0')
        env.pop('HF_HUB_CACHE')
        x_path = tmp_path / 'x.pt'
        torch.save(_x(), str(x_path))
        pushed, _ = _run(f'''
            import json, torch, timm, timm_gcp
            x = torch.load({str(x_path)!r}, weights_only=True)
            out = {{}}
            swin = {dict(TINY_BACKBONE_KWARGS['swin_tiny_patch4_window7_224_gcp'])!r}
            for repo, name, kw in [('tester/generic', 'test_vit_gcp_pade', dict(gcp_cls_token=True)),
                                   ('tester/swin', 'swin_tiny_patch4_window7_224_gcp_isqrt', swin)]:
                model = timm_gcp.create_model(name, gcp_dim=8, num_classes=3, **kw).eval()
                timm_gcp.set_gcp_method(model, 'mpa')
                # timm < 1.0.31 exports only the model_args it is given
                args = None if {TIMM_RECORDS_MODEL_ARGS} else dict(timm_gcp.resolve_model_name(name, kw)[1], gcp_dim=8,
                    gcp_method='mpa')
                timm.models.push_to_hf_hub(model, repo, safe_serialization=True, model_args=args)
                out[repo] = model(x).tolist()
            print(json.dumps(out))
        ''', env)
        assert sorted(server.repos) == ['tester/generic', 'tester/swin']
        pulled, _ = _run(f'''
            import json, torch, timm
            import timm_gcp  # the only plugin step: registers the architectures
            x = torch.load({str(x_path)!r}, weights_only=True)
            out = {{}}
            for repo in ('tester/generic', 'tester/swin'):
                model = timm.create_model('hf-hub:' + repo, pretrained=True).eval()
                out[repo] = [model(x).tolist(), model.pretrained_cfg['architecture'], timm_gcp.get_gcp_method(model)[0]]
            print(json.dumps(out))
        ''', env)
    finally:
        server.stop()
    assert pulled['tester/generic'][1:] == ['generic_gcp_pade', 'mpa']
    assert pulled['tester/swin'][1:] == ['swin_tiny_patch4_window7_224_gcp_isqrt', 'mpa']
    for repo in pushed:
        torch.testing.assert_close(torch.tensor(pulled[repo][0]), torch.tensor(pushed[repo]), rtol=0, atol=0)
