"""Class embeddings from a prompt ensemble, cached on disk (SPEC §3, "Text side").

Each class name is put into every template; each prompt embedding is L2-normalised, the
class's prompts are averaged and the mean is L2-normalised again. The reference normalises
the stacked rows once more before use; :func:`class_embeddings` does the same, so its rows
are bit-for-bit what the reference multiplies with.

Encoding 45 classes × 85 prompts costs minutes on a CPU, so results are cached under
``<cache>/text/<key>.npy`` where the key hashes the checkpoint's SHA256, the class names,
the templates and the model's dtype. Prompts are encoded in length-sorted batches, each cut
after its longest prompt (exact under the causal mask).

A prompt that does not fit CLIP's text context (77 tokens) is an error naming the class
(:class:`InputError`), raised before anything is encoded: prompts are never cut.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from clip import CLIP
from clip.text import CONTEXT_LENGTH, TextTooLongError, tokenize

from .errors import InputError
from .journal import cache_dir
from .labels import atomic_writer

log = logging.getLogger(__name__)

# Prompts per forward pass of the text tower; sorted by length, so padding stays small.
TEXT_BATCH_SIZE = 256
# Subfolder of the cache that holds text features.
TEXT_CACHE_DIR = "text"
# Bump when the way features are computed changes, so stale cache files are not reused.
CACHE_FORMAT_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16', 'bfloat16', ... (torch.float32 -> 'float32')."""
    return str(dtype).rsplit(".", 1)[-1]


def cache_key(checkpoint_sha256: str, names: Sequence[str], templates: Sequence[str],
              dtype: torch.dtype = torch.float32) -> str:
    """Cache file name: hashes the checkpoint, the class names, the templates and the dtype
    the text tower ran in (float32 and bfloat16 features differ, so they never share a file)."""
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, "ckpt": checkpoint_sha256,
                          "names": list(names), "templates": list(templates),
                          "dtype": dtype_name(dtype)},
                         ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
    for start in range(0, len(tokens), batch_size):
        idx = order[start:start + batch_size]
        out = model.encode_text(tokens[idx].to(device)).float()
        feats[idx] = (out / out.norm(dim=-1, keepdim=True)).cpu()
    feats = feats.reshape(len(names), len(templates), -1)  # (C*T, E) -> (C, T, E)
    mean = feats.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def default_text_cache_dir() -> Path:
    """``<cache>/text``, the toolkit's cache folder being :func:`tagclip.journal.cache_dir`."""
    return cache_dir() / TEXT_CACHE_DIR


def class_embeddings(model: CLIP, names: Sequence[str], templates: Sequence[str],
                     cache_dir: Optional[Path] = None, use_cache: bool = True) -> torch.Tensor:
    """Text matrix T ((len(names), E), float32, on the model's device) for the classifier.

    Cached on disk when the model knows its checkpoint's SHA256 and ``use_cache`` is set;
    the key includes the model's dtype. The rows are float32 whatever the model's dtype.
    Overlong prompts raise :class:`InputError` even when a cache file exists (one may have
    been written by a version that cut them).
    """
    device = next(model.parameters()).device
    sha = getattr(model, "checkpoint_sha256", None)
    path = None
    rows = None
    if use_cache and sha:
        key = cache_key(sha, names, templates, getattr(model, "dtype", torch.float32))
        path = Path(cache_dir or default_text_cache_dir()) / f"{key}.npy"
        if path.is_file():
            tokenize_prompts(names, templates, model_context_length(model))  # raises if overlong
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == (len(names), model.text_projection.shape[1]):
                    rows = torch.from_numpy(cached)
            except (OSError, ValueError):
                pass
            if rows is None:
                log.warning("ignoring unreadable text-feature cache %s", path)
    if rows is None:
        rows = encode_prompt_ensemble(model, names, templates)  # checks the prompts itself
        if path is not None:
            try:
                with atomic_writer(path) as handle:
                    np.save(handle, rows.numpy())
            except InputError as err:  # a read-only cache must not stop a run
                log.warning("could not write text-feature cache %s: %s", path, err)
    # The reference normalises the ensemble rows once more before use (SPEC §3).
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows.to(device)
