"""timm's own ``tests/test_models.py`` on the GCP models, fetched from the installed timm's sdist
(tests/helpers/timm_suite.py).

The first run downloads the sdist with pip (PyPI must be reachable); later runs use the cached copy.
"""
import importlib.util
import os
import re
import warnings

import pytest
import timm
import torch

from helpers import timm_suite

TOKEN_MODELS = [f'{f}_isqrt' for f in timm_suite.NON_STD_TOKEN_FAMILIES] + [
    n for n in timm_suite.OTHER_HEAD_MODELS if n.rsplit('_', 1)[0] in timm_suite.NON_STD_TOKEN_FAMILIES]


@pytest.fixture(scope='module')
def timm_tests():
    """timm's test module, imported from the cached sdist (its helpers check the model API contract)."""
    path = os.path.join(timm_suite.fetch_timm_tests(), 'test_models.py')
    spec = importlib.util.spec_from_file_location('timm_sdist_test_models', path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # its markers are declared in timm's pyproject, not here
        warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


def test_selection_takes_every_family_once_and_every_method():
    expr = timm_suite.selection()
    chosen = re.findall(r'\b(\w+_gcp_\w+?)\b(?= or |\))', expr.split(' and not torchscript')[0])
    assert set(timm_suite.OTHER_HEAD_MODELS) <= set(chosen) and all(timm.is_model(n) for n in chosen)
    chosen = [n for n in chosen if n not in timm_suite.OTHER_HEAD_MODELS]
    families = {n.rsplit('_', 1)[0] for n in chosen}
    assert len(families) == len(chosen) >= 16 and {'generic_gcp', 'alexnet_gcp', 'swin_tiny_patch4_window7_224_gcp'
        } <= families
    assert {n.rsplit('_', 1)[1] for n in chosen} == set(timm_gcp_methods())
    assert 'not torchscript and not pretrained' in expr
    assert all(f'test_model_default_cfgs_non_std and {n}' in expr for n in chosen
        if n.rsplit('_', 1)[0] in timm_suite.NON_STD_TOKEN_FAMILIES)


def timm_gcp_methods():
    from timm_gcp import METHODS
    return list(METHODS)


@pytest.mark.slow
def test_timm_model_tests_pass_on_one_method_per_family():
    """timm's forward, backward, default-cfg (the reset_classifier(0)/(2) contract on the meta device), features and
    FX tests: all pass, none is skipped for a GCP model."""
    proc = timm_suite.run(['-rfEs'])
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r'(\d+) passed', summary).group(1))
    assert 'failed' not in summary and 'error' not in summary and 'skipped' not in summary, summary
    # per family: forward, backward, default cfgs, features (CNNs), FX forward and backward
    assert passed >= 5 * (16 + len(timm_suite.OTHER_HEAD_MODELS)), summary


@pytest.mark.parametrize('name', TOKEN_MODELS)
def test_timm_non_std_contract_on_token_models(name, timm_tests):
    """timm's test_model_default_cfgs_non_std on ViT/DeiT GCP models, with timm's own helpers, except its assertion
    that a model built with num_classes=0 outputs num_features values: a GCP head pools tokens of width C into
    d(d+1)/2 values (asserted instead), while forward_features keeps the token width (asserted as timm does)."""
    device = 'meta'
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, device=device, dtype=torch.float32).eval()
    timm_tests._assert_model_api_contract(model, name, device)
    pooled = 32896 if name.endswith('_isqrt') else 384 + 6 * 24 * 24  # SoT (Small preset): class token + h·r²
    assert model.num_classes == 1000 and model.num_features == 384 and model.head_hidden_size == pooled
    assert model.in_chans == model.default_cfg['input_size'][0]
    x = torch.randn((1, *model.default_cfg['input_size']), device=device)
    feats = model.forward_features(x)
    assert feats.shape == (1, 197, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
    timm_tests._assert_dtype_change_after_forward(model, x)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (1, model.head_hidden_size)
    model = timm.create_model(name, pretrained=False, num_classes=0, device=device, dtype=torch.float32).eval()
    assert model(x).shape == (1, model.head_hidden_size)
    state_dict = model.state_dict()
    assert model.default_cfg['classifier'] + '.weight' in timm.create_model(name, device=device).state_dict()
    assert model.default_cfg['first_conv'] + '.weight' in state_dict
    timm_tests._assert_reset_classifier_preserves_parent_device_dtype(model)
    timm_tests._assert_factory_device(name, device)
    timm_tests._assert_frozen_survives_reset_and_resize(name, device, reset_pool=False)
