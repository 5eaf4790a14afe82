"""GCP layers: `MatrixSqrt`, the pooling modules (`CovPool`, `DropCovPool`, `SoTPool`) and the hybrid method switch."""
from .cov_pool import CovPool, TooFewPositionsError, gcp_out_features
from .dropcov import DropCovPool
from .matrix_sqrt import MatrixSqrt, OnnxExportError, check_onnx_export, onnx_missing_operator, set_gcp_path
from .method_switch import get_gcp_method, set_gcp_method
from .sot import SoTPool

__all__ = ['MatrixSqrt', 'CovPool', 'DropCovPool', 'SoTPool', 'gcp_out_features', 'set_gcp_method',
    'get_gcp_method', 'set_gcp_path', 'OnnxExportError', 'check_onnx_export', 'onnx_missing_operator',
    'TooFewPositionsError']
