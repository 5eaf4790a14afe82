"""Pure tensor functions: covariance, matrix square roots and their backward kernels (no nn.Module).

The public names are re-exported here; the backward kernels, their weight tables and the iteration helpers stay in
their modules (``eig_sqrt``, ``newton_schulz``, ``mpa``, ``pade_series``, ``gram``, ``checks``).
"""
from .checks import NonFiniteError, check_covariance, check_features, check_finite, portable_options
from .covariance import covariance, triu_unvec, triu_vec
from .eig_sqrt import EPS, eig_sqrtm
from .gram import GRAM_MAX_FRACTION, GRAM_PATHS, gram_eig_sqrtm, gram_mpa_sqrtm, gram_ns_sqrtm, use_gram
from .mpa import mpa_sqrtm
from .newton_schulz import ns_sqrtm
from .pooling import cov_pool, features_sqrtm
from .registry import (
    COMPUTE_DTYPES, METHODS, MethodSpec, PrecisionWarning, method_dtype, register_method, resolve_method, sqrtm)
from .second_order import DROPCOV_SCALE, channel_dropout, dropcov_rate, svpn, token_cross_cov

__all__ = [
    'covariance', 'triu_vec', 'triu_unvec', 'cov_pool', 'sqrtm', 'METHODS', 'MethodSpec', 'COMPUTE_DTYPES',
    'register_method', 'resolve_method', 'method_dtype', 'PrecisionWarning', 'NonFiniteError', 'EPS',
    'check_covariance', 'check_features', 'check_finite', 'portable_options', 'eig_sqrtm', 'ns_sqrtm', 'mpa_sqrtm',
    'features_sqrtm', 'GRAM_PATHS', 'GRAM_MAX_FRACTION', 'use_gram', 'gram_eig_sqrtm', 'gram_ns_sqrtm',
    'gram_mpa_sqrtm', 'DROPCOV_SCALE', 'channel_dropout', 'dropcov_rate', 'svpn', 'token_cross_cov',
]
