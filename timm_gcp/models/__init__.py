"""timm entrypoints of the GCP models; importing this package registers them with timm."""
from .alexnet_gcp import AlexNetGcp
from .resnet_gcp import ResNetGcp
