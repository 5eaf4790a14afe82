"""The GCP model-name parser."""
import pytest

from timm_gcp.models.naming import GcpName, is_gcp_name, parse_gcp_name


@pytest.mark.parametrize('name, backbone, method, tag', [
    ('resnet50_gcp_pade', 'resnet50', 'pade', ''),
    ('resnet50_ls1_gcp_isqrt.tv_in1k', 'resnet50_ls1', 'isqrt', 'tv_in1k'),
    ('mobilenetv3_large_100_gcp_svd', 'mobilenetv3_large_100', 'svd', ''),
    ('vit_small_patch16_224_gcp_mpa.augreg_in21k', 'vit_small_patch16_224', 'mpa', 'augreg_in21k'),
])
def test_parse_splits_backbone_method_and_tag(name, backbone, method, tag):
    p = parse_gcp_name(name)
    assert (p.backbone, p.method, p.tag) == (backbone, method, tag)
    assert p.name == name and str(p) == name
    assert p.arch == f'{backbone}_gcp_{method}' and p.family == f'{backbone}_gcp'
    assert is_gcp_name(name)


def test_with_method_keeps_backbone_and_tag():
    p = parse_gcp_name('resnet50_gcp_isqrt.tv_in1k').with_method('pade')
    assert p == GcpName('resnet50', 'pade', 'tv_in1k')
    with pytest.raises(ValueError, match="unknown matrix square-root method 'nope'.*valid methods: isqrt"):
        p.with_method('nope')


@pytest.mark.parametrize('name', ['resnet50', 'hf-hub:org/resnet50_gcp_pade', 'local-dir:/x/resnet50_gcp_pade', None])
def test_non_gcp_names_give_none(name):
    assert parse_gcp_name(name) is None and not is_gcp_name(name)


def test_bad_gcp_names_are_errors():
    with pytest.raises(ValueError, match="unknown matrix square-root method 'foo'"):
        parse_gcp_name('resnet50_gcp_foo')
    with pytest.raises(ValueError, match='no backbone name'):
        parse_gcp_name('_gcp_pade')
