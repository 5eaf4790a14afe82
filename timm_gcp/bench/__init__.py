"""Benchmarks: the meta-layer timing harness (``meta_layers``) and the model-level benchmark (``models``) behind
``scripts/bench_meta_layers.py``, ``scripts/compare_meta_layers.py`` and ``scripts/benchmark.py``."""
from .meta_layers import (
    BASELINE, errors_vs_exact, isqrt_matmul_flops, matmul_gflops, matmul_probe, time_methods, time_pooling)
from .models import (
    TARGET_FAMILY, TARGETS, BenchConfig, bench_groups, eigh_kernels, eigh_path, format_markdown, run_benchmark,
    saved_tensor_bytes)

__all__ = ['BASELINE', 'time_pooling', 'errors_vs_exact', 'isqrt_matmul_flops', 'matmul_gflops', 'matmul_probe',
           'time_methods', 'BenchConfig',
           'bench_groups', 'eigh_kernels', 'eigh_path', 'format_markdown', 'run_benchmark', 'saved_tensor_bytes',
           'TARGETS', 'TARGET_FAMILY']
