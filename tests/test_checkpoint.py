"""timm_gcp.checkpoint: the one reader of checkpoints and weight files (safe loading, unwrapping, metadata)."""
import argparse

import pytest
import torch

from timm_gcp import checkpoint as ck


class _Payload:
    """Not allowed by the weights-only unpickler: loading it would need arbitrary unpickling."""


def test_safe_loading(tmp_path):
    ok = tmp_path / 'ok.pth.tar'
    torch.save({'state_dict': {'module.a': torch.ones(2)}, 'args': argparse.Namespace(model='x', lr=0.1)}, ok)
    loaded = ck.load_state_dict_safely(str(ok))
    assert loaded['args'].model == 'x'
    assert list(ck.unwrap_state_dict(loaded)) == ['a']
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {'a': torch.ones(2)}, 'extra': _Payload()}, bad)
    with pytest.raises(ck.CheckpointError, match=r'weights_only=True.*_Payload'):
        ck.load_state_dict_safely(str(bad))
    with pytest.raises(ck.CheckpointError, match='not found'):
        ck.load_state_dict_safely(str(tmp_path / 'missing.pth'))


def test_unwrap_strips_every_wrapper_and_prefix():
    """DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes in either order, under any of the state-dict
    entries timm's saver and other training scripts use; the EMA entry first only when asked for."""
    a, b = torch.zeros(1), torch.ones(1)
    assert ck.unwrap_state_dict({'_orig_mod.module.x': a, 'module._orig_mod.y': b}) == {'x': a, 'y': b}
    assert ck.unwrap_state_dict({'model': {'module.x': a}})['x'] is a
    both = {'state_dict': {'x': a}, 'state_dict_ema': {'x': b}}
    assert ck.unwrap_state_dict(both)['x'] is a and ck.unwrap_state_dict(both, prefer_ema=True)['x'] is b
    assert ck.unwrap_state_dict({'model_ema': {'x': b}, 'model': {'x': a}}, prefer_ema=True)['x'] is b
    assert ck.unwrap_state_dict({'state_dict_ema': {'x': b}})['x'] is b  # a file holding only EMA weights
    with pytest.raises(ck.CheckpointError, match="'epoch' is a int"):
        ck.unwrap_state_dict({'epoch': 3, 'x': a})
    with pytest.raises(ck.CheckpointError, match='holds no state dict'):
        ck.unwrap_state_dict({})


def test_one_reader_and_one_unwrap_for_every_tool():
    """convert, validate, hub and the models' pretrained filter use this module's functions, not copies."""
    from timm_gcp import checkpoint_model, convert, publish, validate
    assert convert.read_checkpoint is ck.read_checkpoint
    assert checkpoint_model.read_checkpoint is ck.read_checkpoint
    assert convert.CheckpointError is validate.CheckpointError is publish.CheckpointError is ck.CheckpointError


def test_read_checkpoint_metadata(tmp_path):
    path = tmp_path / 'c.pth.tar'
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'epoch': 4, 'arch': 'resnet18_gcp_isqrt', 'gcp_method': 'svd',
                'gcp_kwargs': {'eps': 1e-12}, 'class_names': ['ant', 'bee'], 'metric': 50.0,
                'args': argparse.Namespace(model='resnet18_gcp_isqrt', img_size=64)}, path)
    sd, info = ck.read_checkpoint(str(path))
    assert list(sd) == ['a']
    assert info == dict(arch='resnet18_gcp_isqrt', gcp_method='svd', gcp_kwargs={'eps': 1e-12}, epoch=4, metric=50.0,
                        class_names=['ant', 'bee'], args=dict(model='resnet18_gcp_isqrt', img_size=64), ema=False)
    assert ck.checkpoint_gcp_method(info) == ('svd', {'eps': 1e-12})
    # Earlier checkpoints kept the method in args only.
    assert ck.checkpoint_gcp_method({'args': {'gcp_method': 'pade', 'gcp_method_kwargs': None}}) == ('pade', {})
    assert ck.checkpoint_gcp_method({'args': {'model': 'resnet18'}}) is None


def test_non_finite_entries_names_the_tensors():
    sd = {'w': torch.ones(3), 'bn.running_var': torch.tensor([1.0, float('inf')]), 'n': torch.tensor(3),
          'b': torch.tensor([float('nan')])}
    assert ck.non_finite_entries(sd) == ['bn.running_var', 'b']
    with pytest.raises(ck.CheckpointError, match=r'model holds NaN/inf in 2 tensor\(s\): bn.running_var, b'):
        ck.check_finite_state_dict(sd, 'model')
    assert ck.non_finite_entries({'w': torch.ones(2)}) == []
