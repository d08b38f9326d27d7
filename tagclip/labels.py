"""Split files, label files and score files (SPEC sections 4 and 8).

* Split file (``imageset/``): one line per image, ``id l1 l2 ...`` with 0-based class ids
  separated by spaces; a line with only ``id`` is allowed. COCO-Stuff split files hold
  182-index ids that a ``label_map`` turns into the 171 class indices (quirk Q7).
* Label file ``{dataset}_val_tagclip.txt``: one line per image in split order, ``id`` then
  every class index whose score is strictly above the image's relative threshold, ascending;
  when none passes, the ``np.argmax`` index of the scores (first maximum).
* Score files: ``.npy`` (float32 matrix) or ``.csv`` (header ``id,<class names>``).

Every problem with a user's file is raised as :class:`~tagclip.errors.InputError` naming the
file (and the line, for split files). All writers are atomic: a temporary file in the target
directory is written, flushed, fsynced and then renamed over the target.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from tagclip.errors import InputError
from tagclip.metrics import relative_thresholds

# A class id token: optional minus sign and ASCII digits only (int() alone would also accept
# '+3', '1_0' and non-ASCII digits).
_INT_TOKEN = re.compile(r"-?[0-9]+")
# '%.9g' prints every float32 value so that it parses back to the same float32.
_CSV_FLOAT_FORMAT = "%.9g"
_SCORE_EXTENSIONS = (".npy", ".csv", ".json")
_UTF8_BOM = b"\xef\xbb\xbf"
# Permissions of a newly written file (mkstemp would leave 0600); an existing target keeps its own.
_NEW_FILE_MODE = 0o644


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


class SplitEntry(NamedTuple):
    """One split-file line: the image id (verbatim) and its class indices in file order."""

    id: str
    labels: tuple[int, ...]


def read_bytes(path, what: str = "file") -> bytes:
    """The bytes of a user's file; a missing file, a folder or an OS error -> one-line InputError."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, not a{'n' if what[0] in 'aeiou' else ''} {what}") from None
    except OSError as exc:
        raise InputError(path, f"cannot read {what} ({exc.strerror or exc})") from None


def _read_text(path: Path) -> str:
    data = read_bytes(path)
    # A leading byte-order mark is dropped so that it does not become part of the first id.
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise InputError(
            path, f"line {line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})"
        ) from None


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
    text = _read_text(path)
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


def labels_to_onehot(entries: Sequence[SplitEntry], num_classes: int) -> torch.Tensor:
    """float64 ``[n_images, num_classes]`` matrix with 1.0 at every listed label."""
    rows = [i for i, entry in enumerate(entries) for _ in entry.labels]
    cols = [c for entry in entries for c in entry.labels]
    bad = [c for c in cols if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is outside the vocabulary of {num_classes} classes")
    onehot = torch.zeros(len(entries), num_classes, dtype=torch.float64)
    if cols:
        onehot[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = 1.0
    return onehot


def label_file_lines(ids: Sequence[str], scores, rel: float) -> list[str]:
    """Label-file lines (no trailing newline or space), one per image in the given order.

    Each line is the id followed by every class index whose score is strictly above
    :func:`~tagclip.metrics.relative_thresholds` (ascending); if no class passes (e.g. all
    scores equal, or NaN), the ``np.argmax`` of the row (first maximum / first NaN).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] != len(ids):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match {len(ids)} image ids")
    thr = relative_thresholds(scores, rel)
    passed = (scores.to(torch.float32) > thr[:, None]).numpy()
    rows = scores.detach().cpu().numpy()
    lines = []
    for image_id, row_pass, row in zip(ids, passed, rows):
        chosen = np.flatnonzero(row_pass)
        if chosen.size == 0:
            chosen = [int(np.argmax(row))]
        lines.append(" ".join([str(image_id), *(str(int(c)) for c in chosen)]))
    return lines


def label_file_name(dataset: str) -> str:
    """Name of the reference's label file for ``dataset`` (written under ``output/``)."""
    return f"{dataset}_val_tagclip.txt"


@contextmanager
def atomic_writer(path) -> Iterator[io.BufferedWriter]:
    """Yield a binary file that replaces ``path`` atomically when the block succeeds: a
    temporary file in the same folder, fsync'ed, then ``os.replace``; the folder is created; an
    existing file keeps its permission bits. OS errors become :class:`InputError` naming
    ``path``; on any error nothing is left behind. Every output of the toolkit goes through it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(path, f"cannot create output file ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                mode = _NEW_FILE_MODE
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise InputError(path, f"cannot write file ({exc.strerror or exc})") from None
        raise


def writable_dir(path, what: str = "output folder") -> Path:
    """``path`` as a folder the run can write into, created if needed, checked before any work
    starts (by creating and removing a temporary file in it); otherwise an InputError naming
    it: under a regular file, read-only, on a full disk, ..."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(path, f"cannot write into this {what} ({exc.strerror or exc})") from None
    return path


def check_scores_path(path) -> Path:
    """A ``--scores_out`` path checked before the run: a known extension, a writable folder."""
    path = Path(path)
    if path.suffix.lower() not in _SCORE_EXTENSIONS:
        raise InputError(path, f"unsupported scores file extension '{path.suffix}' (use .npy, .csv or .json)")
    if path.is_dir():
        raise InputError(path, "is a folder, not a scores file")
    writable_dir(path.parent, "scores folder")
    return path


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` as UTF-8 (newlines untranslated) to ``path`` atomically."""
    with atomic_writer(path) as handle:
        handle.write(text.encode("utf-8"))


def write_scores(path, ids: Sequence[str], class_names: Sequence[str], scores) -> None:
    """Save the score matrix (rows in split order, columns in class order) atomically.

    ``.npy``: the float32 matrix. ``.csv``: header ``id,<class names...>`` then one row per
    image, id first, scores formatted with ``'%.9g'`` (exact for float32). ``.json``:
    ``{id: {class name: score}}`` in split and class order. Other extensions are an
    :class:`InputError`.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _SCORE_EXTENSIONS:
        raise InputError(path, f"unsupported scores file extension '{path.suffix}' (use .npy, .csv or .json)")
    matrix = torch.as_tensor(scores).detach().cpu().to(torch.float32).numpy()
    if matrix.ndim != 2 or matrix.shape != (len(ids), len(class_names)):
        raise ValueError(
            f"scores shape {tuple(matrix.shape)} does not match {len(ids)} ids x {len(class_names)} classes"
        )
    if ext == ".npy":
        with atomic_writer(path) as handle:
            np.save(handle, np.ascontiguousarray(matrix), allow_pickle=False)
        return
    if ext == ".json":
        table = {image_id: {name: float(_CSV_FLOAT_FORMAT % float(v)) for name, v in zip(class_names, row)}
                 for image_id, row in zip(ids, matrix)}
        write_text_atomic(path, json.dumps(table, indent=1, ensure_ascii=False) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *class_names])
    for image_id, row in zip(ids, matrix):
        writer.writerow([image_id, *(_CSV_FLOAT_FORMAT % float(v) for v in row)])
    write_text_atomic(path, buffer.getvalue())
