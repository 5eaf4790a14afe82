"""Model-level speed and memory of GCP heads against timm's average-pooled ResNet, one process, interleaved.

Every model is built once and kept resident; each timing round visits all models in a rotated order, so drift of a
shared machine (other jobs, thermal state, allocator warm-up) spreads evenly over them instead of favouring whichever
ran first. Two measurements:

- train step (forward, cross-entropy, backward, SGD step) → images/s and memory of the step;
- head cost ÷ backbone cost: ``forward_features`` + its backward (for a fixed random upstream gradient) against
  ``forward_head`` + its backward on the saved, detached features.

On CUDA the step runs under autocast (bf16 by default; fp16 with a ``GradScaler``); the GCP meta-layer itself keeps
autocast out (it computes in float32/float64). Memory: on CUDA the peak allocated during the step above what was
allocated before it; on CPU (no allocator statistics) the bytes autograd saves for backward, counted once per storage.
Parameter, gradient and optimiser-state bytes are reported separately.
"""
import dataclasses
import logging
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['BenchConfig', 'eigh_path', 'eigh_kernels', 'saved_tensor_bytes', 'run_benchmark', 'format_markdown', 'TARGETS']

_logger = logging.getLogger(__name__)

EIGEN_HEADS = ('svd', 'pade', 'taylor', 'trunc', 'topn', 'newton', 'pi', 'lyap')

# Targets from issue 6, as ratios: (device type, what, limit).
TARGETS = {
    'cpu_head_ratio_isqrt': 0.15,
    'cpu_head_ratio_eigen': 0.25,
    'cuda_throughput_ratio_isqrt': 0.85,
}


@dataclasses.dataclass
class BenchConfig:
    """What to benchmark and how long; the defaults are the CPU ``--quick`` sizing."""
    methods: Sequence[str] = ('isqrt', 'svd', 'pade', 'lyap', 'mpa')
    baseline: str = 'resnet50'
    batch_size: int = 8
    img_size: int = 224
    num_classes: int = 1000
    warmup: int = 1
    rounds: int = 3
    device: str = 'cpu'
    amp: bool = False
    amp_dtype: str = 'bfloat16'
    channels_last: bool = False
    seed: int = 0


def eigh_kernels(events: Iterable[Tuple[str, int]]) -> str:
    """The eigensolver kernels among profiler ``(name, count)`` events, as 'name ×count' (template arguments cut).

    cuSOLVER names its kernels by stage: ``sytrd`` (tridiagonalisation), ``laed``/``stedc`` (divide and conquer),
    ``syevj`` (Jacobi); one ``sytrd`` launch per matrix of the batch means a per-matrix loop.
    """
    stages = ('sytrd', 'laed', 'stedc', 'syev', 'jacobi', 'evd')
    counts: Dict[str, int] = {}
    for k, n in events:
        if any(s in k.lower() for s in stages):
            short = k.split('<')[0].split('(')[0].replace('void ', '').strip()[:40]
            counts[short] = counts.get(short, 0) + n
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
    return ', '.join(f'{k} ×{n}' for k, n in top) or 'none matched'


def eigh_path(device: torch.device, probe: bool = True) -> str:
    """Which eigendecomposition path ``torch.linalg.eigh`` takes for a batch of 256×256 float64 matrices.

    On CUDA, torch ≥ 2.12 issues one batched cuSOLVER call (``cusolverDnXsyevBatched``); older versions loop one
    ``syevd`` call per matrix for n > 32. With ``probe`` the claim is checked by profiling one call and listing the
    cuSOLVER/eigen kernels that ran.
    """
    version = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
    if device.type != 'cuda':
        return f'CPU LAPACK (syevd per matrix), torch {torch.__version__}, {torch.get_num_threads()} threads'
    expected = ('batched cusolverDnXsyevBatched (torch >= 2.12)' if version >= (2, 12)
                else 'per-matrix syevd loop (torch < 2.12)')
    desc = f'CUDA {torch.version.cuda}, torch {torch.__version__}: expected {expected}'
    if not probe:
        return desc
    try:
        from torch.profiler import ProfilerActivity, profile

        a = torch.randn(8, 256, 64, device=device, dtype=torch.float64)
        a = a @ a.transpose(1, 2)
        torch.linalg.eigh(a)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.linalg.eigh(a)
            torch.cuda.synchronize(device)
        desc += '; kernels seen for 8 matrices: ' + eigh_kernels((e.key, e.count) for e in prof.key_averages())
    except Exception as e:  # the profiler is a nicety; the version rule above still holds
        desc += f'; kernel probe failed ({type(e).__name__})'
    return desc


class saved_tensor_bytes:
    """Context manager counting the bytes autograd saves for backward, each storage once.

    The CPU stand-in for a peak-memory reading: the saved activations are what a training step holds at its peak
    (on top of parameters, gradients and optimiser state).
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen = set()
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += st.nbytes()
        except RuntimeError:  # tensors without storage (e.g. sparse/meta) do not count
            pass
        return t

    def __enter__(self) -> 'saved_tensor_bytes':
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # gradients
    for state in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return n


class _Entry:
    """One benchmarked model with its optimiser, data and timing lists."""

    def __init__(self, label: str, method: Optional[str], model: nn.Module, cfg: BenchConfig,
            device: torch.device) -> None:
        self.label, self.method, self.model = label, method, model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.step_s: List[float] = []
        self.backbone_s: List[float] = []
        self.head_s: List[float] = []
        self.step_mem = 0
        self.error: Optional[str] = None


def _autocast(cfg: BenchConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg.amp_dtype),
                          enabled=cfg.amp and device.type == 'cuda')


def run_benchmark(
        cfg: BenchConfig,
        progress: Optional[Callable[[str], None]] = None,
        model_fn: Optional[Callable[[str], nn.Module]] = None,
) -> Dict[str, Any]:
    """Benchmark the baseline and ``<baseline>_gcp_<method>`` for every method, interleaved.

    Args:
        cfg: sizing and device.
        progress: called with one line per finished phase.
        model_fn: name → model (default ``timm.create_model(name, num_classes=cfg.num_classes)``); tests pass small
            models here.

    Returns:
        {'rows': one dict per model (label, method, images_s, step_ms median, step_mem_mib, state_mib,
        backbone_ms, head_ms, head_ratio (own backbone), head_ratio_pooled (median backbone time of all models),
        throughput_ratio vs baseline, error), 'env': {...} describing the run}.
    """
    say = progress or (lambda s: None)
    device = torch.device(cfg.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('device cuda requested but torch.cuda.is_available() is False')
    if model_fn is None:
        import timm
        import timm_gcp  # noqa: F401  registers the *_gcp_* entrypoints

        def model_fn(name: str) -> nn.Module:
            return timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)

    torch.manual_seed(cfg.seed)
    names = [(cfg.baseline, None)] + [(f'{cfg.baseline}_gcp_{m}', m) for m in cfg.methods]
    entries: List[_Entry] = []
    for name, method in names:
        try:
            model = model_fn(name).to(device).train()
        except Exception as e:
            _logger.warning('cannot build %s: %s', name, e)
            e_ = _Entry(name, method, nn.Identity(), cfg, device)
            e_.error = f'{type(e).__name__}: {e}'
            entries.append(e_)
            continue
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        entries.append(_Entry(name, method, model, cfg, device))
    say(f'built {sum(e.error is None for e in entries)} of {len(entries)} models')

    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == 'float16'
                                  and device.type == 'cuda')

    def train_step(e: _Entry) -> None:
        e.opt.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            loss = F.cross_entropy(e.model(x), y)
        scaler.scale(loss).backward()
        scaler.step(e.opt)
        scaler.update()

    def split_step(e: _Entry) -> None:
        """Time forward_features+backward and forward_head+backward separately (no optimiser step)."""
        e.model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(cfg, device):
            feats = e.model.forward_features(x)
        g_feat = torch.ones_like(feats) / feats.numel()
        feats.backward(g_feat)
        _sync(device)
        t1 = time.perf_counter()
        f = feats.detach().requires_grad_(True)
        with _autocast(cfg, device):
            out = e.model.forward_head(f)
        out.float().sum().backward()
        _sync(device)
        t2 = time.perf_counter()
        e.backbone_s.append(t1 - t0)
        e.head_s.append(t2 - t1)

    live = [e for e in entries if e.error is None]
    # warm-up (also allocates optimiser state) and memory of one step
    for e in live:
        try:
            for _ in range(cfg.warmup):
                train_step(e)
            _sync(device)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                train_step(e)
                _sync(device)
                e.step_mem = torch.cuda.max_memory_allocated(device) - before
            else:
                with saved_tensor_bytes() as counter:
                    train_step(e)
                e.step_mem = counter.bytes
        except Exception as err:
            _logger.warning('%s failed during warm-up: %s', e.label, err)
            e.error = f'{type(err).__name__}: {err}'
    live = [e for e in live if e.error is None]
    say(f'warm-up done ({len(live)} models)')

    for r in range(cfg.rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for e in order:
            _sync(device)
            t0 = time.perf_counter()
            train_step(e)
            _sync(device)
            e.step_s.append(time.perf_counter() - t0)
        for e in order:
            split_step(e)
        say(f'round {r + 1}/{cfg.rounds}: ' + ', '.join(f'{e.label} {e.step_s[-1] * 1e3:.0f} ms' for e in order))

    rows = []
    # Every model shares the baseline's backbone, so its forward_features cost is one quantity measured by every
    # entry; the pooled median is a steadier denominator on a shared machine than each entry's own few samples.
    all_bb = [t for e in live for t in e.backbone_s]
    pooled_bb = statistics.median(all_bb) if all_bb else None
    base = next((e for e in entries if e.method is None and e.error is None), None)
    base_ips = cfg.batch_size / statistics.median(base.step_s) if base is not None and base.step_s else None
    for e in entries:
        row: Dict[str, Any] = dict(model=e.label, method=e.method or 'avg pool', batch=cfg.batch_size)
        if e.error is not None:
            row['error'] = e.error
            rows.append(row)
            continue
        step = statistics.median(e.step_s)
        bb, hd = statistics.median(e.backbone_s), statistics.median(e.head_s)
        row.update(
            images_s=cfg.batch_size / step, step_ms=step * 1e3,
            throughput_ratio=(cfg.batch_size / step) / base_ips if base_ips else None,
            step_mem_mib=e.step_mem / 2 ** 20, state_mib=_state_bytes(e.model, e.opt) / 2 ** 20,
            backbone_ms=bb * 1e3, head_ms=hd * 1e3, head_ratio=hd / bb, head_ratio_pooled=hd / pooled_bb,
            params_m=sum(p.numel() for p in e.model.parameters()) / 1e6)
        row['target'], row['meets_target'] = _target(device, e.method, row)
        rows.append(row)
    env = dict(
        device=(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
        torch=torch.__version__, threads=torch.get_num_threads(), batch=cfg.batch_size, img_size=cfg.img_size,
        rounds=cfg.rounds, amp=(cfg.amp_dtype if cfg.amp and device.type == 'cuda' else 'off'),
        eigh_path=eigh_path(device),
        memory=('peak CUDA allocation during one train step above the resident state' if device.type == 'cuda'
                else 'bytes saved for backward during one train step (CPU has no allocator peak)'))
    return dict(rows=rows, env=env)


def _target(device: torch.device, method: Optional[str], row: Dict[str, Any]):
    if method is None:
        return None, None
    if device.type == 'cuda':
        if method == 'isqrt':
            limit = TARGETS['cuda_throughput_ratio_isqrt']
            return f'throughput ≥ {limit}× baseline', row['throughput_ratio'] >= limit
        return None, None
    if method == 'isqrt':
        limit = TARGETS['cpu_head_ratio_isqrt']
    elif method in EIGEN_HEADS:
        limit = TARGETS['cpu_head_ratio_eigen']
    else:
        return None, None
    return f'head/backbone ≤ {limit}', row['head_ratio_pooled'] <= limit


def format_markdown(result: Dict[str, Any]) -> str:
    """The benchmark result as a markdown table with a one-line environment header."""
    env = result['env']
    lines = [f'Device: {env["device"]}; torch {env["torch"]}; {env["threads"]} threads; batch {env["batch"]} at '
             f'{env["img_size"]} px; {env["rounds"]} interleaved rounds (medians); AMP {env["amp"]}.',
             f'eigh path: {env["eigh_path"]}.', f'Memory column: {env["memory"]}.', '',
             'head/backbone (own) divides by the model\'s own backbone median; (pooled) by the median over all '
             'models\' backbone timings (the same backbone); the CPU targets use the pooled ratio.', '',
             '| model | images/s | × baseline | step ms | step MiB | state MiB | backbone ms | head ms | '
             'head/backbone (own) | head/backbone (pooled) | target | met |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    f = lambda v, p='.2f': '—' if v is None else format(v, p)  # noqa: E731
    for r in result['rows']:
        if 'error' in r:
            lines.append(f'| {r["model"]} | error: {r["error"][:80]} | | | | | | | | | | |')
            continue
        met = '—' if r['meets_target'] is None else ('yes' if r['meets_target'] else '**no**')
        lines.append(
            f'| {r["model"]} | {f(r["images_s"])} | {f(r["throughput_ratio"], ".3f")} | {f(r["step_ms"], ".0f")} | '
            f'{f(r["step_mem_mib"], ".0f")} | {f(r["state_mib"], ".0f")} | {f(r["backbone_ms"], ".0f")} | '
            f'{f(r["head_ms"], ".1f")} | {f(r["head_ratio"], ".3f")} | {f(r["head_ratio_pooled"], ".3f")} | '
            f'{r["target"] or "—"} | {met} |')
    return '\n'.join(lines)
