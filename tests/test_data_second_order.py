"""The built-in dataset: deterministic, balanced, and separable by second-order statistics only."""
import pytest
import torch

from timm_gcp.data import SecondOrderDataset, class_correlations

NUM_CLASSES = 4


def _stack(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).double(), torch.tensor(ys)


@pytest.fixture(scope='module')
def data():
    kw = dict(num_classes=NUM_CLASSES, img_size=24, seed=3)
    return _stack(SecondOrderDataset('train', 240, **kw)), _stack(SecondOrderDataset('validation', 160, **kw))


def test_deterministic_and_split_disjoint():
    a = SecondOrderDataset('train', 8, img_size=8, seed=1)
    b = SecondOrderDataset('train', 8, img_size=8, seed=1)
    v = SecondOrderDataset('validation', 8, img_size=8, seed=1)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(a[5][0], v[5][0])
    assert not torch.equal(a[5][0], SecondOrderDataset('train', 8, img_size=8, seed=2)[5][0])
    x, y = a[6]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 6 % 4
    assert a.targets == [i % 4 for i in range(8)]


def test_class_correlations_unit_diagonal_spd():
    c = class_correlations(5, 3, 0.6, seed=0)
    assert c.shape == (5, 3, 3)
    torch.testing.assert_close(c.diagonal(dim1=1, dim2=2), torch.ones(5, 3, dtype=torch.float64))
    assert (torch.linalg.eigvalsh(c) > 0.05).all()
    # Distinct classes: off-diagonals differ by more than sampling noise.
    off = c[:, [0, 0, 1], [1, 2, 2]]
    assert torch.cdist(off, off).add(torch.eye(5)).min() > 0.2


def test_first_order_statistics_equal_across_classes(data):
    (x, y), _ = data
    img_mean = x.mean((2, 3))  # (N, c)
    img_var = x.var((2, 3))
    for stat in (img_mean, img_var):
        overall = stat.mean(0)
        for k in range(NUM_CLASSES):
            s = stat[y == k]
            se = s.std(0) / s.shape[0] ** 0.5
            # Five standard errors: 4 classes × 3 channels × 2 statistics = 24 comparisons, a false alarm ~1e-5.
            assert ((s.mean(0) - overall).abs() < 5 * se + 0.02).all(), (k, s.mean(0), overall)
    assert (img_mean.mean(0).abs() < 0.1).all()
    assert ((img_var.mean(0) - 1).abs() < 0.15).all()


def _features(x):
    f = x.flatten(2)
    mean = f.mean(-1)
    fc = f - mean[..., None]
    cov = fc @ fc.transpose(1, 2) / f.shape[-1]
    first = torch.cat([mean, f.var(-1)], 1)
    second = cov[:, [0, 0, 1], [1, 2, 2]] / cov.diagonal(dim1=1, dim2=2).prod(-1).sqrt()[:, None].clamp_min(1e-12)
    return first, second


def _nearest_centroid_acc(ftr, ytr, fva, yva):
    cent = torch.stack([ftr[ytr == k].mean(0) for k in range(NUM_CLASSES)])
    scale = ftr.std(0).clamp_min(1e-9)
    pred = torch.cdist(fva / scale, cent / scale).argmin(1)
    return (pred == yva).double().mean().item()


def test_covariance_separates_first_order_does_not(data):
    (xtr, ytr), (xva, yva) = data
    f1tr, f2tr = _features(xtr)
    f1va, f2va = _features(xva)
    acc_cov = _nearest_centroid_acc(f2tr, ytr, f2va, yva)
    acc_first = _nearest_centroid_acc(f1tr, ytr, f1va, yva)
    assert acc_cov > 0.9, acc_cov
    # Chance is 0.25; 160 validation samples put the 99.9% quantile of chance accuracy near 0.37.
    assert acc_first < 0.4, acc_first


def test_offset_keeps_means_equal_and_covariance_separating():
    kw = dict(num_classes=NUM_CLASSES, img_size=16, seed=3, offset_std=1.0)
    (xtr, ytr), (xva, yva) = _stack(SecondOrderDataset('train', 200, **kw)), _stack(
        SecondOrderDataset('validation', 120, **kw))
    f1tr, f2tr = _features(xtr)
    f1va, f2va = _features(xva)
    assert _nearest_centroid_acc(f2tr, ytr, f2va, yva) > 0.85
    assert _nearest_centroid_acc(f1tr, ytr, f1va, yva) < 0.45


@pytest.mark.parametrize('kwargs, match', [
    (dict(split='test'), 'split'),
    (dict(num_samples=0), 'num_samples'),
    (dict(img_size=2), 'img_size'),
    (dict(num_classes=1), 'num_classes'),
    (dict(strength=1.0), 'strength'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecondOrderDataset(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match='out of range'):
        SecondOrderDataset('train', 4)[4]
