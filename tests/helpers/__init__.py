"""What the tests share besides fixtures (those are in ``tests/conftest.py``), one module per concern:

- ``data``: the checkout root, small ImageFolders, subprocess environments, checkpoint readers;
- ``functional``: SPD/covariance generators and reference roots and gradients for the meta-layer tests;
- ``models``: the registered names, small model builds, an offline Hub cache;
- ``hub_server``: an in-memory Hugging Face Hub on 127.0.0.1;
- ``timm_suite``: timm's own model tests run on the GCP models.

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative imports of test modules), so tests import
``from helpers.data import ROOT``.
"""
