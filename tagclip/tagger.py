"""Python API: tag images with any list of class names.

>>> import clip
>>> from tagclip import Tagger
>>> tagger = Tagger(clip.load("ViT-B/16"), ["cat", "dog", "sofa"], background=["floor", "wall"])
>>> tagger.tag("photo.jpg")          # {'cat': 0.91, 'dog': 0.02, 'sofa': 0.40}

Images of equal size are batched through the main pass, and the crops of a whole batch go
through one forward; results do not depend on the batch size beyond float rounding.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from clip import CLIP, TAGCLIP_TEMPLATES

from .images import DEFAULT_MAX_SIDE, load_model_input, to_model_input
from .metrics import relative_thresholds
from .method import TagCLIPParams, classify_batch
from .registry import REL_THRESHOLD, DatasetConfig, get_dataset
from .text_features import class_embeddings

# Images per batch (same-size images only). Memory grows with it: every image keeps 12
# head-averaged (1+P)² attention maps during its main pass.
DEFAULT_BATCH_SIZE = 8
# On a CPU one image's attention scores stay in cache, a batch's do not: the main pass then
# runs image by image, while the batch's crops (224×224) still share forwards of this size.
CPU_MAIN_CHUNK = 1
CPU_CROP_CHUNK = 8


def batch_by_size(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Group indices of equal shapes into batches of at most ``batch_size``, first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        groups[tuple(shape)].append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


class Tagger:
    """TagCLIP over a fixed vocabulary: ``scores`` for tensors, ``tag`` for one image."""

    def __init__(self, model: CLIP, class_names: Sequence[str], background: Sequence[str] = (),
                 params: TagCLIPParams = TagCLIPParams(), label_threshold: float = REL_THRESHOLD,
                 templates: Sequence[str] = TAGCLIP_TEMPLATES, text_cache_dir=None,
                 use_text_cache: bool = True, batch_size: int = DEFAULT_BATCH_SIZE):
        names = [str(n).strip() for n in class_names]
        if not names or any(not n for n in names):
            raise ValueError("class names must be non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.class_names = tuple(names)
        self.background = tuple(str(b).strip() for b in background)
        self.params = params
        self.label_threshold = label_threshold
        self.batch_size = batch_size
        # T: N foreground rows then M background rows (SPEC §3).
        self.text = class_embeddings(model, self.class_names + self.background, templates,
                                     cache_dir=text_cache_dir, use_cache=use_text_cache)

    @classmethod
    def for_dataset(cls, model: CLIP, dataset: Union[str, DatasetConfig], **kwargs) -> "Tagger":
        cfg = get_dataset(dataset) if isinstance(dataset, str) else dataset
        return cls(model, cfg.class_names, cfg.background, params=cfg.params,
                   label_threshold=cfg.label_rel_threshold, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.text.device

    def scores(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, N) float32 CPU scores for normalised (3, H, W) inputs (H, W multiples of 16)."""
        out = torch.empty(len(images), len(self.class_names), dtype=torch.float32)
        for idx in batch_by_size([im.shape for im in images], self.batch_size):
            batch = torch.stack([images[i] for i in idx]).to(self.device, non_blocking=True)
            on_cpu = self.device.type == "cpu"
            res = classify_batch(self.model, batch, self.text, len(self.class_names), self.params,
                                 main_chunk=CPU_MAIN_CHUNK if on_cpu else None,
                                 crop_chunk=CPU_CROP_CHUNK if on_cpu else None)
            out[idx] = res.scores.float().cpu()
        return out

    def labels(self, scores: torch.Tensor) -> list[list[int]]:
        """Per image: classes above its relative threshold, or the argmax if none (SPEC §4)."""
        scores = scores.reshape(-1, len(self.class_names))
        above = scores > relative_thresholds(scores, self.label_threshold)[:, None]
        return [row.nonzero().flatten().tolist() or [int(s.argmax())] for row, s in zip(above, scores)]

    def tag(self, image: Union[str, os.PathLike, Image.Image], exif_transpose: bool = False,
            max_side: Optional[int] = DEFAULT_MAX_SIDE) -> dict[str, float]:
        """Score of every class for one image (a path or a PIL image)."""
        if isinstance(image, Image.Image):
            tensor = to_model_input(image)
        else:
            tensor, _ = load_model_input(image, exif_transpose=exif_transpose, max_side=max_side)
        row = self.scores([tensor])[0]
        return dict(zip(self.class_names, row.tolist()))

    def tag_many(self, images: Iterable[Union[str, os.PathLike]], **kwargs) -> list[dict[str, float]]:
        tensors = [load_model_input(p, **kwargs)[0] for p in images]
        return [dict(zip(self.class_names, row.tolist())) for row in self.scores(tensors)]
