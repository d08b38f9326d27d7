"""CLIP's preprocessing: an image file or PIL image -> the normalised model input.

The preprocessing matches the reference TagCLIP code bit for bit:

1. resize the PIL image with ``Image.resize((W', H'), Image.Resampling.BICUBIC)`` to
   ``H' = ceil(H / p) * p`` and ``W' = ceil(W / p) * p`` for the model's patch size ``p`` (no
   crop, aspect ratio not kept); this is exactly what torchvision's ``Resize((H', W'),
   BICUBIC)`` does to a PIL image;
2. ``ToTensor``: uint8 HWC -> float32 CHW, divided by 255;
3. ``Normalize(CLIP_MEAN, CLIP_STD)``: ``(x - mean) / std`` per channel in float32.

Greyscale images: the reference stacked an ``'L'`` image to three channels and then resized
it. PIL resamples each 8-bit channel independently with the same coefficients, so resizing the
single ``'L'`` channel and stacking afterwards gives identical numbers at a third of the cost;
that is what :func:`to_model_input` does (the tests check the equality). Files are read by
:func:`toolkit.images.open_image`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from toolkit.images import DEFAULT_MAX_SIDE, open_image, to_rgb_or_l

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The patch size of the paper's ViT-B/16, the default wherever no model is at hand.
PATCH_SIZE = 16

_MEAN_T = torch.tensor(CLIP_MEAN, dtype=torch.float32)
_STD_T = torch.tensor(CLIP_STD, dtype=torch.float32)


def model_input_size(size_hw: tuple[int, int], patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """``(H, W)`` -> ``(ceil(H / p) * p, ceil(W / p) * p)``."""
    h, w = size_hw
    return math.ceil(h / patch_size) * patch_size, math.ceil(w / patch_size) * patch_size


def to_model_input(img: Image.Image, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """The normalised ``(3, H', W')`` float32 model input for a PIL image.

    ``H'``, ``W'`` are the height and width rounded up to a multiple of ``patch_size``. Images
    not in mode ``'RGB'`` / ``'L'`` are converted first as in :func:`open_image`. ``'L'`` is
    resized as one channel and then repeated to three (bit-identical to the reference, which
    stacked first).
    """
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    img = to_rgb_or_l(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"cannot make a model input from a zero-size image ({w}x{h})")
    new_h, new_w = model_input_size((h, w), patch_size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    arr = np.array(img, dtype=np.uint8, copy=True)
    t = torch.from_numpy(arr)
    if img.mode == "L":
        t = t.unsqueeze(0).expand(3, new_h, new_w)
    else:
        t = t.permute(2, 0, 1)
    t = t.to(torch.float32).contiguous().div(255)
    return t.sub_(_MEAN_T[:, None, None]).div_(_STD_T[:, None, None])


def load_model_input(path, exif_transpose: bool = False,
                     max_side: int | None = DEFAULT_MAX_SIDE, patch_size: int = PATCH_SIZE
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Open ``path`` and return ``(model_input, (H, W))``.

    ``(H, W)`` is the size of the image as :func:`open_image` returned it: after the optional
    EXIF transpose and the mode conversion, before the patch rounding. If ``max_side`` made
    :func:`open_image` downscale the image, it is the downscaled size (the size the model's
    input was made from, so maps computed on it line up with it); for every image within
    ``max_side`` it is the file's own size, which is what the reference used.
    """
    img = open_image(path, exif_transpose=exif_transpose, max_side=max_side)
    w, h = img.size
    return to_model_input(img, patch_size=patch_size), (h, w)


def openai_transform(n_px: int):
    """OpenAI's ``preprocess`` for square inputs of ``n_px``: resize the short side to ``n_px``
    (bicubic), centre crop, RGB, ``ToTensor``, normalise. (The toolkit's own stages use
    :func:`load_model_input` instead: no crop, each side rounded to the patch.)"""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                    _convert_to_rgb, ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")
