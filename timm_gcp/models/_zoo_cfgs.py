"""Pretrained tags per architecture family. GENERATED from zoo/registry.yaml by scripts/gen_zoo.py; do not edit.

``PRETRAINED_TAGS[family][tag]`` is a dict of timm ``PretrainedCfg`` fields (hf_hub_id, num_classes, license,
origin_url, notes, ...). ``family`` is an architecture name with the method left out, e.g. ``resnet50_gcp`` applies to
``resnet50_gcp_<method>`` for backbone-only weights; full-model weights are listed under the exact architecture name.
"""
PRETRAINED_TAGS = {}
