"""timm entrypoints of the GCP models; importing this package registers them with timm."""
from .resnet_gcp import ResNetGcp
