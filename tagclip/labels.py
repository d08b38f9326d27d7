"""The label rule, label files and score files (SPEC sections 4 and 8).

* Label rule (:func:`predicted_labels`): the classes above an image's relative threshold, else
  its best class; the Tagger, the label files and ``tagclip segment`` all use it.
* Label file ``{dataset}_val_tagclip.txt``: one line per image in split order, ``id`` then
  every class index whose score is strictly above the image's relative threshold, ascending;
  when none passes, the ``np.argmax`` index of the scores (first maximum).
* Score files: ``.npy`` (float32 matrix) or ``.csv`` (header ``id,<class names>``).

Split files are read by :mod:`toolkit.splits`. Every writer here is atomic
(:func:`toolkit.files.atomic_writer`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.errors import InputError
from toolkit.files import atomic_writer, writable_dir, write_text_atomic
from toolkit.splits import SplitEntry

from .metrics import relative_thresholds

# '%.9g' prints every float32 value so that it parses back to the same float32.
_CSV_FLOAT_FORMAT = "%.9g"
_SCORE_EXTENSIONS = (".npy", ".csv", ".json")


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


def predicted_labels(scores, rel: float) -> list[list[int]]:
    """The label rule (SPEC §4), per image: every class index whose score is strictly above
    :func:`~tagclip.metrics.relative_thresholds` (ascending); if no class passes (e.g. all
    scores equal, or NaN), the ``np.argmax`` of the row (first maximum / first NaN)."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (images, classes), got shape {tuple(scores.shape)}")
    thr = relative_thresholds(scores, rel)
    passed = (scores.to(torch.float32) > thr[:, None]).numpy()
    rows = scores.detach().cpu().numpy()
    return [[int(c) for c in np.flatnonzero(row_pass)] or [int(np.argmax(row))]
            for row_pass, row in zip(passed, rows)]


def label_file_lines(ids: Sequence[str], scores, rel: float) -> list[str]:
    """Label-file lines (no trailing newline or space), one per image in the given order: the
    id, then the image's :func:`predicted_labels`."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] != len(ids):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match {len(ids)} image ids")
    return [" ".join([str(image_id), *map(str, labels)])
            for image_id, labels in zip(ids, predicted_labels(scores, rel))]


def label_file_name(dataset: str) -> str:
    """Name of the reference's label file for ``dataset`` (written under ``output/``)."""
    return f"{dataset}_val_tagclip.txt"


def check_scores_path(path) -> Path:
    """A ``--scores_out`` path checked before the run: a known extension, a writable folder."""
    path = Path(path)
    if path.suffix.lower() not in _SCORE_EXTENSIONS:
        raise InputError(path, f"unsupported scores file extension '{path.suffix}' (use .npy, .csv or .json)")
    if path.is_dir():
        raise InputError(path, "is a folder, not a scores file")
    writable_dir(path.parent, "scores folder")
    return path


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
