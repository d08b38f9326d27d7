"""TagCLIP's text matrix T: prompt-ensemble class embeddings, cached on disk (SPEC §3, "Text side").

The ensemble itself is :func:`clip.prompts.encode_prompt_ensemble`. The reference normalises
the stacked rows once more before use; :func:`class_embeddings` does the same, so its rows are
bit-for-bit what the reference multiplies with.

Encoding 45 classes × 85 prompts costs minutes on a CPU, so results are cached under
``<cache>/text/<key>.npy`` where the key hashes the checkpoint's SHA256, the class names,
the templates and the model's dtype.
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
from clip.prompts import encode_prompt_ensemble, model_context_length, tokenize_prompts
from toolkit.errors import InputError
from toolkit.files import atomic_writer, cache_dir

log = logging.getLogger(__name__)

# Subfolder of the cache that holds text features.
TEXT_CACHE_DIR = "text"
# Bump when the way features are computed changes, so stale cache files are not reused.
CACHE_FORMAT_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16', 'bfloat16', ... (torch.float32 -> 'float32')."""
    return str(dtype).rsplit(".", 1)[-1]


def cache_key(checkpoint_sha256: str, names: Sequence[str], templates: Sequence[str],
              dtype: torch.dtype = torch.float32, architecture: str = "") -> str:
    """Cache file name: hashes the checkpoint, the class names, the templates, the dtype the
    text tower ran in (float32 and bfloat16 features differ, so they never share a file) and
    the architecture facts the weights cannot show (``Architecture.key``; empty for OpenAI's)."""
    fields = {"v": CACHE_FORMAT_VERSION, "ckpt": checkpoint_sha256, "names": list(names),
              "templates": list(templates), "dtype": dtype_name(dtype)}
    if architecture:
        fields["arch"] = architecture
    payload = json.dumps(fields, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def default_text_cache_dir() -> Path:
    """``<cache>/text``, the toolkit's cache folder being :func:`toolkit.files.cache_dir`."""
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
        key = cache_key(sha, names, templates, model.dtype, model.architecture.key())
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
