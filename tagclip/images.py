"""Reading images and turning them into the model's input tensor.

The preprocessing matches the reference TagCLIP code bit for bit:

1. resize the PIL image with ``Image.resize((W', H'), Image.Resampling.BICUBIC)`` to
   ``H' = ceil(H / 16) * 16`` and ``W' = ceil(W / 16) * 16`` (no crop, aspect ratio not kept);
   this is exactly what torchvision's ``Resize((H', W'), BICUBIC)`` does to a PIL image;
2. ``ToTensor``: uint8 HWC -> float32 CHW, divided by 255;
3. ``Normalize(CLIP_MEAN, CLIP_STD)``: ``(x - mean) / std`` per channel in float32.

Greyscale images: the reference stacked an ``'L'`` image to three channels and then resized
it. PIL resamples each 8-bit channel independently with the same coefficients, so resizing the
single ``'L'`` channel and stacking afterwards gives identical numbers at a third of the cost;
that is what :func:`to_model_input` does (the tests check the equality).

Reading (:func:`open_image`) normalises every PIL mode to ``'RGB'`` or ``'L'`` and turns every
problem with the file into :class:`tagclip.errors.InputError`. Every image file the toolkit reads
(model inputs, GT masks, the CRF's images, COCO-Stuff maps) is opened by
:func:`read_image_file`: PIL reads the header, and nothing over :data:`MAX_IMAGE_PIXELS` is
decoded.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tagclip.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 16

#: Longest side an image may have before the 16-px rounding. Every VOC / COCO image is far
#: below this; larger photos are downscaled first (aspect ratio kept), see :func:`open_image`.
DEFAULT_MAX_SIDE = 4096

#: Largest image, in pixels (width x height as the file's header states them), that any reader of
#: the toolkit decodes (:func:`read_image_file`): PIL's default decompression-bomb limit, about
#: 89.5 megapixels (an 8-bit RGB image of 256 MiB), fixed here so that it does not depend on
#: what ``PIL.Image.MAX_IMAGE_PIXELS`` is set to. A 12-megapixel photo is far below it.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3

#: File-name extensions :func:`iter_image_files` treats as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_T = TypeVar("_T")

_MEAN_T = torch.tensor(CLIP_MEAN, dtype=torch.float32)
_STD_T = torch.tensor(CLIP_STD, dtype=torch.float32)

# Longest PIL error text kept in an InputError message (messages stay one short line).
_MAX_REASON = 160


# --------------------------------------------------------------------------------------------
# mode conversion


def _sixteen_bit_to_l(arr: np.ndarray) -> Image.Image:
    """0..65535 integers -> 8-bit by dropping the low byte (``v >> 8``)."""
    return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), mode="L")


def _int32_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.int64)
    arr = np.clip(arr, 0, None)
    peak = int(arr.max()) if arr.size else 0
    if peak <= 65535:
        return _sixteen_bit_to_l(arr)
    # floor(v * 255 / max), exact in int64 (v < 2**31, so v * 255 < 2**39)
    return Image.fromarray(((arr * 255) // peak).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    arr = np.floor(np.clip(arr, 0.0, 255.0) + 0.5)  # round half up
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def to_rgb_or_l(img: Image.Image) -> Image.Image:
    """Return ``img`` in mode ``'RGB'`` or ``'L'``; see :func:`open_image` for the table.

    Raises ``ValueError`` for a mode PIL cannot convert to RGB.
    """
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        if "transparency" in img.info:
            # going through RGBA avoids PIL's "transparency expressed in bytes" warning;
            # the colour values are the palette's either way
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")
    if mode == "PA":
        return img.convert("RGBA").convert("RGB")
    if mode in ("RGBA", "RGBa", "RGBX"):
        return img.convert("RGB")
    if mode == "LA":
        return img.convert("L")
    if mode == "La":
        # PIL has no La -> L converter; La -> LA un-premultiplies, then the alpha is dropped
        return img.convert("LA").convert("L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode.startswith("I;16"):
        return _sixteen_bit_to_l(np.asarray(img))
    if mode == "I":
        return _int32_to_l(img)
    if mode == "F":
        return _float_to_l(img)
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {mode!r}") from e


# --------------------------------------------------------------------------------------------
# reading


def _short_reason(exc: BaseException, path: str) -> str:
    """A one-line, short form of a PIL / OS error, without repeating the path."""
    text = str(exc).strip()
    for form in (repr(path), path):
        text = text.replace(form, "").strip()
    text = text.splitlines()[0].strip() if text else ""
    text = text or type(exc).__name__
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text


def _downscale(img: Image.Image, max_side: int) -> Image.Image:
    w, h = img.size
    longest = max(w, h)
    if longest <= max_side:
        return img
    # longest side becomes exactly max_side, the other side is rounded half up (at least 1)
    if w >= h:
        new = (max_side, max(1, (2 * h * max_side + w) // (2 * w)))
    else:
        new = (max(1, (2 * w * max_side + h) // (2 * h)), max_side)
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _image_size_problem(size: tuple[int, int], what: str) -> str | None:
    """Why an image of ``size`` = (W, H) is not read, or None."""
    w, h = size
    if w < 1 or h < 1:
        return f"zero-size {what} ({w}x{h})"
    if w * h > MAX_IMAGE_PIXELS:
        return (f"{what} too large: {w}x{h} (WxH) = {w * h} pixels, more than the limit of "
                f"{MAX_IMAGE_PIXELS} (tagclip.images.MAX_IMAGE_PIXELS)")
    return None


def _load_pixels(img: Image.Image) -> Image.Image:
    img.load()
    return img


def read_image_file(path, what: str = "image", convert: Callable[[Image.Image], _T] | None = None,
                    data: bytes | None = None) -> _T:
    """The toolkit's one way of opening an image file; every reader calls it.

    Opens ``path`` (or ``data``, its bytes when the caller has read them already) with PIL,
    which reads the header only, checks the size the header states against
    :data:`MAX_IMAGE_PIXELS` (and that it is not zero) BEFORE any pixel is decoded, and
    returns ``convert(img)`` while the file is open (default: the image, fully loaded).
    ``convert`` is where the caller decodes (``np.asarray(img)``, a mode conversion) or only
    reads the header (``lambda img: img.size``); it must do nothing else, since every error it
    raises is taken for a problem of the file.

    PIL's own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``, by default the same
    number: warning above it, error above twice it) applies too; its warning is turned into an
    error (``warnings.catch_warnings``, which changes the process-wide warning filters while the
    file is open), so no image over the limit is decoded whichever of the two is lower. The
    size is checked again after ``convert`` for formats that settle their size on loading.

    Every problem is an :class:`InputError` ``(path, problem)`` naming the file, ``what`` naming
    the kind of file in the problem: ``{what} not found``, ``is a directory, not a {what}``,
    ``cannot read {what}: empty file (0 bytes)``, ``cannot read {what}: not a recognised image
    format``, ``cannot read {what}: <PIL's reason>``, ``zero-size {what} (WxH)``, ``{what} too
    large: ...``. A MemoryError is not bad input and keeps its traceback.
    """
    spath = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if (len(data) if data is not None else os.path.getsize(spath)) == 0:
                raise InputError(spath, f"cannot read {what}: empty file (0 bytes)")
            with Image.open(io.BytesIO(data) if data is not None else spath) as img:
                problem = _image_size_problem(img.size, what)
                if problem:
                    raise InputError(spath, problem)
                result = (convert or _load_pixels)(img)
                problem = _image_size_problem(img.size, what)
                if problem:
                    raise InputError(spath, problem)
                return result
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(spath, f"{what} not found") from None
    except IsADirectoryError:
        raise InputError(spath, f"is a directory, not a{'n' if what[:1] in 'aeiou' else ''} {what}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(spath, f"{what} too large: {_short_reason(e, spath)} "
                                "(limit: PIL.Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InputError(spath, f"cannot read {what}: not a recognised image format") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise InputError(spath, f"cannot read {what}: {_short_reason(e, spath)}") from None


def open_image(path, exif_transpose: bool = False, max_side: int | None = DEFAULT_MAX_SIDE
               ) -> Image.Image:
    """Read an image file and return it, fully loaded, in mode ``'RGB'`` or ``'L'``.

    Mode conversion:

    ========================================  =====================================================
    PIL mode of the file                      returned
    ========================================  =====================================================
    ``RGB``, ``L``                            unchanged
    ``1`` (bilevel)                           ``L`` (0 / 255)
    ``P`` without transparency                ``RGB`` (the palette colours)
    ``P`` with transparency, ``PA``           ``RGBA`` first, then alpha dropped -> ``RGB``
    ``RGBA``, ``RGBX``                        ``RGB``: alpha dropped (``convert('RGB')``)
    ``LA``                                    ``L``: alpha dropped (``convert('L')``)
    ``RGBa``, ``La`` (premultiplied)          ``RGB`` / ``L`` via PIL, which un-premultiplies
    ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``     ``RGB`` via PIL ``convert('RGB')``
    ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``  ``L`` = ``v >> 8`` (the high byte; note this is
                                              ``floor(v / 256)``, *not* ``floor(v / 257)``)
    ``I`` (32-bit signed)                     negatives -> 0; if max <= 65535 as 16-bit
                                              (``v >> 8``), else ``floor(v * 255 / max)``
    ``F`` (float)                             NaN -> 0, clipped to [0, 255], rounded half up
    anything else                             PIL ``convert('RGB')`` if PIL can, else InputError
    ========================================  =====================================================

    Transparency is simply dropped, never composited on a background: that is what PIL's
    ``convert('RGB')`` does and therefore what OpenAI CLIP's own preprocessing
    (``_convert_image_to_rgb``) does.

    Multi-frame files (GIF, TIFF) give their first frame. EXIF orientation is ignored by
    default, as in the reference code and the datasets' annotations (which are in the stored
    pixel layout); ``exif_transpose=True`` applies :func:`PIL.ImageOps.exif_transpose` first.

    Images larger than ``max_side`` on their longest side are downscaled (after the mode
    conversion) with PIL BICUBIC (``reducing_gap=3.0``) so that the longest side is exactly
    ``max_side``, keeping the aspect ratio; ``max_side=None`` turns this off. The file is
    opened by :func:`read_image_file`, so an image over :data:`MAX_IMAGE_PIXELS` (PIL's default
    decompression-bomb limit, about 89 megapixels, far above a 12-megapixel photo) or over
    ``PIL.Image.MAX_IMAGE_PIXELS`` is an :class:`InputError` before it is decoded. Images
    smaller than 16 px on a side are valid.

    Raises :class:`InputError` ``(path, problem)`` for a missing file, a directory, an empty,
    corrupt, truncated or non-image file, a zero-size image, an image over the pixel limit and
    an unsupported mode.
    """
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    spath = os.fspath(path)
    if os.path.isdir(spath):
        raise InputError(spath, "is a directory, not an image file")
    if not os.path.exists(spath):
        raise InputError(spath, "no such file")

    def to_model_mode(img: Image.Image) -> Image.Image:
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb_or_l(img)

    img = read_image_file(spath, "image", to_model_mode)
    if max_side is not None:
        img = _downscale(img, max_side)
    return img


# --------------------------------------------------------------------------------------------
# model input


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
    EXIF transpose and the mode conversion, before the 16-px rounding. If ``max_side`` made
    :func:`open_image` downscale the image, it is the downscaled size (the size the model's
    input was made from, so maps computed on it line up with it); for every image within
    ``max_side`` it is the file's own size, which is what the reference used.
    """
    img = open_image(path, exif_transpose=exif_transpose, max_side=max_side)
    w, h = img.size
    return to_model_input(img, patch_size=patch_size), (h, w)


# --------------------------------------------------------------------------------------------
# folders


def iter_image_files(root) -> list[tuple[str, str]]:
    """``(id, file name)`` for every image file directly in ``root``, sorted by id.

    An image file has one of :data:`IMAGE_EXTENSIONS` (any case); the id is the name without
    its extension. Sub-folders are not searched; hidden files (names starting with ``.``, such
    as macOS ``._x.jpg`` resource forks) are skipped. Raises :class:`InputError` if ``root`` is
    missing or not a folder, has no images, or two images share an id (``a.jpg``, ``a.png``),
    since their outputs would overwrite each other.
    """
    sroot = os.fspath(root)
    if not os.path.exists(sroot):
        raise InputError(sroot, "no such folder")
    if not os.path.isdir(sroot):
        raise InputError(sroot, "not a folder")
    try:
        names = os.listdir(sroot)
    except OSError as e:
        raise InputError(sroot, f"cannot list folder: {_short_reason(e, sroot)}") from None
    found: dict[str, str] = {}
    for name in sorted(names):
        if name.startswith("."):
            continue
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS or not stem:
            continue
        if not os.path.isfile(os.path.join(sroot, name)):
            continue
        if stem in found:
            raise InputError(sroot, f"two images share the id {stem!r} "
                                    f"({found[stem]}, {name}); rename one")
        found[stem] = name
    if not found:
        raise InputError(sroot, "no images found (looked for " + ", ".join(IMAGE_EXTENSIONS) + ")")
    return sorted(found.items())
