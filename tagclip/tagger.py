"""Python API: tag images with any list of class names.

>>> import clip
>>> from tagclip import Tagger
>>> tagger = Tagger(clip.load_clip("ViT-B/16"), ["cat", "dog", "sofa"], background=["floor", "wall"])
>>> tagger.tag("photo.jpg")          # {'cat': 0.91, 'dog': 0.02, 'sofa': 0.40}

Images of equal size are batched through the main pass, and the crops of a whole batch go
through one forward; results do not depend on the batch size beyond float rounding.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from clip import CLIP, TAGCLIP_TEMPLATES
from clip.kernels import ALL_AT_ONCE, CPU_ATTENTION, AttentionSchedule
from clip.preprocess import load_model_input, to_model_input
from toolkit.images import DEFAULT_MAX_SIDE

from .labels import predicted_labels
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


@dataclass(frozen=True)
class Schedule:
    """How a batch's work is cut and moved on one device. Only speed and memory depend on
    it: scores agree across schedules to float rounding (tests run the GPU schedule on the
    CPU and hold it to the CPU schedule's scores). :meth:`for_device` is the rule the
    commands use; pass another to override it."""
    attention: AttentionSchedule = ALL_AT_ONCE  # map-returning attention (clip.model)
    main_chunk: Optional[int] = None            # images per main pass (None: the whole batch)
    crop_chunk: Optional[int] = None            # crops per forward (None: all the batch's crops)
    pin_memory: bool = False                    # stage batches in pinned host memory, copy asynchronously

    @classmethod
    def for_device(cls, device) -> "Schedule":
        if torch.device(device).type == "cpu":
            return cls(CPU_ATTENTION, CPU_MAIN_CHUNK, CPU_CROP_CHUNK, pin_memory=False)
        return cls(ALL_AT_ONCE, None, None, pin_memory=torch.device(device).type == "cuda")


def check_vocabulary(class_names: Sequence[str], background: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Stripped class names and background words; ValueError naming the first problem: an
    empty name, a name listed twice, or a background word that is also a class."""
    names = tuple(str(n).strip() for n in class_names)
    words = tuple(str(b).strip() for b in background)
    if not names:
        raise ValueError("no class names given")
    for kind, items in (("class name", names), ("background word", words)):
        for i, item in enumerate(items):
            if not item:
                raise ValueError(f"{kind} {i + 1} of {len(items)} is empty")
        seen: set[str] = set()
        for item in items:
            if item in seen:
                raise ValueError(f"{kind} {item!r} is listed twice")
            seen.add(item)
    both = [w for w in words if w in set(names)]
    if both:
        raise ValueError(f"background word {both[0]!r} is also a class name")
    return names, words


def _empty_host(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """Host memory for a batch (page-locked with ``pin_memory``, which needs a CUDA driver)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)


def stage_batch(images: Sequence[torch.Tensor], device: torch.device, pin_memory: bool) -> torch.Tensor:
    """Stack (3, H, W) inputs straight into one host buffer (pinned with ``pin_memory``) and
    send it to ``device``; from pinned memory the copy is asynchronous."""
    buffer = _empty_host((len(images), *images[0].shape), images[0].dtype, pin_memory)
    torch.stack(list(images), out=buffer)
    return buffer.to(device, non_blocking=pin_memory)


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
                 use_text_cache: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 schedule: Optional[Schedule] = None):
        """``schedule``: how batches run on the model's device (default
        :meth:`Schedule.for_device`); ValueError for an empty or repeated class name, a
        background word that is also a class, or a batch size below 1."""
        self.class_names, self.background = check_vocabulary(class_names, background)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.params = params.for_depth(model.visual.transformer.layers)
        self.label_threshold = label_threshold
        self.batch_size = batch_size
        # T: N foreground rows then M background rows (SPEC §3).
        self.text = class_embeddings(model, self.class_names + self.background, templates,
                                     cache_dir=text_cache_dir, use_cache=use_text_cache)
        self.schedule = schedule if schedule is not None else Schedule.for_device(self.device)

    @classmethod
    def for_dataset(cls, model: CLIP, dataset: Union[str, DatasetConfig], **kwargs) -> "Tagger":
        cfg = get_dataset(dataset) if isinstance(dataset, str) else dataset
        return cls(model, cfg.class_names, cfg.background, params=cfg.params,
                   label_threshold=cfg.label_rel_threshold, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.text.device

    @property
    def patch_size(self) -> int:
        """The model's patch: inputs are rounded to multiples of it."""
        return self.model.visual.patch_size

    def scores(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, N) float32 CPU scores for normalised (3, H, W) inputs (H, W multiples of 16)."""
        out = torch.empty(len(images), len(self.class_names), dtype=torch.float32)
        plan = self.schedule
        for idx in batch_by_size([im.shape for im in images], self.batch_size):
            batch = stage_batch([images[i] for i in idx], self.device, plan.pin_memory)
            res = classify_batch(self.model, batch, self.text, len(self.class_names), self.params,
                                 main_chunk=plan.main_chunk, crop_chunk=plan.crop_chunk,
                                 attention=plan.attention)
            out[idx] = res.scores.float().cpu()
        return out

    def labels(self, scores: torch.Tensor) -> list[list[int]]:
        """Per image: classes above its relative threshold, or the argmax if none (SPEC §4)."""
        return predicted_labels(scores.reshape(-1, len(self.class_names)), self.label_threshold)

    def tag(self, image: Union[str, os.PathLike, Image.Image], exif_transpose: bool = False,
            max_side: Optional[int] = DEFAULT_MAX_SIDE) -> dict[str, float]:
        """Score of every class for one image (a path or a PIL image)."""
        if isinstance(image, Image.Image):
            tensor = to_model_input(image, patch_size=self.patch_size)
        else:
            tensor, _ = load_model_input(image, exif_transpose=exif_transpose, max_side=max_side,
                                         patch_size=self.patch_size)
        row = self.scores([tensor])[0]
        return dict(zip(self.class_names, row.tolist()))

    def tag_many(self, images: Iterable[Union[str, os.PathLike]], **kwargs) -> list[dict[str, float]]:
        tensors = [load_model_input(p, patch_size=self.patch_size, **kwargs)[0] for p in images]
        return [dict(zip(self.class_names, row.tolist())) for row in self.scores(tensors)]
