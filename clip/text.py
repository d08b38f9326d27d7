"""CLIP tokenizer and prompt templates (SPEC §2, §3).

Both come from ``open_clip``: its BPE tokenizer is identical to OpenAI's (start/end tokens
49406/49407, context 77) and ``OPENAI_IMAGENET_TEMPLATES`` are the 80 ImageNet templates in
OpenAI's order.

Text longer than the context is an error (:class:`TextTooLongError`), as in the authors' code
(OpenAI's ``clip.tokenize`` raises unless told to truncate): a cut prompt would silently give
a class an embedding of some other text.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from open_clip.tokenizer import SimpleTokenizer
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


class TextTooLongError(ValueError):
    """A text whose tokens (start and end token included) do not fit the context."""

    def __init__(self, text: str, n_tokens: int, context_length: int):
        self.text = text
        self.n_tokens = n_tokens
        self.context_length = context_length
        super().__init__(f"{text!r} is {n_tokens} tokens long (start and end tokens included); "
                         f"CLIP's context holds {context_length}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.text, self.n_tokens, self.context_length))


@functools.lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


def token_ids(text: str) -> list[int]:
    """Token ids of ``text`` with the start and end tokens, uncut."""
    return [SOT_TOKEN] + _bpe().encode(text) + [EOT_TOKEN]


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> torch.Tensor:
    """(len(texts), context_length) int64 token ids, zero padded (OpenAI's signature).

    Raises :class:`TextTooLongError` (a ValueError) for the first text that does not fit, before
    anything is returned, unless ``truncate`` (OpenAI's option: the text is cut and its last
    token becomes the end token). The toolkit's stages never cut."""
    if isinstance(texts, str):
        texts = [texts]
    rows = [token_ids(t) for t in texts]
    for i, (text, ids) in enumerate(zip(texts, rows)):
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLongError(text, len(ids), context_length)
            rows[i] = ids[:context_length - 1] + [EOT_TOKEN]
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
