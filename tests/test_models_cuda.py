"""Model-level CUDA checks (skipped without a GPU; `scripts/gpu_check.sh` runs them with `pytest -m cuda`)."""
import pytest
import timm
import torch

import timm_gcp  # noqa: F401  (registers the models)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA'),
]


@pytest.mark.parametrize('method', ['isqrt', 'pade', 'lyap', 'mpa'])
def test_amp_train_step_matches_fp32_eval_on_cuda(method):
    torch.manual_seed(0)
    model = timm.create_model(f'resnet18_gcp_{method}', num_classes=5, gcp_dim=32, device='cuda')
    x = torch.randn(4, 3, 112, 112, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = model(x)
    # the head computes in fp32/fp64 with autocast off; the classifier runs under autocast again
    assert out.device.type == 'cuda' and out.shape == (4, 5)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.global_pool.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        cpu = model.cpu()(x.cpu())
    # fp32 CUDA vs fp32 CPU forward of the same weights: TF32 and reduction order differ, nothing else
    torch.testing.assert_close(ref.cpu(), cpu, rtol=2e-2, atol=2e-2)


def test_eig_device_cpu_option_from_model_kwargs():
    model = timm.create_model('resnet18_gcp_pade', num_classes=3, gcp_dim=16, device='cuda',
                              gcp_kwargs={'eig_device': 'cpu'})
    out = model(torch.randn(2, 3, 64, 64, device='cuda'))
    out.sum().backward()
    assert out.device.type == 'cuda' and model.global_pool.conv.weight.grad.device.type == 'cuda'
