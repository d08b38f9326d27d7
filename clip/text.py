"""CLIP tokenizer and prompt templates (SPEC §2, §3).

Both come from ``open_clip``: its BPE tokenizer is identical to OpenAI's (start/end tokens
49406/49407, context 77) and ``OPENAI_IMAGENET_TEMPLATES`` are the 80 ImageNet templates in
OpenAI's order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip import tokenize as _open_clip_tokenize
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407

# The 80 OpenAI ImageNet templates as format strings, in order.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
# SPEC §3: TagCLIP appends five scene templates.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
TAGCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """(len(texts), context_length) int64 token ids, zero padded; overlong text is cut and
    ends with the end token."""
    return _open_clip_tokenize(list(texts), context_length=context_length)
