"""Zero-shot class embeddings from a prompt ensemble (CLIP's own recipe).

Each class name is put into every template; each prompt embedding is L2-normalised, the
class's prompts are averaged and the mean is L2-normalised again. Prompts are encoded in
length-sorted batches, each cut after its longest prompt (exact under the causal mask).

A prompt that does not fit CLIP's text context (77 tokens) is an error naming the class
(:class:`~toolkit.errors.InputError`), raised before anything is encoded: prompts are never cut.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from tqdm import tqdm

from toolkit.errors import InputError

from .model import CLIP
from .text import CONTEXT_LENGTH, TextTooLongError, tokenize

# Prompts per forward pass of the text tower; sorted by length, so padding stays small.
TEXT_BATCH_SIZE = 256


def tokenize_prompts(names: Sequence[str], templates: Sequence[str],
                     context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """(len(names) * len(templates), context_length) token ids of every prompt, class-major
    (every template of the first name, then of the second, ...), zero padded.

    Every prompt is checked before anything is returned: the first one that does not fit
    raises :class:`InputError` naming the class, the template, the prompt's token count and
    the context length."""
    prompts = [t.format(name) for name in names for t in templates]
    try:
        return tokenize(prompts, context_length)
    except TextTooLongError as err:
        i = prompts.index(err.text)  # the first prompt with this text: the one that failed
        name, template = names[i // len(templates)], templates[i % len(templates)]
        raise InputError(name, f"class name too long: the prompt {err.text!r} (template {template!r}) "
                               f"is {err.n_tokens} tokens long, start and end tokens included; "
                               f"CLIP's text context holds {err.context_length}") from None


def model_context_length(model: CLIP) -> int:
    """Tokens the model's text tower holds (its positional table's length)."""
    return int(getattr(model, "context_length", None) or model.positional_embedding.shape[0])


@torch.no_grad()
def encode_prompt_ensemble(model: CLIP, names: Sequence[str], templates: Sequence[str],
                           batch_size: int = TEXT_BATCH_SIZE) -> torch.Tensor:
    """(len(names), E) float32 rows, each the normalised mean of normalised prompt embeddings.

    All prompts are tokenized and checked before the first forward: an overlong one raises
    :class:`InputError` naming its class (:func:`tokenize_prompts`). The text tower runs in
    the model's dtype; its outputs are cast to float32 before the normalisation and the mean."""
    device = next(model.parameters()).device
    tokens = tokenize_prompts(names, templates, model_context_length(model))  # (C*T, 77)
    lengths = tokens.argmax(dim=-1)  # end-token position of every prompt
    order = torch.argsort(lengths, stable=True)
    feats = torch.empty(len(tokens), model.text_projection.shape[1], dtype=torch.float32)
    for start in tqdm(range(0, len(tokens), batch_size), unit="batch", desc=f"text ({len(tokens)} prompts)",
                      file=sys.stderr, leave=False):
        idx = order[start:start + batch_size]
        out = model.encode_text(tokens[idx].to(device)).float()
        feats[idx] = (out / out.norm(dim=-1, keepdim=True)).cpu()
    feats = feats.reshape(len(names), len(templates), -1)  # (C*T, E) -> (C, T, E)
    mean = feats.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)
