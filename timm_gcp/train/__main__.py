"""``python -m timm_gcp.train``: the same as ``timm-gcp-train`` (also under ``torchrun -m``)."""
import sys

from .cli import main

sys.exit(main())
