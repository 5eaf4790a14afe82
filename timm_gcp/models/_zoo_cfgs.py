"""Pretrained tags per architecture family. GENERATED from zoo/registry.yaml by scripts/gen_zoo.py; do not edit.

``PRETRAINED_TAGS[family][tag]`` is a dict of timm ``PretrainedCfg`` fields (hf_hub_id, num_classes, license,
origin_url, notes, ...). ``family`` is an architecture name with the method left out, e.g. ``resnet50_gcp`` applies to
``resnet50_gcp_<method>`` for backbone-only weights; full-model weights are listed under the exact architecture name.
The first tag of each key is the default tag. Backbone-only cfgs describe a plain timm ResNet checkpoint (its ``fc`` is
1000 x C, not the GCP classifier): the model's pretrained filter keeps the backbone and leaves the GCP head freshly
initialised. ``BACKBONE_ONLY`` lists those keys and tags.
"""
PRETRAINED_TAGS = {'resnet18_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet18.tv_in1k',
                              'num_classes': 1000,
                              'input_size': (3, 224, 224),
                              'interpolation': 'bilinear',
                              'crop_pct': 0.875,
                              'mean': (0.485, 0.456, 0.406),
                              'std': (0.229, 0.224, 0.225),
                              'pool_size': (7, 7),
                              'first_conv': 'conv1',
                              'classifier': 'fc',
                              'license': 'bsd-3-clause',
                              'origin_url': 'https://github.com/pytorch/vision',
                              'notes': 'Backbone-only: ImageNet-1k weights of timm resnet18.tv_in1k (torchvision '
                                       'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                                       'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'}},
 'resnet34_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet34.tv_in1k',
                              'num_classes': 1000,
                              'input_size': (3, 224, 224),
                              'interpolation': 'bilinear',
                              'crop_pct': 0.875,
                              'mean': (0.485, 0.456, 0.406),
                              'std': (0.229, 0.224, 0.225),
                              'pool_size': (7, 7),
                              'first_conv': 'conv1',
                              'classifier': 'fc',
                              'license': 'bsd-3-clause',
                              'origin_url': 'https://github.com/pytorch/vision',
                              'notes': 'Backbone-only: ImageNet-1k weights of timm resnet34.tv_in1k (torchvision '
                                       'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                                       'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'}},
 'resnet50_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet50.tv_in1k',
                              'num_classes': 1000,
                              'input_size': (3, 224, 224),
                              'interpolation': 'bilinear',
                              'crop_pct': 0.875,
                              'mean': (0.485, 0.456, 0.406),
                              'std': (0.229, 0.224, 0.225),
                              'pool_size': (7, 7),
                              'first_conv': 'conv1',
                              'classifier': 'fc',
                              'license': 'bsd-3-clause',
                              'origin_url': 'https://github.com/pytorch/vision',
                              'notes': 'Backbone-only: ImageNet-1k weights of timm resnet50.tv_in1k (torchvision '
                                       'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                                       'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'},
                  'a1_in1k': {'hf_hub_id': 'timm/resnet50.a1_in1k',
                              'num_classes': 1000,
                              'input_size': (3, 224, 224),
                              'test_input_size': (3, 288, 288),
                              'interpolation': 'bicubic',
                              'crop_pct': 0.95,
                              'test_crop_pct': 1.0,
                              'mean': (0.485, 0.456, 0.406),
                              'std': (0.229, 0.224, 0.225),
                              'pool_size': (7, 7),
                              'first_conv': 'conv1',
                              'classifier': 'fc',
                              'license': 'apache-2.0',
                              'origin_url': 'https://github.com/huggingface/pytorch-image-models',
                              'notes': 'Backbone-only: ImageNet-1k weights of timm resnet50.a1_in1k (timm ResNet '
                                       'Strikes Back A1 recipe (arXiv:2110.00476), trained by timm); the GCP head '
                                       '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so fine-tune '
                                       'before use.'}},
 'resnet101_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet101.tv_in1k',
                               'num_classes': 1000,
                               'input_size': (3, 224, 224),
                               'interpolation': 'bilinear',
                               'crop_pct': 0.875,
                               'mean': (0.485, 0.456, 0.406),
                               'std': (0.229, 0.224, 0.225),
                               'pool_size': (7, 7),
                               'first_conv': 'conv1',
                               'classifier': 'fc',
                               'license': 'bsd-3-clause',
                               'origin_url': 'https://github.com/pytorch/vision',
                               'notes': 'Backbone-only: ImageNet-1k weights of timm resnet101.tv_in1k (torchvision '
                                        'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                                        'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'},
                   'a1_in1k': {'hf_hub_id': 'timm/resnet101.a1_in1k',
                               'num_classes': 1000,
                               'input_size': (3, 224, 224),
                               'test_input_size': (3, 288, 288),
                               'interpolation': 'bicubic',
                               'crop_pct': 0.95,
                               'test_crop_pct': 1.0,
                               'mean': (0.485, 0.456, 0.406),
                               'std': (0.229, 0.224, 0.225),
                               'pool_size': (7, 7),
                               'first_conv': 'conv1',
                               'classifier': 'fc',
                               'license': 'apache-2.0',
                               'origin_url': 'https://github.com/huggingface/pytorch-image-models',
                               'notes': 'Backbone-only: ImageNet-1k weights of timm resnet101.a1_in1k (timm ResNet '
                                        'Strikes Back A1 recipe (arXiv:2110.00476), trained by timm); the GCP head '
                                        '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so fine-tune '
                                        'before use.'}},
 'resnet50_ls1_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet50.tv_in1k',
                                  'num_classes': 1000,
                                  'input_size': (3, 224, 224),
                                  'interpolation': 'bilinear',
                                  'crop_pct': 0.875,
                                  'mean': (0.485, 0.456, 0.406),
                                  'std': (0.229, 0.224, 0.225),
                                  'pool_size': (14, 14),
                                  'first_conv': 'conv1',
                                  'classifier': 'fc',
                                  'license': 'bsd-3-clause',
                                  'origin_url': 'https://github.com/pytorch/vision',
                                  'notes': 'Backbone-only: ImageNet-1k weights of timm resnet50.tv_in1k (torchvision '
                                           'ImageNet-1k weights, as republished by timm); the GCP head '
                                           '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so '
                                           'fine-tune before use.'},
                      'a1_in1k': {'hf_hub_id': 'timm/resnet50.a1_in1k',
                                  'num_classes': 1000,
                                  'input_size': (3, 224, 224),
                                  'test_input_size': (3, 288, 288),
                                  'interpolation': 'bicubic',
                                  'crop_pct': 0.95,
                                  'test_crop_pct': 1.0,
                                  'mean': (0.485, 0.456, 0.406),
                                  'std': (0.229, 0.224, 0.225),
                                  'pool_size': (14, 14),
                                  'first_conv': 'conv1',
                                  'classifier': 'fc',
                                  'license': 'apache-2.0',
                                  'origin_url': 'https://github.com/huggingface/pytorch-image-models',
                                  'notes': 'Backbone-only: ImageNet-1k weights of timm resnet50.a1_in1k (timm ResNet '
                                           'Strikes Back A1 recipe (arXiv:2110.00476), trained by timm); the GCP head '
                                           '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so '
                                           'fine-tune before use.'}},
 'resnet101_ls1_gcp': {'tv_in1k': {'hf_hub_id': 'timm/resnet101.tv_in1k',
                                   'num_classes': 1000,
                                   'input_size': (3, 224, 224),
                                   'interpolation': 'bilinear',
                                   'crop_pct': 0.875,
                                   'mean': (0.485, 0.456, 0.406),
                                   'std': (0.229, 0.224, 0.225),
                                   'pool_size': (14, 14),
                                   'first_conv': 'conv1',
                                   'classifier': 'fc',
                                   'license': 'bsd-3-clause',
                                   'origin_url': 'https://github.com/pytorch/vision',
                                   'notes': 'Backbone-only: ImageNet-1k weights of timm resnet101.tv_in1k (torchvision '
                                            'ImageNet-1k weights, as republished by timm); the GCP head '
                                            '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so '
                                            'fine-tune before use.'},
                       'a1_in1k': {'hf_hub_id': 'timm/resnet101.a1_in1k',
                                   'num_classes': 1000,
                                   'input_size': (3, 224, 224),
                                   'test_input_size': (3, 288, 288),
                                   'interpolation': 'bicubic',
                                   'crop_pct': 0.95,
                                   'test_crop_pct': 1.0,
                                   'mean': (0.485, 0.456, 0.406),
                                   'std': (0.229, 0.224, 0.225),
                                   'pool_size': (14, 14),
                                   'first_conv': 'conv1',
                                   'classifier': 'fc',
                                   'license': 'apache-2.0',
                                   'origin_url': 'https://github.com/huggingface/pytorch-image-models',
                                   'notes': 'Backbone-only: ImageNet-1k weights of timm resnet101.a1_in1k (timm ResNet '
                                            'Strikes Back A1 recipe (arXiv:2110.00476), trained by timm); the GCP head '
                                            '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so '
                                            'fine-tune before use.'}}}

BACKBONE_ONLY = {'resnet18_gcp': ('tv_in1k',),
 'resnet34_gcp': ('tv_in1k',),
 'resnet50_gcp': ('tv_in1k', 'a1_in1k'),
 'resnet101_gcp': ('tv_in1k', 'a1_in1k'),
 'resnet50_ls1_gcp': ('tv_in1k', 'a1_in1k'),
 'resnet101_ls1_gcp': ('tv_in1k', 'a1_in1k')}
