"""CLIP ViT in OpenAI's layout, with attention maps and masks as arguments (the backbone).

OpenAI's API is here unchanged (``load`` returns ``(model, preprocess)``, ``available_models``,
``tokenize``); :func:`load_clip` is the toolkit's richer loader."""
from toolkit.devices import PRECISIONS, precision_dtype, resolve_device

from .api import available_models, load
from .loading import OPENAI_MODELS, default_cache_dir, load_checkpoint, load_clip, load_model
from .model import CLIP, Architecture, TransformerOutput, VisionOutput, build_model, resize_positional_embedding
from .text import IMAGENET_TEMPLATES, SCENE_TEMPLATES, TAGCLIP_TEMPLATES, tokenize

__all__ = [
    "load", "available_models", "tokenize",
    "load_clip", "load_checkpoint", "load_model", "OPENAI_MODELS", "default_cache_dir", "PRECISIONS",
    "precision_dtype", "resolve_device",
    "CLIP", "Architecture", "VisionOutput", "TransformerOutput", "build_model", "resize_positional_embedding",
    "IMAGENET_TEMPLATES", "SCENE_TEMPLATES", "TAGCLIP_TEMPLATES",
]
