"""Reading image files: the toolkit's one image reader, used by every stage.

:func:`read_image_file` opens every image file the toolkit reads (model inputs, GT masks, the
CRF's images, COCO-Stuff maps, pictures): PIL reads the header, and nothing over
:data:`MAX_IMAGE_PIXELS` is decoded. :func:`open_image` normalises every PIL mode to ``'RGB'``
or ``'L'``, applies the EXIF orientation when asked, and downscales images over ``max_side``;
every problem with a file is a :class:`toolkit.errors.InputError`. Turning an image into
CLIP's input tensor is :mod:`clip.preprocess`'s job.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, short_reason

#: Longest side an image may have before the model's patch rounding. Every VOC / COCO image is far
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


@dataclass(frozen=True)
class ReadOptions:
    """How every stage reads an image for the model (``--exif_transpose``, ``--max_side``)."""
    exif_transpose: bool = False          # honour EXIF orientation (off: the reference and the annotations)
    max_side: Optional[int] = DEFAULT_MAX_SIDE  # downscale larger images first (None: never)



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
                f"{MAX_IMAGE_PIXELS} (toolkit.images.MAX_IMAGE_PIXELS)")
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
        raise InputError(spath, f"{what} too large: {short_reason(e, spath)} "
                                "(limit: PIL.Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InputError(spath, f"cannot read {what}: not a recognised image format") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise InputError(spath, f"cannot read {what}: {short_reason(e, spath)}") from None


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
    smaller than one patch on a side are valid.

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


def file_size_hw(path, loaded_hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The image file's own (H, W), given the (H, W) :func:`open_image` returned with
    ``max_side``: the same unless ``max_side`` may have downscaled it (then the header is read)."""
    if max_side is None or max(loaded_hw) < max_side:
        return loaded_hw
    w, h = read_image_file(path, convert=lambda img: img.size)  # the header only
    return h, w


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
        raise InputError(sroot, f"cannot list folder: {short_reason(e, sroot)}") from None
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
