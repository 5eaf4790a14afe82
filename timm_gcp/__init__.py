"""timm-gcp: Global Covariance Pooling (matrix square-root) heads and model zoo for timm.

``import timm_gcp`` registers the ``*_gcp_*`` model entrypoints with timm.
"""
from .functional import METHODS, MethodSpec, covariance, sqrtm, triu_unvec, triu_vec
from .version import __version__

__all__ = ['METHODS', 'MethodSpec', 'covariance', 'sqrtm', 'triu_vec', 'triu_unvec', '__version__']
