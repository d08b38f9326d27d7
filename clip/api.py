"""OpenAI's ``clip`` API, unchanged, for code written against it: ``clip.load``,
``clip.available_models``, ``clip.tokenize``; the model's ``encode_image``, ``encode_text`` and
``model(image, text)``.

:func:`load` returns ``(model, preprocess)`` as OpenAI's does, in OpenAI's dtypes (float16 on
CUDA, float32 on the CPU). The toolkit's own entry point, with precision, cache, architecture
and safety options, is :func:`clip.loading.load_clip`.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from toolkit.devices import resolve_device

from .loading import OPENAI_MODELS, load_clip
from .preprocess import openai_transform


def available_models() -> list[str]:
    """The names :func:`load` downloads (OpenAI's ViTs; ResNets are not supported)."""
    return list(OPENAI_MODELS)


def load(name: Union[str, os.PathLike], device: Union[str, torch.device, None] = None, jit: bool = False,
         download_root: Optional[str] = None):
    """OpenAI's ``clip.load``: ``(model, preprocess)`` for a model name or a checkpoint file.

    ``device`` defaults to CUDA where available; the weights are float16 on CUDA and float32
    on the CPU, as OpenAI's loader leaves them. ``jit=True`` (OpenAI's TorchScript model) is
    not offered: the same weights load as this package's model."""
    if jit:
        raise ValueError("jit=True is not supported: this package loads the checkpoint's weights into its own "
                         "model (use jit=False)")
    device = resolve_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_clip(name, device=device, dtype=dtype, cache_dir=download_root)
    return model, openai_transform(model.visual.input_resolution)
