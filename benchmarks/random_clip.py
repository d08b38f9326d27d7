"""A full-size random CLIP ViT-B/16 from a seed, for benchmarks (no download).

Parameters follow OpenAI's own initialisation, are rounded through float16 (the released
checkpoint's dtype) and ``logit_scale`` is raised to ln(100), the trained value, so that
softmaxes are as peaked as with real weights.
"""
from __future__ import annotations

import math

import torch

from clip.model import CLIP

VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
               vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
               transformer_heads=8, transformer_layers=12)
TRAINED_LOGIT_SCALE = math.log(100.0)


def random_state_dict(seed: int = 0, cfg: dict = VIT_B16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = CLIP(**cfg)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            t = torch.ones_like(p)
        elif name.endswith("bias"):
            t = torch.zeros_like(p)
        elif name == "logit_scale":
            t = torch.tensor(TRAINED_LOGIT_SCALE)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            t = torch.randn(p.shape, generator=gen) * fan_in ** -0.5
        sd[name] = t.half()
    return sd
