"""Append-only journals of finished per-image results, so an interrupted run can resume.

File format (text, one record per line, each line flushed and fsync'ed as it is written):

    # tagclip-journal 3 <kind> <run key>
    <image id>\t<file stamp>\t<payload>

The run key hashes everything that changes the results (checkpoint, vocabulary, method
parameters, image options, device type, precision, ...); a journal of another kind or key
is ignored and replaced. The file stamp (size and mtime of the input) lets a resumed run
redo an image whose file was replaced in the meantime. A torn last line (the process died
mid-write) is ignored.

The one resume mechanism of every stage: a :class:`Journal` with a payload codec per stage,

* :class:`ScoreJournal` (``classify.py``) — a row of classification scores, as ``float.hex()`` (exact);
* :class:`CamJournal` (``generate_cams.py``) — the labels of a written CAM file and that file's own stamp;
* :class:`HistJournal` (``eval_cam_with_crf.py``) — one image's confusion matrix, as its non-zero
  ``index:count`` cells;

and one rule for what a rerun keeps (:meth:`Journal.resume`): a record of the same run key
whose input file still has its stamp and that the stage's own check accepts (the output file
is still there, or still the one written). Journals live beside a stage's outputs, or under
:func:`~toolkit.files.cache_dir` ``/resume`` when a stage writes no files of its own
(``eval_cam_with_crf.py --eval_only``); never in the working directory. Runs of one stage
into one folder are kept apart by :func:`folder_lock`.

Why a text file and not a database: each record is one line written with ``O_APPEND`` and
fsync'ed, so a crash loses at most the line being written, which the reader drops; the file
needs no server, no locking protocol that network filesystems break (SQLite's own manual
warns against its locks on NFS), and a person can read it.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

try:  # POSIX; elsewhere runs are not locked (see folder_lock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import numpy as np

from .errors import InputError, short_reason
from .files import atomic_writer

MAGIC = "# tagclip-journal 3"
RESUME_DIR = "resume"
# How much of a lock file names its owner.
LOCK_OWNER_CHARS = 64
# The longest record line a journal is read up to (a score row of 171 classes is about 4 KB).
MAX_RECORD_CHARS = 1 << 20


@contextmanager
def folder_lock(folder, name: str) -> Iterator[None]:
    """Hold ``{folder}/.{name}.lock`` for the block: a second run of the same stage into the same
    folder stops at once with one line (InputError) instead of interleaving its journal and
    outputs with this run's. The lock is an advisory ``flock``, which the system drops when the
    process ends however it ends (SIGKILL included), so a lock file left behind never blocks;
    the file is removed when the block ends."""
    if fcntl is None:  # no flock on this platform: runs are not locked against each other
        yield
        return
    path = Path(folder) / f".{name}.lock"
    while True:
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise InputError(path, f"cannot create the run's lock file ({short_reason(exc)})") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read(LOCK_OWNER_CHARS).strip() or "another process"
            handle.close()
            raise InputError(Path(folder), f"another run is writing into this folder ({owner}); wait for it to "
                                           "finish, or give this run another output folder") from None
        try:  # the holder before us may have removed the file between our open and our lock
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still holding the lock: nobody else owns this file


def run_key(**settings) -> str:
    """A short stable hash of JSON-able run settings."""
    blob = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class Journal:
    """Finished per-image records of one run key (subclasses: the payload codec of a stage)."""
    kind = "base"

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.header = f"{MAGIC} {self.kind} {key}\n"

    def encode(self, value: Any) -> str:
        raise NotImplementedError

    def decode(self, text: str) -> Any:
        """The value of a payload; raises ValueError if it is not one."""
        raise NotImplementedError

    def load(self, path: Optional[Path] = None) -> dict[str, tuple[str, Any]]:
        """Finished (stamp, value) per image id of a previous run with the same key ({} if
        none), from this journal's file or another ``path`` of the same kind."""
        path = Path(path or self.path)
        if not path.is_file():  # absent, or not a regular file (a device would read forever)
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                if f.readline(len(self.header)) != self.header:
                    return {}
                done = {}
                while line := f.readline(MAX_RECORD_CHARS):
                    if not line.endswith("\n"):
                        break  # torn write, or a line no journal writes
                    parts = line[:-1].split("\t")
                    if len(parts) != 3:
                        break
                    image_id, stamp, payload = parts
                    done[image_id] = (stamp, self.decode(payload))
                return done
        except (OSError, UnicodeDecodeError, ValueError):
            return {}

    def valid(self, stamps: Mapping[str, str], keep: Optional[Callable[[str, Any], bool]] = None,
              done: Optional[dict[str, tuple[str, Any]]] = None) -> dict[str, tuple[str, Any]]:
        """The records a rerun keeps (the resume rule of every stage): of ``done`` (default:
        this journal's records), those of an image in ``stamps`` whose input file still has
        the stamp it had, and that ``keep(image id, value)`` accepts (default: all)."""
        done = self.load() if done is None else done
        return {i: rec for i, rec in done.items()
                if i in stamps and rec[0] == stamps[i] and (keep is None or keep(i, rec[1]))}

    def start(self, done: dict[str, tuple[str, Any]]) -> None:
        """Rewrite the journal with the records kept from ``done`` (drops a torn tail)."""
        lines = self._lines(done.keys(), (st for st, _ in done.values()), (v for _, v in done.values()))
        with atomic_writer(self.path) as f:
            f.write((self.header + "".join(lines)).encode("utf-8"))

    def append(self, ids: Iterable[str], stamps: Iterable[str], values: Iterable[Any]) -> None:
        """Add finished records, on disk before this returns; a write failure (a full disk, a
        folder gone read-only) is an InputError naming the journal."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(self._lines(ids, stamps, values))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise InputError(self.path, f"cannot write the resume journal ({short_reason(exc)})") from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _lines(self, ids, stamps, values):
        for image_id, stamp, value in zip(ids, stamps, values):
            yield f"{image_id}\t{stamp}\t{self.encode(value)}\n"


class ScoreJournal(Journal):
    """Rows of ``n_cols`` float32 scores."""
    kind = "scores"

    def __init__(self, path: Path, key: str, n_cols: int):
        super().__init__(path, f"{key} {n_cols}")
        self.n_cols = n_cols

    def encode(self, row) -> str:
        return " ".join(float(v).hex() for v in row)

    def decode(self, text: str) -> np.ndarray:
        row = [float.fromhex(v) for v in text.split()]
        if len(row) != self.n_cols:
            raise ValueError("wrong row length")
        return np.asarray(row, dtype=np.float32)


class CamJournal(Journal):
    """Per image: the CAM file's stamp when it was written and the labels it holds. A CAM
    file is kept on resume only if it is still that file (same stamp) for the same labels."""
    kind = "cams"

    def encode(self, value) -> str:
        cam_stamp, labels = value
        return " ".join([cam_stamp, *(str(int(c)) for c in labels)])

    def decode(self, text: str) -> tuple[str, tuple[int, ...]]:
        cam_stamp, *labels = text.split(" ")
        return cam_stamp, tuple(int(c) for c in labels)


class HistJournal(Journal):
    """(n, n) int64 confusion matrices plus a count of unexpected GT pixels, stored sparsely."""
    kind = "confusion"

    def __init__(self, path: Path, key: str, n_classes: int):
        super().__init__(path, f"{key} {n_classes}")
        self.n = n_classes

    def encode(self, value) -> str:
        hist, unexpected = value
        flat = np.asarray(hist, dtype=np.int64).reshape(-1)
        cells = " ".join(f"{i}:{flat[i]}" for i in np.flatnonzero(flat))
        return f"{int(unexpected)} {cells}".rstrip()

    def decode(self, text: str) -> tuple[np.ndarray, int]:
        unexpected, *cells = text.split()
        flat = np.zeros(self.n * self.n, dtype=np.int64)
        for cell in cells:
            index, count = cell.split(":")
            flat[int(index)] = int(count)
        return flat.reshape(self.n, self.n), int(unexpected)
