import torch

import timm_gcp


def test_svd_root_squares_back():
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    c = timm_gcp.covariance(x)
    q = timm_gcp.sqrtm(c, 'svd')
    torch.testing.assert_close(q @ q, c, rtol=0, atol=1e-12)
