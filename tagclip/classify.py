"""Scoring many image files with a :class:`~tagclip.tagger.Tagger`: the input pipeline of
``classify.py`` and ``tagclip tag``, with resume.

Images run in chunks of ``batch_size`` consecutive images, the same chunks in every run, and
the next chunk decodes (:func:`toolkit.prefetch.prefetched`) while the model works on the
current one. Options come as a :class:`ScoreOptions`.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from clip.preprocess import load_model_input
from toolkit.errors import InputError, Interrupted
from toolkit.files import file_stamp
from toolkit.images import ReadOptions
from toolkit.prefetch import prefetched
from toolkit.resume import ScoreJournal

from .tagger import DEFAULT_BATCH_SIZE, Tagger


@dataclass(frozen=True)
class ScoreOptions:
    batch_size: int = DEFAULT_BATCH_SIZE   # images per chunk (the Tagger batches equal sizes within it)
    workers: int = 0                       # decoding processes (0: one background thread)
    on_error: str = "stop"                 # an unreadable image: "stop" (raise) or "skip" (report)
    read: ReadOptions = field(default_factory=ReadOptions)


def load_chunk(paths: Sequence[Path], read: ReadOptions, patch_size: int) -> list:
    """Model inputs, or the InputError of each image that could not be read."""
    out = []
    for path in paths:
        try:
            out.append(load_model_input(path, exif_transpose=read.exif_transpose, max_side=read.max_side,
                                        patch_size=patch_size)[0])
        except InputError as err:
            out.append(err)
    return out


def score_images(tagger: Tagger, ids: Sequence[str], paths: Sequence[Path], options: ScoreOptions,
                 journal: Optional[ScoreJournal] = None) -> tuple[torch.Tensor, list[int], list[InputError]]:
    """(n, N) scores (NaN rows for failed images), the indices of failed images and their errors.

    Rows already in ``journal`` are reused for chunks it holds completely; a chunk it holds in
    part is run again whole, so every batch has the composition of an uninterrupted run and a
    resumed run writes the same bytes (the crops of a batch share forwards, whose rounding
    depends on the batch). New rows are appended as each chunk finishes.
    """
    scores = torch.full((len(paths), len(tagger.class_names)), float("nan"))
    stamps = [file_stamp(p) for p in paths] if journal else []
    done = journal.valid(dict(zip(ids, stamps))) if journal else {}
    step = options.batch_size
    all_chunks = [list(range(s, min(s + step, len(paths)))) for s in range(0, len(paths), step)]
    chunks, kept = [], {}
    for chunk in all_chunks:
        if all(ids[i] in done for i in chunk):
            for i in chunk:
                kept[ids[i]] = done[ids[i]]
                scores[i] = torch.from_numpy(done[ids[i]][1])
        else:
            chunks.append(chunk)
    if journal:
        journal.start(kept)
        if kept:
            print(f"resuming: {len(kept)} of {len(paths)} image(s) already scored (journal {journal.path})",
                  file=sys.stderr)
    failed: list[int] = []
    failures: list[InputError] = []
    todo = [i for chunk in chunks for i in chunk]
    load = functools.partial(load_chunk, read=options.read, patch_size=tagger.model.visual.patch_size)
    try:
        with tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", desc="classify",
                  file=sys.stderr) as bar:
            for idx, loaded in zip(chunks, prefetched([[paths[i] for i in c] for c in chunks], load,
                                                      options.workers)):
                good = []
                for i, item in zip(idx, loaded):
                    if isinstance(item, InputError):
                        if options.on_error == "stop":
                            raise item
                        failed.append(i)
                        failures.append(item)
                    else:
                        good.append((i, item))
                if good:
                    rows = tagger.scores([t for _, t in good])
                    scores[[i for i, _ in good]] = rows
                    if journal:
                        journal.append([ids[i] for i, _ in good], [stamps[i] for i, _ in good], rows.numpy())
                bar.update(len(idx))
    except KeyboardInterrupt:
        if journal is None:
            raise
        raise Interrupted(f"{len(journal.load())} of {len(paths)} image(s) are scored and kept in {journal.path}; "
                          "the same command resumes from there") from None
    return scores, failed, failures
