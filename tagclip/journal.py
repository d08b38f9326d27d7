"""Append-only journal of finished per-image scores, so an interrupted run can resume.

File format (text, one record per line, each line flushed and fsync'ed as it is written):

    # tagclip-journal 2 <run key> <number of columns>
    <image id>\t<file stamp>\t<score as float.hex()> <score> ...

The run key hashes everything that changes scores (checkpoint, vocabulary, method
parameters, image options, device type, precision); a journal with another key or header is ignored and
replaced. The file stamp (size and mtime of the image) lets a resumed run redo an image that
was replaced in the meantime.
A torn last line (the process died mid-write) is ignored. Scores round-trip exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = "# tagclip-journal 2"


def run_key(**settings) -> str:
    """A short stable hash of JSON-able run settings."""
    blob = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class ScoreJournal:
    def __init__(self, path: Path, key: str, n_cols: int):
        self.path = Path(path)
        self.header = f"{MAGIC} {key} {n_cols}\n"
        self.n_cols = n_cols

    def load(self) -> dict[str, tuple[str, np.ndarray]]:
        """Finished (stamp, row) per image id of a previous run with the same key ({} if none)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                if f.readline() != self.header:
                    return {}
                done = {}
                for line in f:
                    if not line.endswith("\n"):
                        break  # torn write
                    parts = line[:-1].split("\t")
                    if len(parts) != 3:
                        break
                    image_id, stamp, values = parts
                    row = [float.fromhex(v) for v in values.split()]
                    if len(row) != self.n_cols:
                        break
                    done[image_id] = (stamp, np.asarray(row, dtype=np.float32))
                return done
        except (OSError, UnicodeDecodeError, ValueError):
            return {}

    def start(self, done: dict[str, tuple[str, np.ndarray]]) -> None:
        """Rewrite the journal with the rows kept from ``done`` (drops a torn tail)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.header)
            f.writelines(self._lines(done.keys(), (st for st, _ in done.values()),
                                     (row for _, row in done.values())))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, ids: Iterable[str], stamps: Iterable[str], rows: Iterable[np.ndarray]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(self._lines(ids, stamps, rows))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def _lines(ids, stamps, rows):
        for image_id, stamp, row in zip(ids, stamps, rows):
            yield f"{image_id}\t{stamp}\t" + " ".join(float(v).hex() for v in row) + "\n"


def file_stamp(path) -> str:
    """``size:mtime_ns`` of a file, or ``missing``."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"
