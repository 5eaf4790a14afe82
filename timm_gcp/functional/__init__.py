"""Pure tensor functions: covariance, matrix square roots and their backward kernels (no nn.Module)."""
from .checks import (
    NonFiniteError, check_covariance, check_features, check_finite, check_square_batch, portable_options)
from .covariance import covariance, triu_unvec, triu_vec
from .eig_sqrt import EPS, KERNELS, WEIGHTS, eig_forward, eig_sqrtm, kernel_weight
from .gram import GRAM_MAX_FRACTION, GRAM_PATHS, gram_eig_sqrtm, gram_mpa_sqrtm, gram_ns_sqrtm, use_gram
from .mpa import mpa_sqrtm, pade_sqrt_coefficients
from .newton_schulz import ns_sqrtm, ns_vjp
from .pooling import cov_pool, features_sqrtm
from .registry import (
    COMPUTE_DTYPES, METHODS, MethodSpec, PrecisionWarning, method_dtype, register_method, resolve_method, sqrtm)
from .second_order import DROPCOV_SCALE, channel_dropout, dropcov_rate, svpn, token_cross_cov
