"""Which cuSOLVER kernels one ``torch.linalg.eigh`` call on CUDA runs, and what ``eig_device='cpu'`` costs.

Prints the profiler's events for eigh of 8 float64 256×256 matrices (a per-matrix loop shows kernel counts that grow
with the batch: one ``sytrd`` tridiagonalisation per matrix), then the median forward+backward time of ``pade`` with
the eigendecomposition on the GPU and on the host CPU (``eig_device='cpu'``), beside ``isqrt``, for B = 32, 64, 128,
d = 256, M = 49. Needs CUDA.

    python scripts/probe_cuda_eigh.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from timm_gcp import method_dtype, sqrtm
from timm_gcp.paper import random_covariances


def bench(dev: torch.device, b: int, m: int, method: str, eig_device, reps: int = 5) -> float:
    dtype = method_dtype(method)  # the covariance in the method's precision, as a GCP head forms it
    cov = random_covariances(b, m, dim=256, dtype=dtype, device=dev).requires_grad_()
    g = torch.randn(b, 256, 256, device=dev, dtype=dtype)
    opts = {'eig_device': eig_device} if eig_device else {}
    ts = []
    for _ in range(reps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        (sqrtm(cov, method, check=False, **opts) * g).sum().backward()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts = sorted(ts[2:])
    return ts[len(ts) // 2] * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit('probe_cuda_eigh.py needs a CUDA device')
    dev = torch.device('cuda')
    a = torch.randn(8, 256, 64, device=dev, dtype=torch.float64)
    a = a @ a.transpose(1, 2)
    torch.linalg.eigh(a)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        torch.linalg.eigh(a)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.count)
    print('events:', [(e.key[:70], e.count) for e in events[:14]])
    print('threads', torch.get_num_threads())
    for b in (32, 64, 128):
        for eig_device in (None, 'cpu'):
            print(f'B={b} pade eig_device={eig_device}: {bench(dev, b, 49, "pade", eig_device):.1f} ms fwd+bwd',
                  flush=True)
        print(f'B={b} isqrt: {bench(dev, b, 49, "isqrt", None):.1f} ms', flush=True)


if __name__ == '__main__':
    main()
