"""Model-level speed and memory of GCP heads against timm's backbones with their own pooling, one process,
interleaved.

Models are benchmarked in groups of one backbone family: ``<family>`` (timm's model, its default pooling) and the
GCP models ``<family>_gcp_<method>`` of that family, ``<method>`` also being a head without a root (``dropcov``, in
the default ResNet-50 group; ``sot`` on token families through ``models``), so every head's cost is a fraction of the
same backbone's. Every model of a group is built once and kept resident; each
timing round visits all of them in a rotated order, so drift of a shared machine (other jobs, thermal state,
allocator warm-up) spreads evenly over them instead of favouring whichever ran first. Measurements:

- train step (forward, cross-entropy, backward, SGD step) → images/s and memory of the step;
- head cost ÷ backbone cost: ``forward_features`` + its backward (for a fixed random upstream gradient) against
  ``forward_head`` + its backward on the saved, detached features;
- for GCP heads, the covariance alone (forward + backward on the head's reduced features) formed in float64 and in
  float32, in the same rounds: the float64 covariance's share of the head's cost.

On CUDA the step runs under autocast (bf16 by default; fp16 with a ``GradScaler``); the GCP meta-layer itself keeps
autocast out (it computes in its method's dtype). Memory: on CUDA the peak allocated during the step above what was
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

from ..functional import METHODS, covariance, use_gram
from ..layers import MatrixSqrt

__all__ = ['BenchConfig', 'bench_groups', 'eigh_path', 'eigh_kernels', 'saved_tensor_bytes', 'run_benchmark',
           'format_markdown', 'TARGETS', 'TARGET_FAMILY']

_logger = logging.getLogger(__name__)

# Targets, as ratios. The CPU head targets are stated for the ResNet-50 backbone (TARGET_FAMILY).
TARGETS = {
    'cpu_throughput_ratio_b32': 0.95,  # GCP ResNet-50 images/s ÷ resnet50's, train step at batch ≥ 32 (CPU_B32_METHODS)
    'cpu_head_ratio_isqrt': 0.15,
    'cpu_head_ratio_eigen': 0.25,
    'cpu_pade_over_svd': 1.15,
    'cuda_throughput_ratio_isqrt': 0.85,
}
TARGET_FAMILY = 'resnet50'
CPU_B32_METHODS = ('isqrt', 'pade', 'svd', 'mpa')


@dataclasses.dataclass
class BenchConfig:
    """What to benchmark and how long; the defaults are the CPU ``--quick`` sizing.

    ``baseline`` and ``methods`` make the first group (``<baseline>`` and ``<baseline>_gcp_<method>``); ``models``
    adds GCP models of any family (``<family>_gcp_<method>``), each group compared with its own ``<family>``.
    """
    methods: Sequence[str] = ('isqrt', 'svd', 'pade', 'lyap', 'mpa', 'dropcov')
    baseline: str = 'resnet50'
    models: Sequence[str] = ()
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


def bench_groups(cfg: BenchConfig) -> List[Tuple[str, List[Tuple[str, Optional[str]]]]]:
    """(family, [(model name, method or None for the family's own model)]) in benchmark order.

    Raises:
        ValueError: a name in ``cfg.models`` is not ``<family>_gcp_<method>``.
    """
    groups: Dict[str, List[Tuple[str, Optional[str]]]] = {}
    if cfg.baseline:
        groups[cfg.baseline] = [(cfg.baseline, None)] + [(f'{cfg.baseline}_gcp_{m}', m) for m in cfg.methods]
    for name in cfg.models:
        family, sep, method = name.rpartition('_gcp_')
        if not sep or not family or not method:
            raise ValueError(f'--models takes GCP model names <family>_gcp_<method>, got {name!r}')
        group = groups.setdefault(family, [(family, None)])
        if (name, method) not in group:
            group.append((name, method))
    return list(groups.items())


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


def _reduced_features_module(model: nn.Module) -> Optional[nn.Module]:
    """The module whose output the GCP head takes the covariance of: ``act`` of the pooling module that has a
    reduction (``CovPool``, ``DropCovPool``); None for heads without one (SoT forms cross-covariances of its
    projections)."""
    for m in model.modules():
        if (hasattr(m, 'sqrtm') or getattr(m, 'head_name', None) == 'dropcov') and isinstance(
                getattr(m, 'act', None), nn.Module):
            return m.act
    return None


class _Entry:
    """One benchmarked model with its optimiser, timing lists and the hook that keeps its head's reduced features."""

    def __init__(self, family: str, label: str, method: Optional[str], model: Optional[nn.Module]) -> None:
        self.family, self.label, self.method, self.model = family, label, method, model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if model is not None else None
        self.step_s: List[float] = []
        self.backbone_s: List[float] = []
        self.head_s: List[float] = []
        self.cov_s: Dict[str, List[float]] = {'float64': [], 'float32': []}
        self.step_mem = 0
        self.error: Optional[str] = None
        self.reduced: Optional[torch.Tensor] = None
        module = _reduced_features_module(model) if model is not None and method is not None else None
        if module is not None:
            module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.reduced = output.detach()


class _Runner:
    """Runs the measurements of one group on one device with one batch."""

    def __init__(self, cfg: BenchConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        gen = torch.Generator().manual_seed(cfg.seed)
        self.x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
        if cfg.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == 'float16'
                                           and device.type == 'cuda')

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.cfg.amp_dtype),
                              enabled=self.cfg.amp and self.device.type == 'cuda')

    def timed(self, fn: Callable[[], None]) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - t0

    def train_step(self, e: _Entry) -> None:
        e.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(e.model(self.x), self.y)
        self.scaler.scale(loss).backward()
        self.scaler.step(e.opt)
        self.scaler.update()

    def split_step(self, e: _Entry) -> None:
        """Time forward_features+backward and forward_head+backward separately (no optimiser step)."""
        e.model.zero_grad(set_to_none=True)
        feats: List[torch.Tensor] = []

        def backbone() -> None:
            with self.autocast():
                feats.append(e.model.forward_features(self.x))
            feats[0].backward(torch.ones_like(feats[0]) / feats[0].numel())

        def head() -> None:
            f = feats[0].detach().requires_grad_(True)
            with self.autocast():
                out = e.model.forward_head(f)
            out.float().sum().backward()

        e.backbone_s.append(self.timed(backbone))
        e.head_s.append(self.timed(head))

    def covariance_step(self, e: _Entry) -> None:
        """Time the covariance alone (forward + backward) on the head's reduced features, in float64 and float32."""
        if e.reduced is None:
            return
        feats = e.reduced.float().flatten(2)
        for name, dtype in (('float64', torch.float64), ('float32', torch.float32)):
            x = feats.clone().requires_grad_(True)
            grad = torch.ones(feats.shape[0], feats.shape[1], feats.shape[1], dtype=dtype, device=self.device)
            e.cov_s[name].append(self.timed(lambda: covariance(x, check=False, dtype=dtype).backward(grad)))

    def warmup(self, e: _Entry) -> None:
        """Warm-up steps (also allocate optimiser state), then the memory of one step."""
        for _ in range(self.cfg.warmup):
            self.train_step(e)
        _sync(self.device)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.train_step(e)
            _sync(self.device)
            e.step_mem = torch.cuda.max_memory_allocated(self.device) - before
        else:
            with saved_tensor_bytes() as counter:
                self.train_step(e)
            e.step_mem = counter.bytes


def _build(family: str, names: Sequence[Tuple[str, Optional[str]]], cfg: BenchConfig, device: torch.device,
        model_fn: Callable[[str], nn.Module]) -> List[_Entry]:
    entries = []
    for name, method in names:
        try:
            model = model_fn(name).to(device).train()
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            entries.append(_Entry(family, name, method, model))
        except Exception as e:
            _logger.warning('cannot build %s: %s', name, e)
            entry = _Entry(family, name, method, None)
            entry.error = f'{type(e).__name__}: {e}'
            entries.append(entry)
    return entries


def _measure_group(runner: _Runner, entries: List[_Entry], say: Callable[[str], None]) -> None:
    """Warm-up, then ``rounds`` interleaved rounds of train steps, split steps and covariance timings."""
    for e in entries:
        if e.error is None:
            try:
                runner.warmup(e)
            except Exception as err:
                _logger.warning('%s failed during warm-up: %s', e.label, err)
                e.error = f'{type(err).__name__}: {err}'
    live = [e for e in entries if e.error is None]
    for r in range(runner.cfg.rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for e in order:
            e.step_s.append(runner.timed(lambda: runner.train_step(e)))
        for e in order:
            runner.split_step(e)
            runner.covariance_step(e)
        say(f'round {r + 1}/{runner.cfg.rounds}: ' + ', '.join(f'{e.label} {e.step_s[-1] * 1e3:.0f} ms' for e in order))


def _group_rows(entries: Sequence[_Entry], cfg: BenchConfig, device: torch.device) -> List[Dict[str, Any]]:
    # The models of a group share one backbone, so its forward_features cost is one quantity measured by every entry;
    # the pooled median is a steadier denominator on a shared machine than each entry's own few samples.
    live = [e for e in entries if e.error is None and e.step_s]
    all_bb = [t for e in live for t in e.backbone_s]
    pooled_bb = statistics.median(all_bb) if all_bb else None
    base = next((e for e in live if e.method is None), None)
    base_ips = cfg.batch_size / statistics.median(base.step_s) if base is not None else None
    rows = []
    for e in entries:
        row: Dict[str, Any] = dict(family=e.family, model=e.label, method=e.method or 'default pool',
                                   batch=cfg.batch_size)
        if e.error is not None or not e.step_s:
            rows.append(dict(row, error=e.error or 'not measured'))
            continue
        step = statistics.median(e.step_s)
        bb, hd = statistics.median(e.backbone_s), statistics.median(e.head_s)
        row.update(
            images_s=cfg.batch_size / step, step_ms=step * 1e3,
            throughput_ratio=(cfg.batch_size / step) / base_ips if base_ips else None,
            step_mem_mib=e.step_mem / 2 ** 20, state_mib=_state_bytes(e.model, e.opt) / 2 ** 20,
            backbone_ms=bb * 1e3, head_ms=hd * 1e3, head_ratio=hd / bb, head_ratio_pooled=hd / pooled_bb,
            params_m=sum(p.numel() for p in e.model.parameters()) / 1e6)
        if e.cov_s['float64']:
            c64, c32 = statistics.median(e.cov_s['float64']), statistics.median(e.cov_s['float32'])
            row.update(cov64_ms=c64 * 1e3, cov32_ms=c32 * 1e3, cov64_share=c64 / hd)
        if e.reduced is not None and e.method in METHODS:  # a head with a matrix root (not DropCov or SoT)
            d, m = e.reduced.shape[1], e.reduced.shape[2] * e.reduced.shape[3]
            path = next((r.path for r in e.model.modules() if isinstance(r, MatrixSqrt)), 'auto')
            row['root_path'] = 'gram' if use_gram(d, m, path, e.method) else 'cov'
        row['target'], row['meets_target'] = _target(device, e.family, e.method, row)
        rows.append(row)
    return rows


def _target(device: torch.device, family: str, method: Optional[str],
        row: Dict[str, Any]) -> Tuple[Optional[str], Optional[bool]]:
    """(what the row's target is, whether it is met), or (None, None) where no target is stated."""
    if method is None or family != TARGET_FAMILY:
        return None, None
    if device.type == 'cpu' and row.get('batch', 0) >= 32:
        if method not in CPU_B32_METHODS:
            return None, None
        limit = TARGETS['cpu_throughput_ratio_b32']
        return f'throughput ≥ {limit}× {family}', row['throughput_ratio'] >= limit
    if device.type == 'cuda':
        if method == 'isqrt':
            limit = TARGETS['cuda_throughput_ratio_isqrt']
            return f'throughput ≥ {limit}× {family}', row['throughput_ratio'] >= limit
        return None, None
    if method == 'isqrt':
        limit = TARGETS['cpu_head_ratio_isqrt']
    elif method in METHODS and METHODS[method].eigen:
        limit = TARGETS['cpu_head_ratio_eigen']
    else:
        return None, None
    return f'head/backbone ≤ {limit}', row['head_ratio_pooled'] <= limit


def _checks(rows: Sequence[Dict[str, Any]], device: torch.device) -> List[Dict[str, Any]]:
    """Per family: ``pade`` head time over ``svd`` head time (target ≤ 1.15 on CPU for the target family)."""
    out = []
    for family in dict.fromkeys(r['family'] for r in rows):
        heads = {r['method']: r['head_ms'] for r in rows if r['family'] == family and 'head_ms' in r}
        if 'pade' in heads and 'svd' in heads:
            ratio = heads['pade'] / heads['svd']
            limit = TARGETS['cpu_pade_over_svd'] if device.type == 'cpu' and family == TARGET_FAMILY else None
            out.append(dict(family=family, check='pade head ÷ svd head', value=ratio,
                            target=f'≤ {limit}' if limit else None, met=None if limit is None else ratio <= limit))
    return out


def _env(cfg: BenchConfig, device: torch.device) -> Dict[str, Any]:
    return dict(
        device=(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
        torch=torch.__version__, threads=torch.get_num_threads(), batch=cfg.batch_size, img_size=cfg.img_size,
        rounds=cfg.rounds, amp=(cfg.amp_dtype if cfg.amp and device.type == 'cuda' else 'off'),
        eigh_path=eigh_path(device),
        memory=('peak CUDA allocation during one train step above the resident state' if device.type == 'cuda'
                else 'bytes saved for backward during one train step (CPU has no allocator peak)'))


def run_benchmark(
        cfg: BenchConfig,
        progress: Optional[Callable[[str], None]] = None,
        model_fn: Optional[Callable[[str], nn.Module]] = None,
) -> Dict[str, Any]:
    """Benchmark every group of :func:`bench_groups`, one group resident at a time, interleaved within it.

    Args:
        cfg: what to run, sizing and device.
        progress: called with one line per finished phase.
        model_fn: name → model (default ``timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)``);
            tests pass small models here.

    Returns:
        {'rows': one dict per model (family, model, method, images_s, step_ms median, step_mem_mib, state_mib,
        backbone_ms, head_ms, head_ratio (own backbone), head_ratio_pooled (median backbone time of the group),
        throughput_ratio vs the family's own model, cov64_ms/cov32_ms/cov64_share for GCP heads, target,
        meets_target, or error), 'checks': :func:`_checks`, 'env': {...} describing the run}.

    Raises:
        RuntimeError: CUDA requested but not available.
        ValueError: a malformed name in ``cfg.models``.
    """
    say = progress or (lambda s: None)
    device = torch.device(cfg.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('device cuda requested but torch.cuda.is_available() is False')
    groups = bench_groups(cfg)
    if model_fn is None:
        import timm

        def model_fn(name: str) -> nn.Module:
            return timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)

    torch.manual_seed(cfg.seed)
    runner = _Runner(cfg, device)
    rows: List[Dict[str, Any]] = []
    for family, names in groups:
        entries = _build(family, names, cfg, device, model_fn)
        say(f'{family}: built {sum(e.error is None for e in entries)} of {len(entries)} models')
        _measure_group(runner, entries, say)
        rows += _group_rows(entries, cfg, device)
        del entries  # free the group before building the next one
    return dict(rows=rows, checks=_checks(rows, device), env=_env(cfg, device))


def format_markdown(result: Dict[str, Any]) -> str:
    """The benchmark result as a markdown table with an environment header and the checks below it."""
    env = result['env']
    lines = [f'Device: {env["device"]}; torch {env["torch"]}; {env["threads"]} threads; batch {env["batch"]} at '
             f'{env["img_size"]} px; {env["rounds"]} interleaved rounds (medians); AMP {env["amp"]}.',
             f'eigh path: {env["eigh_path"]}.', f'Memory column: {env["memory"]}.', '',
             'Each family is compared with its own timm model (default pooling). head/backbone (own) divides by the '
             'model\'s own backbone median; (pooled) by the median over the family\'s backbone timings (the same '
             'backbone); the CPU targets use the pooled ratio. cov64/cov32: the covariance alone, forward+backward '
             'on the head\'s reduced features, formed in float64/float32 (what forming Σ costs: on the Gram path the '
             'head forms the M×M Gram matrix instead); cov64 share = cov64 ÷ head. path: where the root was computed, '
             'gram (the M×M Gram matrix) or cov (the d×d covariance).', '',
             '| model | images/s | × family | step ms | step MiB | state MiB | backbone ms | head ms | '
             'head/backbone (own) | head/backbone (pooled) | cov64 ms | cov32 ms | cov64 share | path | target | met |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    f = lambda v, p='.2f': '—' if v is None else format(v, p)  # noqa: E731
    for r in result['rows']:
        if 'error' in r:
            lines.append(f'| {r["model"]} | error: {r["error"][:80]} |' + ' |' * 14)
            continue
        met = '—' if r['meets_target'] is None else ('yes' if r['meets_target'] else '**no**')
        lines.append(
            f'| {r["model"]} | {f(r["images_s"])} | {f(r["throughput_ratio"], ".3f")} | {f(r["step_ms"], ".0f")} | '
            f'{f(r["step_mem_mib"], ".0f")} | {f(r["state_mib"], ".0f")} | {f(r["backbone_ms"], ".0f")} | '
            f'{f(r["head_ms"], ".1f")} | {f(r["head_ratio"], ".3f")} | {f(r["head_ratio_pooled"], ".3f")} | '
            f'{f(r.get("cov64_ms"), ".1f")} | {f(r.get("cov32_ms"), ".1f")} | {f(r.get("cov64_share"), ".3f")} | '
            f'{r.get("root_path", "—")} | {r["target"] or "—"} | {met} |')
    if result.get('checks'):
        lines += ['', '| family | check | value | target | met |', '|---|---|---|---|---|']
        for c in result['checks']:
            met = '—' if c['met'] is None else ('yes' if c['met'] else '**no**')
            lines.append(f'| {c["family"]} | {c["check"]} | {c["value"]:.3f} | {c["target"] or "—"} | {met} |')
    return '\n'.join(lines)
