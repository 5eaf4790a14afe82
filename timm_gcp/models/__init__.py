"""timm entrypoints of the GCP models; importing this package registers them with timm."""
from .alexnet_gcp import AlexNetGcp
from .backbone_gcp import GcpNet, create_model, fixed_input_size, resolve_model_name
from .naming import GcpName, parse_gcp_name
from .resnet_gcp import ResNetGcp

__all__ = ['AlexNetGcp', 'GcpNet', 'ResNetGcp', 'GcpName', 'parse_gcp_name', 'create_model', 'fixed_input_size',
           'resolve_model_name']
