"""Class embeddings from a prompt ensemble, cached on disk (SPEC §3, "Text side").

Each class name is put into every template; each prompt embedding is L2-normalised, the
class's prompts are averaged and the mean is L2-normalised again. The reference normalises
the stacked rows once more before use; :func:`class_embeddings` does the same, so its rows
are bit-for-bit what the reference multiplies with.

Encoding 45 classes × 85 prompts costs minutes on a CPU, so results are cached under
``<cache>/text/<key>.npy`` where the key hashes the checkpoint's SHA256, the class names,
the templates and the model's dtype. Prompts are encoded in length-sorted batches, each cut
after its longest prompt (exact under the causal mask).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from clip import CLIP, tokenize

from .errors import InputError
from .labels import atomic_writer

log = logging.getLogger(__name__)

# Prompts per forward pass of the text tower; sorted by length, so padding stays small.
TEXT_BATCH_SIZE = 256
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


@torch.no_grad()
def encode_prompt_ensemble(model: CLIP, names: Sequence[str], templates: Sequence[str],
                           batch_size: int = TEXT_BATCH_SIZE) -> torch.Tensor:
    """(len(names), E) float32 rows, each the normalised mean of normalised prompt embeddings.

    The text tower runs in the model's dtype; its outputs are cast to float32 before the
    normalisation and the mean."""
    device = next(model.parameters()).device
    prompts = [t.format(name) for name in names for t in templates]
    tokens = tokenize(prompts)  # (C*T, 77)
    lengths = tokens.argmax(dim=-1)  # end-token position of every prompt
    order = torch.argsort(lengths, stable=True)
    feats = torch.empty(len(prompts), model.text_projection.shape[1], dtype=torch.float32)
    for start in range(0, len(prompts), batch_size):
        idx = order[start:start + batch_size]
        out = model.encode_text(tokens[idx].to(device)).float()
        feats[idx] = (out / out.norm(dim=-1, keepdim=True)).cpu()
    feats = feats.reshape(len(names), len(templates), -1)  # (C*T, E) -> (C, T, E)
    mean = feats.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def default_text_cache_dir() -> Path:
    root = os.environ.get("TAGCLIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tagclip")
    return Path(root) / "text"


def class_embeddings(model: CLIP, names: Sequence[str], templates: Sequence[str],
                     cache_dir: Optional[Path] = None, use_cache: bool = True) -> torch.Tensor:
    """Text matrix T ((len(names), E), float32, on the model's device) for the classifier.

    Cached on disk when the model knows its checkpoint's SHA256 and ``use_cache`` is set;
    the key includes the model's dtype. The rows are float32 whatever the model's dtype.
    """
    device = next(model.parameters()).device
    sha = getattr(model, "checkpoint_sha256", None)
    path = None
    rows = None
    if use_cache and sha:
        key = cache_key(sha, names, templates, getattr(model, "dtype", torch.float32))
        path = Path(cache_dir or default_text_cache_dir()) / f"{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == (len(names), model.text_projection.shape[1]):
                    rows = torch.from_numpy(cached)
            except (OSError, ValueError):
                pass
            if rows is None:
                log.warning("ignoring unreadable text-feature cache %s", path)
    if rows is None:
        rows = encode_prompt_ensemble(model, names, templates)
        if path is not None:
            try:
                with atomic_writer(path) as handle:
                    np.save(handle, rows.numpy())
            except InputError as err:  # a read-only cache must not stop a run
                log.warning("could not write text-feature cache %s: %s", path, err)
    # The reference normalises the ensemble rows once more before use (SPEC §3).
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows.to(device)
