"""Pure tensor functions: covariance, matrix square roots and their backward kernels (no nn.Module)."""
from .checks import check_finite, check_square_batch
from .covariance import covariance, triu_unvec, triu_vec
from .eig_sqrt import EPS, eig_sqrtm
from .newton_schulz import ns_sqrtm
from .registry import METHODS, MethodSpec, register_method, resolve_method, sqrtm
