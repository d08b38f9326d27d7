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
:class:`toolkit.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import pathlib
import urllib.error
import urllib.request
import zipfile
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from toolkit.cli import ALLOW_CODE_FLAG  # the command-line spelling of ``allow_code=True``
from toolkit.devices import precision_dtype, resolve_device
from toolkit.errors import InputError, printable, short_reason
from toolkit.files import CACHE_ENV, atomic_writer, writable_dir
from toolkit.files import cache_dir as toolkit_cache_dir

from . import hf
from .torchscript import CHUNK_BYTES, NotReadableAsData, read_torchscript_data

log = logging.getLogger(__name__)

OPENAI_MODELS: dict[str, str] = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout for one read while downloading
CHECKPOINT_CACHE = "clip"  # the cache folder's name, as OpenAI's clip package names it
SHA256_MEMO_NAME = "sha256-memo.json"  # sidecar in the cache folder: path -> (size, mtime_ns, sha256)
REQUIRED_KEYS = ("visual.conv1.weight", "token_embedding.weight", "logit_scale")
STRIP_PREFIX = "module."  # left by DataParallel / DistributedDataParallel
NOT_A_CHECKPOINT = "not a CLIP checkpoint (TorchScript archive, state dict, .safetensors or .npz)"
CANNOT_READ_AS_DATA = "cannot read this TorchScript archive as data"
NON_FINITE = "not a usable checkpoint: NaN or infinite values in tensor"

_ZIP_MAGIC = b"PK"
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2, as written by torch.save's legacy format
_SAFETENSORS_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length (uint64, little-endian)
_WEIGHTS_ONLY_FAILED = "Weights only load failed"  # how torch's weights-only refusals begin
_WEIGHTS_ONLY_MARKER = "WeightsUnpickler error:"  # ... and where their reason follows



# ----------------------------------------------------------------------------- cache + hashing


def default_cache_dir() -> pathlib.Path:
    """``$TAGCLIP_CACHE`` if set, else ``$XDG_CACHE_HOME/clip``, else ``~/.cache/clip``."""
    return toolkit_cache_dir(CHECKPOINT_CACHE)


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
        with atomic_writer(memo_path) as f:
            f.write(json.dumps(memo, indent=1, sort_keys=True).encode("utf-8"))
    except (OSError, InputError) as exc:
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


class _DownloadFailed(Exception):
    """The network (or the disk) failed during a download; ``args[0]`` is the cause."""


def _download(url: str, out, name: str) -> str:
    """Stream ``url`` into the binary file ``out`` with a progress bar; return the SHA256 of
    what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _fetch(url: str, target: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Download ``url`` to ``target`` atomically (:func:`~toolkit.files.atomic_writer`), the
    SHA256 verified before the file takes the target's name."""
    expected = _expected_sha256(url)
    hint = f"download it by hand and place it at this path, or pass --model_path /path/to/{target.name}"
    try:
        with atomic_writer(target) as out:
            try:
                got = _download(url, out, target.name)
            except (OSError, http.client.HTTPException) as exc:
                raise _DownloadFailed(exc) from None
            if got != expected:
                raise InputError(url, f"SHA256 mismatch: expected {expected}, got {got}")
    except _DownloadFailed as failed:
        exc = failed.args[0]
        plain_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
        reason = exc.reason if plain_url_error else exc
        state = "has the wrong SHA256" if target.is_file() else "not found"
        raise InputError(target, f"{state} and could not be downloaded from {url} ({reason}); {hint}") from None
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
    if path.is_dir():
        weights = hf.weights_in(path)
        if weights is None:
            raise InputError(path, f"a folder without a Hugging Face model ({hf.CONFIG_NAME} and "
                                   f"{' or '.join(hf.WEIGHT_NAMES)})")
        return weights
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
    """:func:`~toolkit.errors.short_reason`, except that torch's weights-only refusal becomes
    ``refused by weights-only loading: <what was refused>``."""
    if str(exc).startswith(_WEIGHTS_ONLY_FAILED):
        return short_reason(RuntimeError(f"refused by weights-only loading: {_weights_only_reason(exc)}"))
    return short_reason(exc)


def _zip_kind(path: pathlib.Path) -> str:
    """``'torchscript'``, ``'npz'`` or ``'torch'`` for a zip file; raises ``zipfile.BadZipFile``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names):
        return "torchscript"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "torch"


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
    if _is_safetensors(path):
        from safetensors.torch import load_file  # deferred: only for .safetensors files

        return load_file(str(path), device="cpu")  # a JSON header and raw tensors: no code, no pickle
    raise ValueError(f"unrecognised content (starts with {head!r})")


def _is_safetensors(path: pathlib.Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(_SAFETENSORS_LENGTH_BYTES + 1)
    if len(head) <= _SAFETENSORS_LENGTH_BYTES:
        return False
    length = int.from_bytes(head[:_SAFETENSORS_LENGTH_BYTES], "little")
    return head[_SAFETENSORS_LENGTH_BYTES:] == b"{" and 1 < length <= path.stat().st_size


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
    if hf.is_hf_layout(state):
        state = hf.to_openai_layout(state, path)
    layout = _foreign_layout(state)
    if layout:
        raise InputError(path, f"not a CLIP ViT checkpoint: {layout}; supported: CLIP ViTs in OpenAI's layout, "
                               "OpenCLIP ViTs and Hugging Face CLIPModels")
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


def _foreign_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """What a state dict that is not a whole CLIP ViT looks like (for the refusal), or None."""
    keys = set(state)
    if "visual.attnpool.c_proj.weight" in keys or any(k.startswith("visual.layer1.") for k in keys):
        return "a ResNet CLIP (visual.layer1.*, visual.attnpool.*)"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "an OpenCLIP model with a timm vision trunk (visual.trunk.*)"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.0.") for k in keys):
        return "a timm ViT (patch_embed.*, blocks.*), an image model without CLIP's text tower"
    if "visual.conv1.weight" in keys and "token_embedding.weight" not in keys:
        return "a vision tower alone (visual.*), without the text tower"
    if "conv1.weight" in keys and "class_embedding" in keys:
        return "a vision tower alone (conv1, class_embedding, ... without the visual. prefix)"
    return None


def checkpoint_identity(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                        arch=None, download: bool = True):
    """What identifies a model's results without reading its weights: ``(SHA256 of the
    checkpoint, its Architecture)`` (for resume keys)."""
    from . import architecture

    path = resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download)
    sha = sha256_of_file(path, cache_dir)
    return sha, architecture.resolve(path, arch, _openai_release(sha) is not None, warn=False)


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


def load_clip(
    name_or_path: str | os.PathLike = "ViT-B/16", device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None, download: bool = True,
    *, allow_code: bool = False, arch=None,
):
    """A ready CLIP model (eval mode, no parameter gradients) with ``checkpoint_sha256`` set.

    ``arch``: what the weights cannot show (activation, head widths), as
    :func:`clip.architecture.resolve` finds it: an :class:`~clip.model.Architecture`, an
    OpenCLIP model name, else ``open_clip_config.json`` beside the file, else OpenAI's (a
    warning says so unless the file is one of OpenAI's releases).

    OpenAI stores float16 weights; by default they are copied into float32 parameters, as
    the reference's classification does (SPEC §2). ``dtype`` float16 / bfloat16 casts every
    parameter; LayerNorms still compute in float32 and attention maps are returned in float32.
    No code from the checkpoint runs unless ``allow_code`` is true (the command-line flag
    ``--allow_checkpoint_code``): a TorchScript archive is otherwise read as data (see
    :func:`load_state_dict`). A state dict that does not fit the architecture its shapes
    describe is refused naming the first missing key, unexpected key or size mismatch.
    """
    from . import architecture  # local: keeps this module importable without the model
    from .model import StateDictMismatch, build_model

    device = resolve_device(device)
    path = resolve_checkpoint(name_or_path, cache_dir=cache_dir, download=download)
    state = load_state_dict(path, allow_code=allow_code)
    sha = sha256_of_file(path, cache_dir)
    facts = architecture.resolve(path, arch, _openai_release(sha) is not None)
    try:
        model = build_model(state, dtype=dtype, arch=facts)
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


def load_model(model_path: str | os.PathLike, device: str | torch.device | None = None, precision: str = "fp32",
               cache_dir: str | os.PathLike | None = None, allow_code: bool = False, arch=None):
    """The commands' one way to load a model: the device checked first, a cache folder the
    user chose (``$TAGCLIP_CACHE``) checked writable, then :func:`load` with the ``--precision``
    name's dtype. Every problem is an InputError (one line, exit status 2)."""
    device = resolve_device(device)
    if os.environ.get(CACHE_ENV):  # a cache the user chose must work; the default one is optional
        writable_dir(os.environ[CACHE_ENV], f"cache folder ({CACHE_ENV})")
    return load_clip(model_path, device=device, dtype=precision_dtype(precision), cache_dir=cache_dir,
                allow_code=allow_code, arch=arch)
