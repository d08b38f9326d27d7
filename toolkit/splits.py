"""Split files (SPEC §8): what every stage reads to know its images and their labels.

One line per image, ``id l1 l2 ...`` with 0-based class ids separated by spaces; a line with
only ``id`` is allowed. COCO-Stuff split files hold 182-index ids that a ``label_map`` turns
into the 171 class indices (quirk Q7). TagCLIP's label files have the same format. Every
problem is an :class:`~toolkit.errors.InputError` naming the file and the line.
"""
from __future__ import annotations

import re
from pathlib import Path, PureWindowsPath
from typing import Mapping, NamedTuple

from .errors import InputError
from .files import read_text

# A class id token: optional minus sign and ASCII digits only (int() alone would also accept
# '+3', '1_0' and non-ASCII digits).
_INT_TOKEN = re.compile(r"-?[0-9]+")
# SPEC §8: the image of split-file id ``i`` is ``{image folder}/{i}.jpg``.
SPLIT_IMAGE_EXT = ".jpg"


# Characters that would make an id name something other than one file inside the folder it
# is joined to ({folder}/{id}{ext}): path separators of either platform and NUL.
_ID_FORBIDDEN = {"/": "a '/'", "\\": "a '\\'", "\x00": "a NUL character"}


def image_id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be an image id, or None. Ids are joined to folders as
    ``{folder}/{id}{ext}`` by every stage (images, CAM files, masks, pictures), so an id must be
    one plain relative name: no path separator, not ``.`` or ``..``, no drive, no NUL."""
    for char, what in _ID_FORBIDDEN.items():
        if char in image_id:
            return f"holds {what} (ids are plain file names, no folders)"
    if image_id in (".", ".."):
        return "is '.' or '..', not a file name"
    if PureWindowsPath(image_id).drive:
        return "starts with a drive, not a plain file name"
    return None


def image_path(image_root, image_id: str) -> Path:
    """The image file of a split-file id (SPEC §8)."""
    return Path(image_root) / f"{image_id}{SPLIT_IMAGE_EXT}"


class SplitEntry(NamedTuple):
    """One split-file line: the image id (verbatim) and its class indices in file order."""

    id: str
    labels: tuple[int, ...]


def read_split(
    path,
    num_classes: int | None = None,
    label_map: Mapping[int, int] | None = None,
) -> list[SplitEntry]:
    """Parse a split file into :class:`SplitEntry` rows, in file order.

    Every image id is checked once here (:func:`image_id_problem`): stages join ids to their
    folders, so an id that is not one plain file name is an error naming the line.
    ``label_map`` (raw id -> class index) is applied to every label first; a raw id missing
    from it is an error. When ``num_classes`` is given, (mapped) labels must lie in
    ``[0, num_classes)``. Negative labels are always rejected. Blank lines are skipped; ids
    are kept verbatim. Errors are :class:`InputError` naming the file and the line.
    """
    path = Path(path)
    text = read_text(path)
    entries: list[SplitEntry] = []
    first_line_of: dict[str, int] = {}
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        tokens = raw_line.split()
        if not tokens:
            continue
        image_id, label_tokens = tokens[0], tokens[1:]
        problem = image_id_problem(image_id)
        if problem:
            raise InputError(path, f"line {lineno}: image id {image_id!r} {problem}")
        if image_id in first_line_of:
            raise InputError(path, f"line {lineno}: duplicate image id {image_id}")
        first_line_of[image_id] = lineno
        labels = []
        for tok in label_tokens:
            if not _INT_TOKEN.fullmatch(tok):
                raise InputError(path, f'line {lineno}: label "{tok}" is not an integer')
            raw = int(tok)
            if label_map is not None:
                if raw not in label_map:
                    raise InputError(path, f"line {lineno}: label {raw} is not in the label map (unused class id)")
                value = int(label_map[raw])
                shown = f"{raw} (mapped to {value})"
            else:
                value = raw
                shown = str(raw)
            if value < 0:
                raise InputError(path, f"line {lineno}: label {shown} is negative (class ids are 0-based)")
            if num_classes is not None and value >= num_classes:
                raise InputError(
                    path, f"line {lineno}: label {shown} is outside the vocabulary of {num_classes} classes"
                )
            labels.append(value)
        entries.append(SplitEntry(image_id, tuple(labels)))
    if not entries:
        raise InputError(path, "no images listed")
    return entries
