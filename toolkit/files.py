"""Reading users' files and writing every output atomically; the toolkit's cache folder.

Every output of the toolkit (label files, score files, CAM files, masks, pictures, journals,
caches, downloads' memos) goes through :func:`atomic_writer`: a temporary file in the target
folder, written, flushed, fsync'ed and renamed over the target, so a reader never sees half a
file and a failed write leaves nothing behind. Every problem is an
:class:`~toolkit.errors.InputError` naming the file.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, short_reason

# Moves every cache of the toolkit (checkpoints, text features, resume journals).
CACHE_ENV = "TAGCLIP_CACHE"
# Permissions of a newly written file (mkstemp would leave 0600); an existing target keeps its own.
NEW_FILE_MODE = 0o644
UTF8_BOM = b"\xef\xbb\xbf"


def _article(what: str) -> str:
    return f"a{'n' if what[:1] in 'aeiou' else ''} {what}"


def read_bytes(path, what: str = "file") -> bytes:
    """The bytes of a user's file; a missing file, a folder or an OS error -> one-line InputError."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, not {_article(what)}") from None
    except OSError as exc:
        raise InputError(path, f"cannot read {what} ({short_reason(exc)})") from None


def read_json_object(path, what: str = "config") -> dict:
    """A user's JSON file holding one object; unreadable or malformed JSON, or another value,
    is an InputError naming the file."""
    try:
        value = json.loads(read_text(path, what))
    except ValueError as exc:
        raise InputError(path, f"not a readable {what} ({short_reason(exc)})") from None
    if not isinstance(value, dict):
        raise InputError(path, f"not a {what} (a JSON object is expected)")
    return value


def read_text(path, what: str = "file") -> str:
    """A user's UTF-8 text file (a leading byte-order mark dropped, newlines untranslated); a
    byte that is not UTF-8 is an InputError naming its line and offset."""
    data = read_bytes(path, what)
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})") from None


@contextmanager
def atomic_writer(path) -> Iterator[io.BufferedWriter]:
    """Yield a binary file that replaces ``path`` atomically when the block succeeds: a
    temporary file in the same folder, fsync'ed, then ``os.replace``; the folder is created; an
    existing file keeps its permission bits. OS errors become :class:`InputError` naming
    ``path``; on any error nothing is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(path, f"cannot create output file ({short_reason(exc)})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                mode = NEW_FILE_MODE
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
            raise InputError(path, f"cannot write file ({short_reason(exc)})") from None
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` as UTF-8 (newlines untranslated) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


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
        raise InputError(path, f"cannot write into this {what} ({short_reason(exc)})") from None
    return path


def file_stamp(path) -> str:
    """``size:mtime_ns`` of a file, or ``missing``: tells a resumed run that a file changed."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def cache_dir(name: str = "tagclip") -> Path:
    """``$TAGCLIP_CACHE``, else ``$XDG_CACHE_HOME/{name}``, else ``~/.cache/{name}``.

    ``name`` is ``tagclip`` for the toolkit's caches and ``clip`` for checkpoints (where
    OpenAI's ``clip`` keeps them too)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / name
