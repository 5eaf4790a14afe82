"""Pretrained tags per architecture. GENERATED from zoo/registry.yaml by scripts/gen_zoo.py; do not edit.

What the two tables hold: ``timm_gcp.zoo.render_zoo_cfgs``.
"""
__all__ = ['FULL_TAGS', 'BACKBONE_TAGS']

FULL_TAGS = {}

BACKBONE_TAGS = {
    'resnet18_gcp': {
        'tv_in1k': {
            'timm_model': 'resnet18.tv_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet18.tv_in1k (torchvision ImageNet-1k weights, as '
                'republished by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly '
                'initialised, so fine-tune before use.'
            ),
        },
    },
    'resnet34_gcp': {
        'tv_in1k': {
            'timm_model': 'resnet34.tv_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet34.tv_in1k (torchvision ImageNet-1k weights, as '
                'republished by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly '
                'initialised, so fine-tune before use.'
            ),
        },
    },
    'resnet50_gcp': {
        'tv_in1k': {
            'timm_model': 'resnet50.tv_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet50.tv_in1k (torchvision ImageNet-1k weights, as '
                'republished by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly '
                'initialised, so fine-tune before use.'
            ),
        },
        'a1_in1k': {
            'timm_model': 'resnet50.a1_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet50.a1_in1k (timm ResNet Strikes Back A1 recipe '
                '(arXiv:2110.00476), trained by timm); the GCP head (global_pool.conv, global_pool.bn, '
                'fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'resnet101_gcp': {
        'tv_in1k': {
            'timm_model': 'resnet101.tv_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet101.tv_in1k (torchvision ImageNet-1k weights, as '
                'republished by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly '
                'initialised, so fine-tune before use.'
            ),
        },
        'a1_in1k': {
            'timm_model': 'resnet101.a1_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet101.a1_in1k (timm ResNet Strikes Back A1 recipe '
                '(arXiv:2110.00476), trained by timm); the GCP head (global_pool.conv, global_pool.bn, '
                'fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'resnet50d_gcp': {
        'ra2_in1k': {
            'timm_model': 'resnet50d.ra2_in1k',
            'notes': (
                'Backbone-only: weights of timm resnet50d.ra2_in1k (timm RandAugment (RA2) recipe, '
                'trained by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly '
                'initialised, so fine-tune before use.'
            ),
        },
    },
    'convnext_tiny_gcp': {
        'fb_in1k': {
            'timm_model': 'convnext_tiny.fb_in1k',
            'origin_url': 'https://github.com/facebookresearch/ConvNeXt',
            'notes': (
                'Backbone-only: weights of timm convnext_tiny.fb_in1k (Facebook Research ConvNeXt '
                'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'convnext_small_gcp': {
        'fb_in1k': {
            'timm_model': 'convnext_small.fb_in1k',
            'origin_url': 'https://github.com/facebookresearch/ConvNeXt',
            'notes': (
                'Backbone-only: weights of timm convnext_small.fb_in1k (Facebook Research ConvNeXt '
                'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'efficientnet_b0_gcp': {
        'ra_in1k': {
            'timm_model': 'efficientnet_b0.ra_in1k',
            'origin_url': 'https://github.com/huggingface/pytorch-image-models',
            'notes': (
                'Backbone-only: weights of timm efficientnet_b0.ra_in1k (timm RandAugment recipe, trained'
                ' by timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly initialised, '
                'so fine-tune before use.'
            ),
        },
    },
    'regnety_032_gcp': {
        'ra_in1k': {
            'timm_model': 'regnety_032.ra_in1k',
            'origin_url': 'https://github.com/huggingface/pytorch-image-models',
            'notes': (
                'Backbone-only: weights of timm regnety_032.ra_in1k (timm RandAugment recipe, trained by '
                'timm); the GCP head (global_pool.conv, global_pool.bn, fc) is freshly initialised, so '
                'fine-tune before use.'
            ),
        },
    },
    'vit_small_patch16_224_gcp': {
        'augreg_in21k_ft_in1k': {
            'timm_model': 'vit_small_patch16_224.augreg_in21k_ft_in1k',
            'origin_url': 'https://github.com/google-research/vision_transformer',
            'notes': (
                'Backbone-only: weights of timm vit_small_patch16_224.augreg_in21k_ft_in1k (Google AugReg'
                ' weights (ImageNet-21k, fine-tuned on ImageNet-1k), as republished by timm); the GCP '
                'head (global_pool.conv, global_pool.bn, fc) is freshly initialised, so fine-tune before '
                'use.'
            ),
        },
        'augreg_in1k': {
            'timm_model': 'vit_small_patch16_224.augreg_in1k',
            'origin_url': 'https://github.com/google-research/vision_transformer',
            'notes': (
                'Backbone-only: weights of timm vit_small_patch16_224.augreg_in1k (Google AugReg weights '
                '(ImageNet-1k only), as republished by timm); the GCP head (global_pool.conv, '
                'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'deit_small_patch16_224_gcp': {
        'fb_in1k': {
            'timm_model': 'deit_small_patch16_224.fb_in1k',
            'origin_url': 'https://github.com/facebookresearch/deit',
            'notes': (
                'Backbone-only: weights of timm deit_small_patch16_224.fb_in1k (Facebook Research DeiT '
                'ImageNet-1k weights, as republished by timm); the GCP head (global_pool.conv, '
                'global_pool.bn, fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
    'swin_tiny_patch4_window7_224_gcp': {
        'ms_in1k': {
            'timm_model': 'swin_tiny_patch4_window7_224.ms_in1k',
            'origin_url': 'https://github.com/microsoft/Swin-Transformer',
            'notes': (
                'Backbone-only: weights of timm swin_tiny_patch4_window7_224.ms_in1k (Microsoft Swin '
                'Transformer ImageNet-1k weights, as republished by timm); the GCP head '
                '(global_pool.conv, global_pool.bn, fc) is freshly initialised, so fine-tune before use.'
            ),
        },
    },
}

# the same weights as the family named on the right
BACKBONE_TAGS['resnet50_ls1_gcp'] = BACKBONE_TAGS['resnet50_gcp']
BACKBONE_TAGS['resnet101_ls1_gcp'] = BACKBONE_TAGS['resnet101_gcp']
