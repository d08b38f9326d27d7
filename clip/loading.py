"""Find, download, verify and read CLIP checkpoints.

A checkpoint is named either by one of OpenAI's model names (``"ViT-B/16"``), which is looked up
in (or downloaded into) the same cache folder OpenAI's ``clip`` package uses, or by a file path.
Three file formats are read, told apart by their content rather than their extension:

* OpenAI's TorchScript archive (the file ``clip.load`` downloads),
* a plain ``torch.save``'d state dict (optionally under ``"state_dict"``, with ``module.`` prefixes),
* a ``.npz`` file of arrays with OpenAI's key names.

Pickled files are only ever read with ``weights_only=True``. Tensors keep their stored dtype
(OpenAI's weights are float16) and live on the CPU. Every problem the user can cause is raised
as :class:`tagclip.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from .errors import InputError

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
MAX_REASON_CHARS = 160

_ZIP_MAGIC = b"PK"
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2, as written by torch.save's legacy format


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


def _short(exc: BaseException) -> str:
    """First line of an exception's message, trimmed to ``MAX_REASON_CHARS``."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusal is a multi-line essay
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0]
        text = "refused by weights-only loading: " + detail.split(". ")[0].rstrip(".")
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


def _unwrap(obj: Any) -> Mapping:
    """The tensor mapping inside a ``torch.load`` result (``{'state_dict': ...}`` unwrapped)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _read(path: pathlib.Path) -> Mapping:
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
            with warnings.catch_warnings():  # OpenAI's files are TorchScript; the deprecation is not actionable
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(npz[key]) for key in npz.files}
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    if head.startswith(_PICKLE_MAGIC):
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(f"unrecognised content (starts with {head!r})")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a CLIP ViT checkpoint into ``{key: CPU tensor}`` with OpenAI's key names and stored dtypes.

    ``module.`` prefixes are stripped. A TorchScript archive's state dict also holds OpenAI's
    scalar entries ``input_resolution``, ``context_length`` and ``vocab_size``; they are kept.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        raw = _read(path)
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
    return state


def checkpoint_sha256(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> str:
    """SHA256 of the checkpoint a name or path resolves to (memoised), without reading it."""
    return sha256_of_file(resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download), cache_dir)


def load_checkpoint(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve, read and fingerprint a checkpoint: ``(state_dict, sha256 hex of the file)``."""
    path = resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download)
    state = load_state_dict(path)
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
):
    """A ready CLIP model (eval mode, no parameter gradients) with ``checkpoint_sha256`` set.

    OpenAI stores float16 weights; by default they are copied into float32 parameters, as
    the reference's classification does (SPEC §2). ``dtype`` float16 / bfloat16 casts every
    parameter; LayerNorms still compute in float32 and attention maps are returned in float32.
    """
    from .model import build_model  # local: keeps this module importable without the model

    device = resolve_device(device)
    state, sha = load_checkpoint(name_or_path, cache_dir=cache_dir, download=download)
    try:
        model = build_model(state, dtype=dtype)
    except (ValueError, RuntimeError, KeyError, IndexError) as err:
        raise InputError(name_or_path, f"not a CLIP ViT checkpoint: {_short(err)}") from None
    model.checkpoint_sha256 = sha
    try:
        return model.to(device)
    except RuntimeError as err:  # e.g. out of device memory
        raise InputError(name_or_path, f"cannot move the model to {device}: {_short(err)}") from None
