"""Append-only journal of finished per-image scores, so an interrupted run can resume.

File format (text, one record per line, each line flushed and fsync'ed as it is written):

    # tagclip-journal 1 <run key> <number of columns>
    <image id>\t<score as float.hex()> <score> ...

The run key hashes everything that changes scores (checkpoint, vocabulary, method
parameters, image options); a journal with another key or header is ignored and replaced.
A torn last line (the process died mid-write) is ignored. Scores round-trip exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = "# tagclip-journal 1"


def run_key(**settings) -> str:
    """A short stable hash of JSON-able run settings."""
    blob = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class ScoreJournal:
    def __init__(self, path: Path, key: str, n_cols: int):
        self.path = Path(path)
        self.header = f"{MAGIC} {key} {n_cols}\n"
        self.n_cols = n_cols

    def load(self) -> dict[str, np.ndarray]:
        """Finished rows of a previous run with the same key ({} if none)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                if f.readline() != self.header:
                    return {}
                done = {}
                for line in f:
                    if not line.endswith("\n"):
                        break  # torn write
                    image_id, _, values = line[:-1].partition("\t")
                    row = [float.fromhex(v) for v in values.split()]
                    if len(row) != self.n_cols:
                        break
                    done[image_id] = np.asarray(row, dtype=np.float32)
                return done
        except (OSError, UnicodeDecodeError, ValueError):
            return {}

    def start(self, done: dict[str, np.ndarray]) -> None:
        """Rewrite the journal with the rows kept from ``done`` (drops a torn tail)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.header)
            f.writelines(self._lines(done.keys(), done.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, ids: Iterable[str], rows: Iterable[np.ndarray]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(self._lines(ids, rows))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def _lines(ids, rows):
        for image_id, row in zip(ids, rows):
            yield image_id + "\t" + " ".join(float(v).hex() for v in row) + "\n"
