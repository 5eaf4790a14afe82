"""Export of GCP models: ONNX (both torch exporters and timm's helper), torch.export, TorchScript and torch.compile.

Each test here backs one cell of the export table in docs/models.md. The models are built as users build them
(``timm.create_model``), small: ResNet-18 with ``gcp_dim=16`` at 64 px (a 2×2 final map, so 4 positions for a 16×16
covariance: the rank-deficient case a GCP head always meets).

Tolerance of ONNX Runtime against eager PyTorch, float32: atol 1e-5 and rtol 1e-4 on logits of magnitude ~1. ONNX
Runtime runs its own convolution and matmul kernels, which sum in another order than PyTorch's; the five Newton–Schulz
steps of ``isqrt`` keep that rounding (~1e-7 measured) at the same size, so 1e-5 leaves two orders of margin while a
wrong triangle order, a missing trace normalisation or a wrong batch axis gives errors of 1e-2 and more.
"""
import io

import onnx  # the dev extra installs onnx, onnxruntime and onnxscript (the dynamo exporter's dependency)
import onnxruntime as ort
import pytest
import timm
import torch

import timm_gcp  # noqa: F401  (registers the models)
from timm_gcp import METHODS
from timm_gcp.layers import CovPool, OnnxExportError, onnx_missing_operator

ONNX_METHODS = [m for m in METHODS if onnx_missing_operator(m) is None]
NON_ONNX_METHODS = [m for m in METHODS if onnx_missing_operator(m) is not None]
ATOL, RTOL = 1e-5, 1e-4
SIZE = 64


def _model(method, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(f'resnet18_gcp_{method}', gcp_dim=16, num_classes=10, **kwargs).eval()
    # non-trivial BN statistics in the head, so the exported graph must carry them
    model.global_pool.bn.running_mean.uniform_(-0.2, 0.2)
    model.global_pool.bn.running_var.uniform_(0.5, 2.0)
    return model


def _x(batch, size=SIZE, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_onnx(path, model, batches, size=SIZE):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    for b in batches:
        x = _x(b, size, seed=b)
        out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        with torch.no_grad():
            ref = model(x)
        assert out.shape == ref.shape == (b, 10)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_onnx_expressible_methods():
    """ONNX has neither eigh nor Cholesky: isqrt (matmuls only) and mpa (its denominator inverted by matmuls while
    exporting) export; the eigen-methods do not."""
    assert ONNX_METHODS == ['isqrt', 'mpa']
    for m in METHODS:
        assert (onnx_missing_operator(m) or '').startswith('linalg_eigh') == METHODS[m].eigen, m
    with pytest.raises(ValueError, match='unknown matrix square-root method .sqrt.*isqrt'):
        onnx_missing_operator('sqrt')


def test_triu_vec_export_needs_no_triu_indices():
    """While tracing, the upper-triangle index is computed in closed form with ops ONNX has (the graph holds no
    triu_indices); it is exactly torch.triu_indices' order for every size, and the traced function gives what eager
    gives (which caches the torch.triu_indices index)."""
    from timm_gcp.functional import triu_unvec, triu_vec
    from timm_gcp.functional.covariance import _triu_index_traceable
    for d in (1, 2, 3, 16, 255, 256, 1000, 4097):
        rows, cols = torch.triu_indices(d, d)
        assert torch.equal(_triu_index_traceable(d, torch.device('cpu')), rows * d + cols), d
    for d in (1, 3, 16, 256):
        m = torch.arange(float(d * d)).view(1, d, d)
        rows, cols = torch.triu_indices(d, d)
        assert torch.equal(triu_vec(m)[0], m[0, rows, cols]), d
        assert torch.equal(triu_unvec(triu_vec(m), symmetric=False)[0], m[0].triu()), d
    traced = torch.jit.trace(triu_vec, torch.randn(2, 5, 5))
    assert 'triu_indices' not in str(traced.graph)
    m = torch.randn(3, 5, 5)
    assert torch.equal(traced(m), triu_vec(m))


def test_triu_vec_index_made_under_inference_mode_serves_training():
    """The eager index is cached; one first made under torch.inference_mode (as timm's onnx_export and validate run
    the model) must still be usable where autograd saves it for backward."""
    from timm_gcp.functional import triu_vec
    from timm_gcp.functional.covariance import _triu_index_cached
    _triu_index_cached.cache_clear()
    with torch.inference_mode():
        triu_vec(torch.randn(1, 7, 7))
    m = torch.randn(2, 7, 7, requires_grad=True)
    triu_vec(m).sum().backward()
    assert torch.equal(m.grad[0], torch.ones(7, 7).triu())


def test_mpa_denominator_inverse_by_matmuls_is_the_solve():
    """The ONNX form of mpa's Padé denominator solve (Newton–Schulz inverse, matmuls only) gives the Cholesky solve's
    result to float64 rounding times the denominator's condition number (≤ 4e3 at degree 8, reached by
    rank-deficient covariances as here): atol 1e-10 on entries of order 1."""
    from timm_gcp.functional.mpa import _denominator_range, _poly, _spd_inverse_ns, pade_sqrt_coefficients
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 16, 5, dtype=torch.float64, generator=g)
    cov = feats @ feats.transpose(1, 2) / 5  # rank 5 of 16
    for degree in (3, 5, 8):
        p, q = pade_sqrt_coefficients(degree, degree)
        x = torch.eye(16, dtype=torch.float64) - cov / torch.linalg.matrix_norm(cov).view(-1, 1, 1)
        powers = [x]
        for _ in range(degree - 1):
            powers.append(powers[-1] @ x)
        eye = torch.eye(16, dtype=torch.float64)
        den, num = _poly(powers, q, eye), _poly(powers, p, eye)
        ref = torch.cholesky_solve(num, torch.linalg.cholesky(den))
        got = _spd_inverse_ns(den, *_denominator_range(degree)) @ num
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize('method', ONNX_METHODS)
def test_onnx_torchscript_exporter_fixed_and_dynamic_batch(tmp_path, method):
    model = _model(method)
    fixed, dynamic = tmp_path / 'fixed.onnx', tmp_path / 'dynamic.onnx'
    torch.onnx.export(model, (_x(2),), str(fixed), dynamo=False)
    _check_onnx(fixed, model, batches=(2,))
    torch.onnx.export(model, (_x(2),), str(dynamic), dynamo=False, input_names=['x'], output_names=['logits'],
                      dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}})
    onnx.checker.check_model(str(dynamic), full_check=True)
    _check_onnx(dynamic, model, batches=(2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize('method', ONNX_METHODS)
def test_onnx_dynamo_exporter_fixed_and_dynamic_batch(tmp_path, method):
    model = _model(method)
    fixed, dynamic = tmp_path / 'fixed.onnx', tmp_path / 'dynamic.onnx'
    torch.onnx.export(model, (_x(2),), str(fixed), dynamo=True)
    _check_onnx(fixed, model, batches=(2,))
    torch.onnx.export(model, (_x(2),), str(dynamic), dynamo=True, input_names=['x'],
                      dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    onnx.checker.check_model(str(dynamic), full_check=True)
    _check_onnx(dynamic, model, batches=(2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize('use_dynamo', [False, True])
def test_onnx_timm_onnx_export(tmp_path, use_dynamo):
    """timm's own export helper (timm.utils.onnx.onnx_export, as timm's onnx_export.py script calls it), with the
    ONNX checker and its own forward check, dynamic batch; the TorchScript path also with dynamic height and width
    (covariance pooling takes any number of positions)."""
    from timm.utils.onnx import onnx_export
    model = _model('isqrt')
    path = tmp_path / 'timm.onnx'
    onnx_export(model, str(path), example_input=_x(2), check=True, check_forward=True, use_dynamo=use_dynamo,
                dynamic_size=not use_dynamo)
    _check_onnx(path, model, batches=(2, 3))
    if not use_dynamo:
        _check_onnx(path, model, batches=(2,), size=96)


@pytest.mark.parametrize('method', NON_ONNX_METHODS)
def test_onnx_torchscript_exporter_refuses_with_the_reason(tmp_path, method):
    model = _model(method)
    with pytest.raises(OnnxExportError) as e:
        torch.onnx.export(model, (_x(2),), str(tmp_path / 'm.onnx'), dynamo=False)
    msg = str(e.value)
    assert f"'{method}'" in msg and onnx_missing_operator(method) in msg
    assert "set_gcp_method(model, 'isqrt')" in msg and 'torch.export' in msg and 'torch.compile' in msg
    assert not (tmp_path / 'm.onnx').exists()
    assert model(_x(1)).shape == (1, 10)  # the model still works after the refused export


@pytest.mark.slow
@pytest.mark.parametrize('method', NON_ONNX_METHODS)
def test_onnx_dynamo_exporter_refuses_with_the_reason(tmp_path, method):
    """The dynamo exporter wraps every error of its torch.export step in its own TorchExportError: ours is the
    cause and the message's exception summary, before any operator lookup."""
    model = _model(method)
    with pytest.raises(torch.onnx.OnnxExporterError) as e:
        torch.onnx.export(model, (_x(2),), str(tmp_path / 'm.onnx'), dynamo=True)
    cause = e.value.__cause__
    assert isinstance(cause, OnnxExportError), repr(cause)
    assert f"'{method}'" in str(cause) and onnx_missing_operator(method) in str(cause)
    assert str(cause) in str(e.value)
    assert not (tmp_path / 'm.onnx').exists()


@pytest.mark.slow
def test_onnx_refusal_then_export_after_switch_to_isqrt(tmp_path):
    """What the error advises: the same weights, switched to isqrt, export."""
    model = _model('pade')
    with pytest.raises(OnnxExportError):
        torch.onnx.export(model, (_x(2),), str(tmp_path / 'm.onnx'), dynamo=False)
    timm_gcp.set_gcp_method(model, 'isqrt')
    torch.onnx.export(model, (_x(2),), str(tmp_path / 'm.onnx'), dynamo=False, input_names=['x'],
                      dynamic_axes={'x': {0: 'batch'}})
    _check_onnx(tmp_path / 'm.onnx', model, batches=(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize('method', list(METHODS))
def test_torch_export_and_save_load_round_trip(method):
    """torch.export with a dynamic batch; the ExportedProgram, and the one read back by torch.export.load, compute
    what the eager model computes (the same kernels: to rounding)."""
    model = _model(method)
    ep = torch.export.export(model, (_x(2),), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for b in (2, 3, 1):
        x = _x(b, seed=b)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(ep.module()(x), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loaded.module()(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('method', list(METHODS))
def test_torchscript_script_refuses_every_method_with_the_reason(method):
    with pytest.raises(RuntimeError, match='cannot be compiled with torch.jit.script.*torch.compile'):
        torch.jit.script(_model(method))


@pytest.mark.slow
@pytest.mark.parametrize('method', list(METHODS))
def test_torch_compile_covpool_forward_and_backward(method):
    """torch.compile (default inductor backend) of the GCP pooling: forward and the custom backward match eager.
    isqrt compiles to one graph; the others run their autograd.Function with graph breaks (thread count for the
    batched eigh, cached Padé coefficients)."""
    torch.manual_seed(0)
    pool = CovPool(8, gcp_dim=6, method=method).eval()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    ref = pool(x)
    g, = torch.autograd.grad(ref.square().sum(), x)
    torch._dynamo.reset()
    out = torch.compile(pool, fullgraph=method == 'isqrt')(x)
    g_c, = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-4)
