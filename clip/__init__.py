"""CLIP ViT in OpenAI's layout, with attention maps and masks for TagCLIP and CLIP-ES."""
from .model import CLIP, VisionOutput, TransformerOutput, build_model, resize_positional_embedding
from .loading import (OPENAI_MODELS, PRECISIONS, default_cache_dir, load, load_checkpoint, precision_dtype,
                      resolve_device)
from .text import IMAGENET_TEMPLATES, SCENE_TEMPLATES, TAGCLIP_TEMPLATES, tokenize

__all__ = [
    "load", "load_checkpoint", "OPENAI_MODELS", "default_cache_dir", "PRECISIONS", "precision_dtype",
    "resolve_device",
    "CLIP", "VisionOutput", "TransformerOutput", "build_model", "resize_positional_embedding",
    "IMAGENET_TEMPLATES", "SCENE_TEMPLATES", "TAGCLIP_TEMPLATES", "tokenize",
]
