"""CLIP ViT in OpenAI's layout, with attention maps and masks as arguments (the backbone)."""
from toolkit.devices import PRECISIONS, precision_dtype, resolve_device

from .loading import OPENAI_MODELS, default_cache_dir, load, load_checkpoint, load_model
from .model import CLIP, TransformerOutput, VisionOutput, build_model, resize_positional_embedding
from .text import IMAGENET_TEMPLATES, SCENE_TEMPLATES, TAGCLIP_TEMPLATES, tokenize

__all__ = [
    "load", "load_checkpoint", "load_model", "OPENAI_MODELS", "default_cache_dir", "PRECISIONS", "precision_dtype",
    "resolve_device",
    "CLIP", "VisionOutput", "TransformerOutput", "build_model", "resize_positional_embedding",
    "IMAGENET_TEMPLATES", "SCENE_TEMPLATES", "TAGCLIP_TEMPLATES", "tokenize",
]
