"""timm-gcp: Global Covariance Pooling (matrix square-root) heads and model zoo for timm.

``import timm_gcp`` registers the ``*_gcp_*`` model entrypoints with timm; ``timm_gcp.create_model`` also builds
``<any timm model>_gcp_<method>``.
"""
from .functional import METHODS, MethodSpec, cov_pool, covariance, method_dtype, sqrtm, triu_unvec, triu_vec
from .version import __version__
from . import layers, models
from .layers import CovPool, MatrixSqrt, get_gcp_method, set_gcp_method, set_gcp_path
from .models import create_model, resolve_model_name

__all__ = ['METHODS', 'MethodSpec', 'cov_pool', 'covariance', 'method_dtype', 'sqrtm', 'triu_vec', 'triu_unvec',
    '__version__', 'CovPool', 'MatrixSqrt', 'set_gcp_method', 'get_gcp_method', 'set_gcp_path', 'create_model',
    'resolve_model_name']
