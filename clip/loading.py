"""Find, download, verify and read CLIP checkpoints.

A checkpoint is named either by one of OpenAI's model names (``"ViT-B/16"``), which is looked up
in (or downloaded into) the same cache folder OpenAI's ``clip`` package uses, or by a file path.
Three file formats are read, told apart by their content rather than their extension:

* OpenAI's TorchScript archive (the file ``clip.load`` downloads),
* a plain ``torch.save``'d state dict (optionally under ``"state_dict"``, with ``module.`` prefixes),
* a ``.npz`` file of arrays with OpenAI's key names.

No code from a checkpoint runs unless the caller asks for it. Pickled files are only ever read
with ``weights_only=True``. A TorchScript archive is read as DATA (:func:`read_torchscript_data`):
its ``data.pkl`` is unpickled with an allow-list that builds only inert records (tensor
descriptions, stand-ins for TorchScript's module objects), the parameter and buffer names come
from the class declarations in its ``code/`` folder (read as text, never compiled), and the
tensors are built from the zip's storage records after every size and bound is checked.
``torch.jit.load``, which runs the archive's code (its ``__setstate__`` methods), gets an
archive only with ``allow_code=True`` (the command-line flag ``--allow_checkpoint_code``), or
when the data reader refuses a file whose SHA256 is one of OpenAI's releases (:data:`OPENAI_MODELS`).

Tensors keep their stored dtype (OpenAI's weights are float16) and live on the CPU; a NaN or
infinity in any floating-point tensor is refused. Every problem the user can cause is raised as
:class:`tagclip.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import io
import json
import logging
import math
import os
import pathlib
import pickle
import pickletools
import re
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .errors import InputError, printable

log = logging.getLogger(__name__)

OPENAI_MODELS: dict[str, str] = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}

CHUNK_BYTES = 1 << 20  # read / download granularity (1 MiB)
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout for one read while downloading
CACHE_ENV = "TAGCLIP_CACHE"  # overrides the cache folder
SHA256_MEMO_NAME = "sha256-memo.json"  # sidecar in the cache folder: path -> (size, mtime_ns, sha256)
PART_SUFFIX = ".part"  # a download in progress
REQUIRED_KEYS = ("visual.conv1.weight", "token_embedding.weight", "logit_scale")
STRIP_PREFIX = "module."  # left by DataParallel / DistributedDataParallel
NOT_A_CHECKPOINT = "not a CLIP checkpoint (TorchScript archive, state dict or .npz)"
CANNOT_READ_AS_DATA = "cannot read this TorchScript archive as data"
NON_FINITE = "not a usable checkpoint: NaN or infinite values in tensor"
ALLOW_CODE_FLAG = "--allow_checkpoint_code"  # the command-line spelling of ``allow_code=True``
MAX_REASON_CHARS = 160  # a foreign exception's text is cut to this in messages
MAX_ARCHIVE_TEXT_BYTES = 64 << 20  # cap on a TorchScript archive's data.pkl, and on its code/ files together

_ZIP_MAGIC = b"PK"
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2, as written by torch.save's legacy format
_WEIGHTS_ONLY_FAILED = "Weights only load failed"  # how torch's weights-only refusals begin
_WEIGHTS_ONLY_MARKER = "WeightsUnpickler error:"  # ... and where their reason follows

# TorchScript archives: the storage types data.pkl names, the namespace of the archive's own
# classes, and the lines of a code file that declare a class's parameters and buffers.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_SCRIPT_PACKAGE = "__torch__"
_STORAGE_KEY = re.compile(r"\w{1,32}", re.ASCII)  # a storage record's name: torch writes "0", "1", ...
_CLASS_LINE = re.compile(r"class (\w+)(?:\((\w+)\))?:")
_DECLARED_NAMES = re.compile(r"  (__parameters__|__buffers__) = \[(.*)\]")
_QUOTED = re.compile(r'"([^"\\]*)"')
_SETSTATE_LINE = "  def __setstate__("
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")  # pickle opcodes that store into the memo at an index


# ----------------------------------------------------------------------------- cache + hashing


def default_cache_dir() -> pathlib.Path:
    """``$TAGCLIP_CACHE`` if set, else ``$XDG_CACHE_HOME/clip``, else ``~/.cache/clip``."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base).expanduser() / "clip"


def _sha256_uncached(path: pathlib.Path) -> str:
    """SHA256 hex digest of ``path``, streamed in ``CHUNK_BYTES`` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_memo(memo_path: pathlib.Path) -> dict[str, list]:
    """The sidecar's entries; an absent, unreadable or malformed sidecar reads as empty."""
    try:
        data = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_sha256(path: pathlib.Path, sha256: str, cache_dir: pathlib.Path) -> None:
    """Record ``sha256`` for ``path`` (at its current size and mtime); failures are only logged."""
    try:
        st = path.stat()
        cache_dir.mkdir(parents=True, exist_ok=True)
        memo_path = cache_dir / SHA256_MEMO_NAME
        memo = {k: v for k, v in _read_memo(memo_path).items() if os.path.exists(k)}
        memo[str(path.resolve())] = [st.st_size, st.st_mtime_ns, sha256]
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".sha256-memo-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(memo, f, indent=1, sort_keys=True)
            os.replace(tmp, memo_path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.debug("could not update %s in %s: %s", SHA256_MEMO_NAME, cache_dir, exc)


def sha256_of_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA256 hex digest of a file, memoised by (absolute path, size, mtime_ns).

    The memo is a small JSON sidecar in ``cache_dir`` (default: :func:`default_cache_dir`), so a
    large checkpoint is hashed once rather than on every run.
    """
    path = pathlib.Path(path)
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    entry = _read_memo(cache / SHA256_MEMO_NAME).get(str(path.resolve()))
    if (
        isinstance(entry, list)
        and len(entry) == 3
        and entry[:2] == [st.st_size, st.st_mtime_ns]
        and isinstance(entry[2], str)
    ):
        return entry[2]
    sha256 = _sha256_uncached(path)
    _remember_sha256(path, sha256, cache)
    return sha256


# ----------------------------------------------------------------------------- download + resolve


def _expected_sha256(url: str) -> str:
    """OpenAI's URLs carry the file's SHA256 as their second-to-last path component."""
    return url.rstrip("/").split("/")[-2]


def _download(url: str, dest: pathlib.Path) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return the SHA256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _fetch(url: str, target: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Download ``url`` to ``target`` via ``<target>.part``, verifying its SHA256 before renaming."""
    expected = _expected_sha256(url)
    part = target.with_name(target.name + PART_SUFFIX)
    hint = f"download it by hand and place it at this path, or pass --model_path /path/to/{target.name}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        got = _download(url, part)
    except (OSError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        plain_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
        reason = exc.reason if plain_url_error else exc
        state = "has the wrong SHA256" if target.is_file() else "not found"
        raise InputError(target, f"{state} and could not be downloaded from {url} ({reason}); {hint}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if got != expected:
        part.unlink(missing_ok=True)
        raise InputError(url, f"SHA256 mismatch: expected {expected}, got {got}")
    os.replace(part, target)
    _remember_sha256(target, got, cache_dir)


def resolve_checkpoint(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> pathlib.Path:
    """Path of a checkpoint given an OpenAI model name or a file path.

    A model name maps to ``cache_dir/<file name in its URL>``; a cached file is used if its
    SHA256 matches, otherwise (absent or wrong hash) it is downloaded when ``download`` is true.
    """
    name = str(name_or_path)
    if name in OPENAI_MODELS:
        url = OPENAI_MODELS[name]
        cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = cache / url.rstrip("/").split("/")[-1]
        expected = _expected_sha256(url)
        if target.is_file():
            got = sha256_of_file(target, cache)
            if got == expected:
                return target
            if not download:
                raise InputError(target, f"SHA256 mismatch: expected {expected}, got {got} (downloading is disabled)")
            log.warning("%s: SHA256 mismatch (expected %s, got %s); downloading it again", target, expected, got)
        elif not download:
            raise InputError(
                target,
                f"not found and downloading is disabled; download {url} and place it at this path, "
                f"or pass --model_path /path/to/{target.name}",
            )
        _fetch(url, target, cache)
        return target
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return path
    raise InputError(name, f"neither a file nor a known model name ({', '.join(OPENAI_MODELS)})")


# ----------------------------------------------------------------------------- reading


def _first_sentence(text: str) -> str:
    """The first line of ``text`` up to its first full stop."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else ""


def _weights_only_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (a global, an opcode, ...), without its advice.

    torch wraps the unpickler's own error (kept as ``__context__``) in a paragraph about
    ``weights_only=False``; the reason is the inner error, or else the text after its marker.
    """
    inner = exc.__context__
    if inner is not None and _first_sentence(str(inner)):
        return _first_sentence(str(inner))
    text = str(exc)
    if _WEIGHTS_ONLY_MARKER in text:
        return _first_sentence(text.split(_WEIGHTS_ONLY_MARKER, 1)[1])
    return _first_sentence(text)


def _short(exc: BaseException) -> str:
    """First line of an exception's message, trimmed to ``MAX_REASON_CHARS``; torch's
    weights-only refusal becomes ``refused by weights-only loading: <what was refused>``."""
    text = str(exc)
    if text.startswith(_WEIGHTS_ONLY_FAILED):
        text = f"refused by weights-only loading: {_weights_only_reason(exc)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def _zip_kind(path: pathlib.Path) -> str:
    """``'torchscript'``, ``'npz'`` or ``'torch'`` for a zip file; raises ``zipfile.BadZipFile``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names):
        return "torchscript"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "torch"


# ----------------------------------------------------------------------------- TorchScript as data


class NotReadableAsData(ValueError):
    """A TorchScript archive that :func:`read_torchscript_data` refuses; the message says why."""


class _Record:
    """Base of the inert records data.pkl is unpickled into: giving one a state is refused."""

    __slots__ = ()
    what = "record"  # what it stands for, in messages

    def __setstate__(self, state: Any) -> None:
        raise NotReadableAsData(f"data.pkl gives a state to a {self.what}")


class _StorageType(_Record):
    """What ``torch.FloatStorage`` and its kin stand for in data.pkl: a dtype."""

    __slots__ = ("name", "dtype")
    what = "storage type"

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _StorageRef(_Record):
    """One storage record of the archive (``data/<key>``) as data.pkl declares it."""

    __slots__ = ("key", "dtype", "numel")
    what = "storage"

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRecord(_Record):
    """A tensor as data.pkl describes it: a view of a storage, bounds already checked."""

    __slots__ = ("storage", "offset", "size", "stride")
    what = "tensor"

    def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _ScriptObject:
    """Inert stand-in for an object of one of the archive's own TorchScript classes
    (``__torch__.*``): it stores the state data.pkl gives it, nothing of the archive runs."""

    __slots__ = ("state",)
    script_class = ""  # the qualified TorchScript class name; set on each subclass

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise NotReadableAsData(f"a tensor's {what} is not a tuple of non-negative integers")
    return tuple(value)


def _tensor_record(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRecord:
    """Check a tensor description against its storage: it must lie inside it and be no larger."""
    if not isinstance(storage, _StorageRef):
        raise NotReadableAsData(f"a tensor is built from a {type(storage).__name__}, not a storage record")
    if type(offset) is not int or offset < 0:
        raise NotReadableAsData(f"a tensor of storage {storage.key} has an offset that is not a non-negative integer")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise NotReadableAsData(f"a tensor of storage {storage.key} has {len(size)} sizes but {len(stride)} strides")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if last >= storage.numel or numel > storage.numel:
        raise NotReadableAsData(
            f"a tensor of size {list(size)}, stride {list(stride)}, offset {offset} does not fit storage "
            f"{storage.key} of {storage.numel} elements")
    return _TensorRecord(storage, offset, size, stride)


def _no_hooks(hooks: Any) -> None:
    if not isinstance(hooks, dict) or hooks:
        raise NotReadableAsData("a tensor carries backward hooks")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRecord:
    return _tensor_record(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       metadata: Any = None) -> _TensorRecord:
    _no_hooks(hooks)
    if metadata:  # conj / neg bits and the like: not weights of a CLIP model
        raise NotReadableAsData("a tensor carries metadata (conjugate or negative bits, ...)")
    return _tensor_record(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> Any:
    _no_hooks(hooks)
    if not isinstance(data, _TensorRecord):
        raise NotReadableAsData(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, hooks: Any, state: Any) -> Any:
    if state:
        raise NotReadableAsData("a parameter carries Python attributes")
    return _rebuild_parameter(data, requires_grad, hooks)


def _typed_list(items: Any) -> list:
    if not isinstance(items, list):
        raise NotReadableAsData(f"a TorchScript list is a {type(items).__name__}")
    return items


def _restore_type_tag(value: Any, type_name: Any) -> Any:
    return value


def _device_name(*args: Any) -> tuple:
    return ("device", args)


class _Allowed(_Record):
    """An allowed global of data.pkl: a callable record that calls one function (it is not the
    function itself, so that data.pkl cannot give that function attributes)."""

    __slots__ = ("function",)
    what = "global it may name"

    def __init__(self, function: Any):
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


# Every global data.pkl may name, each mapped to a function of this module (never to the
# object the name refers to, except OrderedDict, which is called as is), besides the storage
# types and the archive's own classes.
_DATA_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _Allowed(_rebuild_tensor),
    "torch._utils._rebuild_tensor_v2": _Allowed(_rebuild_tensor_v2),
    "torch._utils._rebuild_parameter": _Allowed(_rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _Allowed(_rebuild_parameter_with_state),
    "collections.OrderedDict": _Allowed(collections.OrderedDict),
    "torch.jit._pickle.build_intlist": _Allowed(_typed_list),
    "torch.jit._pickle.build_doublelist": _Allowed(_typed_list),
    "torch.jit._pickle.build_boollist": _Allowed(_typed_list),
    "torch.jit._pickle.build_tensorlist": _Allowed(_typed_list),
    "torch.jit._pickle.restore_type_tag": _Allowed(_restore_type_tag),
    "torch.device": _Allowed(_device_name),
    **{f"torch.{name}": _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _check_pickle(data: bytes) -> None:
    """Walk data.pkl's opcodes before unpickling it: every length must lie inside the data, and
    no memo index may exceed the number of opcodes before it (the C unpickler sizes its memo by
    the largest index, so one large index would allocate gigabytes)."""
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_PUTS and arg > count:
                raise NotReadableAsData(f"data.pkl stores memo entry {arg} after only {count} opcodes")
    except NotReadableAsData:
        raise
    except ValueError as exc:  # what genops raises on malformed data
        raise NotReadableAsData(f"data.pkl is not a readable pickle ({printable(str(exc))})") from None


class _DataUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into inert records: tensors stay descriptions,
    module objects stay :class:`_ScriptObject` stand-ins, any other global is refused."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._script_classes: dict[str, type] = {}
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in _DATA_GLOBALS:
            return _DATA_GLOBALS[qualified]
        if module == _SCRIPT_PACKAGE or module.startswith(_SCRIPT_PACKAGE + "."):
            if qualified not in self._script_classes:
                self._script_classes[qualified] = type(
                    "ScriptObject", (_ScriptObject,), {"__slots__": (), "script_class": qualified})
            return self._script_classes[qualified]
        raise NotReadableAsData(f"data.pkl names the global {printable(qualified)}, which is not allowed in data")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotReadableAsData(f"data.pkl refers to a {type(pid).__name__} that is not a storage record")
        _, kind, key, _location, numel = pid  # the location is ignored: everything loads to the CPU
        if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key)):
            raise NotReadableAsData(f"data.pkl names a storage record by a {type(key).__name__} that is not a "
                                    f"record name")
        if not isinstance(kind, _StorageType):
            raise NotReadableAsData(f"storage {printable(key)} has a {type(kind).__name__} for its type")
        if type(numel) is not int or numel < 0:
            raise NotReadableAsData(f"storage {printable(key)} has a size that is not a non-negative integer")
        ref = self._storages.setdefault(key, _StorageRef(key, kind.dtype, numel))
        if (ref.dtype, ref.numel) != (kind.dtype, numel):
            raise NotReadableAsData(f"storage {key} is declared both as {ref.numel} x {ref.dtype} and "
                                    f"{numel} x {kind.dtype}")
        return ref


class _ClassInfo(NamedTuple):
    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    own_setstate: bool  # its state is restored by its own __setstate__ code


def _parse_classes(text: str) -> dict[str, _ClassInfo]:
    """The class declarations of one TorchScript code file, read line by line as text
    (the layout ``torch.jit.save`` prints: ``class Name(Module):`` then two-space-indented
    ``__parameters__ = ["a", ]`` / ``__buffers__ = [...]`` lines and methods)."""
    found: dict[str, dict] = {}
    current: dict | None = None
    for line in text.splitlines():
        line = line.rstrip()
        if line and not line[0].isspace():
            match = _CLASS_LINE.fullmatch(line)
            current = None
            if match:
                current = found[match.group(1)] = {"base": match.group(2) or "", "__parameters__": (),
                                                   "__buffers__": (), "setstate": False}
        elif current is not None:
            match = _DECLARED_NAMES.fullmatch(line)
            if match:
                current[match.group(1)] = tuple(_QUOTED.findall(match.group(2)))
            elif line.startswith(_SETSTATE_LINE):
                current["setstate"] = True
    return {name: _ClassInfo(c["base"] == "Module", c["__parameters__"], c["__buffers__"], c["setstate"])
            for name, c in found.items()}


class _Declarations:
    """Class declarations looked up in the archive's ``code/`` folder, each file read once."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive, self._prefix = archive, prefix
        self._files: dict[str, dict[str, _ClassInfo]] = {}
        self._budget = MAX_ARCHIVE_TEXT_BYTES

    def get(self, qualified: str) -> _ClassInfo:
        module, _, name = qualified.rpartition(".")
        if not all(part.isidentifier() for part in module.split(".")):
            raise NotReadableAsData(f"class name {printable(qualified)} is not a TorchScript class name")
        record = f"code/{module.replace('.', '/')}.py"
        if record not in self._files:
            text = _read_record(self._archive, f"{self._prefix}/{record}", self._budget)
            self._budget -= len(text)
            self._files[record] = _parse_classes(text.decode("utf-8", errors="replace"))
        if name not in self._files[record]:
            raise NotReadableAsData(f"class {printable(qualified)} is not declared in {record}")
        return self._files[record][name]


def _read_record(archive: zipfile.ZipFile, name: str, limit: int = MAX_ARCHIVE_TEXT_BYTES) -> bytes:
    """A small record (data.pkl, a code file), refused if it would exceed ``limit`` bytes."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise NotReadableAsData(f"it has no {printable(name)}") from None
    if info.file_size > limit:
        raise NotReadableAsData(f"{printable(name)} is {info.file_size} bytes, more than the {limit} allowed")
    with archive.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotReadableAsData(f"{printable(name)} is more than the {limit} bytes allowed")
    return data


def _collect(root: Any, declarations: _Declarations) -> dict[str, _TensorRecord]:
    """Parameters then buffers of each module, depth first, under their dotted attribute paths
    (the order and names of ``torch.jit.load(...).state_dict()``)."""
    if not isinstance(root, _ScriptObject) or not declarations.get(root.script_class).is_module:
        raise NotReadableAsData(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    found: dict[str, _TensorRecord] = {}
    seen: set[int] = set()
    stack: list[tuple[str, _ScriptObject]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        label = f"module {printable(prefix[:-1])}" if prefix else "the root module"
        if id(module) in seen:
            raise NotReadableAsData(f"{label} is reached twice")
        seen.add(id(module))
        info = declarations.get(module.script_class)
        if info.own_setstate:
            if info.parameters or info.buffers:
                raise NotReadableAsData(f"{label} ({printable(module.script_class)}) sets its parameters "
                                        f"with its own __setstate__ code")
            continue  # no state of its own; whatever its code would do is not run
        state = module.state
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise NotReadableAsData(f"the state of {label} is a {type(state).__name__}, not its attributes")
        for declared in (info.parameters, info.buffers):
            for name in declared:
                if name not in state:
                    raise NotReadableAsData(f"{label} declares {printable(name)} but data.pkl does not hold it")
            for name, value in state.items():
                if name not in declared or value is None:
                    continue
                if not isinstance(value, _TensorRecord):
                    raise NotReadableAsData(f"{printable(prefix + name)} is a {type(value).__name__}, not a tensor")
                found[prefix + name] = value
        children = [(f"{prefix}{name}.", value) for name, value in state.items()
                    if isinstance(value, _ScriptObject) and declarations.get(value.script_class).is_module]
        stack.extend(reversed(children))
    return found


def _read_storage(archive: zipfile.ZipFile, prefix: str, ref: _StorageRef, budget: int) -> torch.Tensor:
    """The bytes of storage record ``data/<key>`` as a uint8 tensor, after checking that the record
    is stored uncompressed, holds exactly the declared bytes and fits in ``budget``."""
    name = f"{prefix}/data/{ref.key}"
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise NotReadableAsData(f"storage record data/{ref.key} is missing") from None
    nbytes = ref.numel * ref.dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotReadableAsData(f"storage record data/{ref.key} is compressed (TorchScript stores tensors as is)")
    if info.file_size != nbytes:
        raise NotReadableAsData(f"storage record data/{ref.key} holds {info.file_size} bytes, data.pkl declares "
                                f"{ref.numel} x {ref.dtype} = {nbytes}")
    if nbytes > budget:
        raise NotReadableAsData(f"storage record data/{ref.key} ({nbytes} bytes) does not fit in the file")
    data = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(data.numpy())
    done = 0
    with archive.open(info) as f:
        while done < nbytes:
            got = f.readinto(view[done: done + CHUNK_BYTES])
            if not got:
                raise NotReadableAsData(f"storage record data/{ref.key} is truncated")
            done += got
    return data


def read_torchscript_data(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read as data: no code of the archive
    runs. Raises :class:`NotReadableAsData` for an archive that cannot be read this way."""
    path = pathlib.Path(path)
    budget = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not names:
            raise NotReadableAsData("the archive is empty")
        prefix = names[0].split("/", 1)[0]  # torch's reader: the first record's folder names the archive
        if f"{prefix}/byteorder" in names:
            order = _read_record(archive, f"{prefix}/byteorder", len("little")).decode("ascii", errors="replace")
            if order != sys.byteorder:
                raise NotReadableAsData(f"its tensors are stored {printable(order)}-endian")
        data_pkl = _read_record(archive, f"{prefix}/data.pkl")
        _check_pickle(data_pkl)
        try:
            root = _DataUnpickler(data_pkl).load()
        except NotReadableAsData:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError, struct.error) as exc:
            raise NotReadableAsData(f"data.pkl is not a readable pickle ({type(exc).__name__}: {_short(exc)})") from None
        records = _collect(root, _Declarations(archive, prefix))
        storages: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        for key, record in records.items():
            ref = record.storage
            if ref.key not in storages:
                storages[ref.key] = _read_storage(archive, prefix, ref, budget)
                budget -= storages[ref.key].numel()
            tensor = torch.empty(0, dtype=ref.dtype)
            state[key] = tensor.set_(storages[ref.key].untyped_storage(), record.offset, record.size, record.stride)
    return state


# ----------------------------------------------------------------------------- formats


def _openai_release(sha256: str) -> str | None:
    """The model name whose OpenAI release has this SHA256, if any."""
    return next((name for name, url in OPENAI_MODELS.items() if _expected_sha256(url) == sha256), None)


def _read_torchscript(path: pathlib.Path, allow_code: bool) -> Mapping:
    """A TorchScript archive's state dict: read as data, or by TorchScript (which runs the
    archive's code) when the caller allows code or the file is one of OpenAI's releases.

    The release check never trusts the SHA256 memo (anyone who can write the cache folder
    could forge it), and TorchScript gets the very bytes that were hashed."""
    if allow_code:
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        return read_torchscript_data(path)
    except NotReadableAsData as exc:
        reason = str(exc)
    refusal = InputError(path, f"{CANNOT_READ_AS_DATA} ({reason}); only {ALLOW_CODE_FLAG} loads it, which runs "
                               f"code from the file: use it only for a file you trust")
    if _openai_release(_sha256_uncached(path)) is None:  # streamed: an unknown file is never held in memory
        raise refusal
    content = path.read_bytes()
    release = _openai_release(hashlib.sha256(content).hexdigest())
    if release is None:  # the file changed since it was hashed
        raise refusal
    log.warning("%s: %s (%s); its SHA256 is OpenAI's %s release, so TorchScript loads it, running its code",
                path, CANNOT_READ_AS_DATA, reason, release)
    return torch.jit.load(io.BytesIO(content), map_location="cpu").state_dict()


def _unwrap(obj: Any) -> Mapping:
    """The tensor mapping inside a ``torch.load`` result (``{'state_dict': ...}`` unwrapped)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _read(path: pathlib.Path, allow_code: bool) -> Mapping:
    """Read ``path`` in whichever format its content says; format problems raise ordinary errors."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError("empty file")
    if head.startswith(_ZIP_MAGIC):
        try:
            kind = _zip_kind(path)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"truncated or corrupt zip archive ({_short(exc)})") from None
        if kind == "torchscript":
            return _read_torchscript(path, allow_code)
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(npz[key]) for key in npz.files}
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    if head.startswith(_PICKLE_MAGIC):
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(f"unrecognised content (starts with {head!r})")


def _first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"<key> (<n> of <numel> values)"`` for the first floating-point tensor holding a NaN or
    an infinity, else None."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return f"{printable(key)} ({bad} of {value.numel()} values)"
    return None


def load_state_dict(path: str | os.PathLike, *, allow_code: bool = False) -> dict[str, torch.Tensor]:
    """Read a CLIP ViT checkpoint into ``{key: CPU tensor}`` with OpenAI's key names and stored dtypes.

    ``module.`` prefixes are stripped. A TorchScript archive's state dict also holds OpenAI's
    scalar entries ``input_resolution``, ``context_length`` and ``vocab_size``; they are kept.
    No code from the file runs: a TorchScript archive is read as data, unless ``allow_code`` is
    true (``--allow_checkpoint_code``: TorchScript loads it, running its code) or the file is
    one of OpenAI's releases (by SHA256) that the data reader refuses. Pickled files are read
    weights-only whatever ``allow_code`` says. A NaN or infinity in a floating-point tensor is
    refused, naming the first such tensor.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        raw = _read(path, allow_code)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or _short(exc)}") from None
    except Exception as exc:  # whatever torch / numpy / zipfile raise on a malformed file
        raise InputError(path, f"{NOT_A_CHECKPOINT}: {_short(exc)}") from None
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise InputError(path, f"{NOT_A_CHECKPOINT}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise InputError(path, f"{NOT_A_CHECKPOINT}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len(STRIP_PREFIX):] if key.startswith(STRIP_PREFIX) else key
        state[name] = value.detach().cpu()
    for key in REQUIRED_KEYS:
        if key not in state:
            raise InputError(path, f"not a CLIP ViT checkpoint: missing key {key}")
    bad = _first_non_finite(state)
    if bad is not None:
        raise InputError(path, f"{NON_FINITE} {bad}")
    return state


def checkpoint_sha256(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> str:
    """SHA256 of the checkpoint a name or path resolves to (memoised), without reading it."""
    return sha256_of_file(resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download), cache_dir)


def load_checkpoint(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True,
    *, allow_code: bool = False,
) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve, read and fingerprint a checkpoint: ``(state_dict, sha256 hex of the file)``.

    ``allow_code`` (``--allow_checkpoint_code``) lets TorchScript load an archive, running its
    code (see :func:`load_state_dict`).
    """
    path = resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download)
    state = load_state_dict(path, allow_code=allow_code)
    return state, sha256_of_file(path, cache_dir)


# ``--precision`` names -> parameter dtypes (README "Precision").
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(name: str) -> torch.dtype:
    """The dtype of a ``--precision`` name (fp32, fp16, bf16)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device a user named (None: CUDA where available, else the CPU), checked to
    exist before any work starts: an unknown name, or a CUDA device this machine does not
    have, is an :class:`InputError` naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(device, "not a torch device (examples: cpu, cuda, cuda:1)") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(device, "no CUDA device is available on this machine (use --device cpu)")
        if chosen.index is not None and chosen.index >= count:
            raise InputError(device, f"this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
    elif chosen.type != "cpu":
        try:
            torch.empty(0, device=chosen)  # mps, xpu, ...: the device answers or it does not exist
        except (RuntimeError, AssertionError) as err:
            raise InputError(device, f"not available here ({_short(err)})") from None
    return chosen


def load(
    name_or_path: str | os.PathLike = "ViT-B/16", device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None, download: bool = True,
    *, allow_code: bool = False,
):
    """A ready CLIP model (eval mode, no parameter gradients) with ``checkpoint_sha256`` set.

    OpenAI stores float16 weights; by default they are copied into float32 parameters, as
    the reference's classification does (SPEC §2). ``dtype`` float16 / bfloat16 casts every
    parameter; LayerNorms still compute in float32 and attention maps are returned in float32.
    No code from the checkpoint runs unless ``allow_code`` is true (the command-line flag
    ``--allow_checkpoint_code``): a TorchScript archive is otherwise read as data (see
    :func:`load_state_dict`). A state dict that does not fit the architecture its shapes
    describe is refused naming the first missing key, unexpected key or size mismatch.
    """
    from .model import StateDictMismatch, build_model  # local: keeps this module importable without the model

    device = resolve_device(device)
    state, sha = load_checkpoint(name_or_path, cache_dir=cache_dir, download=download, allow_code=allow_code)
    try:
        model = build_model(state, dtype=dtype)
    except StateDictMismatch as err:  # one line already, built to carry its reason in full
        raise InputError(name_or_path, f"not a CLIP ViT checkpoint: {err}") from None
    except KeyError as err:
        raise InputError(name_or_path, f"not a CLIP ViT checkpoint: missing key {printable(err.args[0])}") from None
    except (ValueError, RuntimeError, IndexError) as err:
        raise InputError(name_or_path, f"not a CLIP ViT checkpoint: {_short(err)}") from None
    model.checkpoint_sha256 = sha
    try:
        return model.to(device)
    except RuntimeError as err:  # e.g. out of device memory
        raise InputError(name_or_path, f"cannot move the model to {device}: {_short(err)}") from None
