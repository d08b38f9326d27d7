"""Tests for clip.loading: formats, error messages, SHA256 memo and (offline) downloads."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import pickle
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from helpers import save_torchscript

from clip import loading
from toolkit.errors import InputError

NESTED_KEY = "visual.transformer.resblocks.0.attn.in_proj_weight"
FAKE_NAME = "Fake-ViT/1"
PAYLOAD = b"pretend checkpoint bytes " * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAKE_URL = f"https://example.invalid/clip/models/{PAYLOAD_SHA}/Fake-ViT-1.pt"

_side_effects: list[str] = []


def _record(tag: str) -> str:
    _side_effects.append(tag)
    return tag


class Smuggled:
    """Unpickling this runs ``_record`` -- weights-only loading must refuse it first."""

    def __reduce__(self):
        return (_record, ("unpickled code ran",))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep the SHA256 memo (default cache dir) out of the real home folder."""
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=g).half(),
        "visual.class_embedding": torch.randn(4, generator=g).half(),
        NESTED_KEY: torch.randn(12, 4, generator=g).half(),
        "token_embedding.weight": torch.randn(10, 4, generator=g).half(),
        "logit_scale": torch.tensor(4.6052, dtype=torch.float16),
    }




def _write(kind: str, state: dict[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    if kind == "torch":
        torch.save(state, path)
    elif kind == "nested_module":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif kind == "npz":
        with open(path, "wb") as f:  # a file object, so np.savez keeps the name as given
            np.savez(f, **{k: v.numpy() for k, v in state.items()})
    elif kind == "torchscript":
        save_torchscript(state, path)
    return path


@pytest.mark.parametrize("kind", ["torch", "nested_module", "npz", "torchscript"])
def test_formats_load_identical_tensors(kind, state, tmp_path):
    # Misleading extension on purpose: detection is by content.
    path = _write(kind, state, tmp_path / "weights.bin")
    loaded = loading.load_state_dict(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == torch.float16, key
        assert loaded[key].device.type == "cpu"
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


def test_torchscript_archive_is_detected_as_such(state, tmp_path):
    path = _write("torchscript", state, tmp_path / "ts.pt")
    with zipfile.ZipFile(path) as z:
        assert any(n.endswith("constants.pkl") for n in z.namelist())
    assert loading._zip_kind(path) == "torchscript"
    assert loading._zip_kind(_write("npz", state, tmp_path / "w.npz")) == "npz"
    assert loading._zip_kind(_write("torch", state, tmp_path / "w.pt")) == "torch"


def _message(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _message(e) == f"{path}: no such file"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"), "unrecognised content (starts with b"),
        # pickle magic, then 0xB9 = 185, which is no pickle opcode: torch's weights-only
        # unpickler refuses it (its multi-line refusal shortened to one line)
        (b"\x80\x02\xb9" + bytes(range(256)) * 2, "refused by weights-only loading: Unsupported operand 185"),
        # a well-formed pickle of the int 1 in the legacy torch.save layout, whose first
        # pickle must be torch's magic number 0x1950a86a20f9469cfc6c
        (pickle.dumps(1, protocol=2), "Invalid magic number; corrupt file?"),
    ],
    ids=["zero_bytes", "random_bytes", "pickle_magic_then_unknown_opcode", "pickle_of_wrong_magic_number"],
)
def test_corrupt_files(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    msg = _message(e)
    assert msg.startswith(f"{path}: {loading.NOT_A_CHECKPOINT}: {reason}")
    assert len(msg) < len(str(path)) + 250


@pytest.mark.parametrize("kind", ["torch", "npz", "torchscript"])
def test_truncated_zip(kind, state, tmp_path):
    path = _write(kind, state, tmp_path / "full.bin")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as e:
        loading.load_state_dict(cut)
    msg = _message(e)
    assert msg.startswith(f"{cut}: {loading.NOT_A_CHECKPOINT}: truncated or corrupt zip archive")


def test_valid_file_without_clip_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _message(e) == f"{path}: not a CLIP ViT checkpoint: missing key visual.conv1.weight"


def test_missing_later_required_key(state, tmp_path):
    del state["logit_scale"]
    path = _write("npz", state, tmp_path / "w.npz")
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _message(e).endswith("missing key logit_scale")


def test_non_tensor_entry_and_non_dict(state, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({**state, "note": "hello"}, path)
    with pytest.raises(InputError, match="entry 'note' is a str, not a tensor"):
        loading.load_state_dict(path)
    torch.save([state["logit_scale"]], path)
    with pytest.raises(InputError, match="holds a list, not a dict of tensors"):
        loading.load_state_dict(path)


def test_pickled_code_is_refused(state, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**state, "payload": Smuggled()}, path)
    _side_effects.clear()
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    msg = _message(e)
    assert _side_effects == []
    assert msg.startswith(f"{path}: {loading.NOT_A_CHECKPOINT}: refused by weights-only loading")


def test_unknown_name():
    with pytest.raises(InputError) as e:
        loading.resolve_checkpoint("ViT-H/99")
    assert _message(e) == "ViT-H/99: neither a file nor a known model name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)"


def test_existing_path_resolves_to_itself(state, tmp_path):
    path = _write("torch", state, tmp_path / "mine.pt")
    assert loading.resolve_checkpoint(str(path)) == path
    sd, sha = loading.load_checkpoint(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(sd[NESTED_KEY], state[NESTED_KEY])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "a"))
    assert loading.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TAGCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.default_cache_dir() == tmp_path / "xdg" / "clip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loading.default_cache_dir() == tmp_path / "home" / ".cache" / "clip"


# ----------------------------------------------------------------------------- SHA256 memo


def test_sha256_matches_hashlib_and_is_memoised(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * loading.CHUNK_BYTES + 17)  # several chunks plus a tail
    path.write_bytes(data)
    cache = tmp_path / "cache"
    calls = []
    real = loading._sha256_uncached
    monkeypatch.setattr(loading, "_sha256_uncached", lambda p: calls.append(p) or real(p))

    expected = hashlib.sha256(data).hexdigest()
    assert loading.sha256_of_file(path, cache) == expected
    assert loading.sha256_of_file(path, cache) == expected
    assert len(calls) == 1
    assert (cache / loading.SHA256_MEMO_NAME).is_file()
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]

    # A changed file (size / mtime) is hashed again.
    path.write_bytes(data + b"x")
    assert loading.sha256_of_file(path, cache) == hashlib.sha256(data + b"x").hexdigest()
    assert len(calls) == 2


def test_memo_is_keyed_by_mtime(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"aaaa")
    cache = tmp_path / "cache"
    loading.sha256_of_file(path, cache)
    stat = path.stat()
    path.write_bytes(b"bbbb")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert loading.sha256_of_file(path, cache) == hashlib.sha256(b"bbbb").hexdigest()


def test_corrupt_memo_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"hello")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / loading.SHA256_MEMO_NAME).write_text("{not json")
    assert loading.sha256_of_file(path, cache) == hashlib.sha256(b"hello").hexdigest()
    assert str(path.resolve()) in (cache / loading.SHA256_MEMO_NAME).read_text()


def test_memo_with_wrong_shape_is_ignored(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"hello")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / loading.SHA256_MEMO_NAME).write_text('{"%s": "garbage"}' % path.resolve())
    assert loading.sha256_of_file(path, cache) == hashlib.sha256(b"hello").hexdigest()


# ----------------------------------------------------------------------------- downloads (offline)


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setitem(loading.OPENAI_MODELS, FAKE_NAME, FAKE_URL)


def _serve(monkeypatch, data: bytes | None = None, error: Exception | None = None) -> list[str]:
    requests: list[str] = []

    def urlopen(url, timeout=None):
        requests.append(url)
        if error is not None:
            raise error
        return _Response(data)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requests


def _leftovers(cache: pathlib.Path) -> list[str]:
    return sorted(p.name for p in cache.glob("Fake-ViT-1.pt*")) if cache.exists() else []


def test_download_success(fake_model, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    requests = _serve(monkeypatch, PAYLOAD)
    path = loading.resolve_checkpoint(FAKE_NAME, cache_dir=cache)
    assert path == cache / "Fake-ViT-1.pt"
    assert path.read_bytes() == PAYLOAD
    assert requests == [FAKE_URL]
    assert _leftovers(cache) == ["Fake-ViT-1.pt"]
    # Second call: cached, verified via the memo, no new request.
    assert loading.resolve_checkpoint(FAKE_NAME, cache_dir=cache) == path
    assert requests == [FAKE_URL]


def test_download_sha_mismatch_leaves_nothing(fake_model, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    _serve(monkeypatch, PAYLOAD + b"tampered")
    with pytest.raises(InputError) as e:
        loading.resolve_checkpoint(FAKE_NAME, cache_dir=cache)
    got = hashlib.sha256(PAYLOAD + b"tampered").hexdigest()
    assert _message(e) == f"{FAKE_URL}: SHA256 mismatch: expected {PAYLOAD_SHA}, got {got}"
    assert _leftovers(cache) == []


def test_download_network_failure(fake_model, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    _serve(monkeypatch, error=urllib.error.URLError("no route to host"))
    with pytest.raises(InputError) as e:
        loading.resolve_checkpoint(FAKE_NAME, cache_dir=cache)
    msg = _message(e)
    target = cache / "Fake-ViT-1.pt"
    assert msg.startswith(f"{target}: not found and could not be downloaded from {FAKE_URL} (no route to host)")
    assert "--model_path /path/to/Fake-ViT-1.pt" in msg
    assert _leftovers(cache) == []


def test_download_disabled(fake_model, monkeypatch, tmp_path):
    requests = _serve(monkeypatch, PAYLOAD)
    with pytest.raises(InputError, match="downloading is disabled"):
        loading.resolve_checkpoint(FAKE_NAME, cache_dir=tmp_path, download=False)
    assert requests == []


def test_cached_file_with_matching_hash_is_not_downloaded(fake_model, monkeypatch, tmp_path):
    (tmp_path / "Fake-ViT-1.pt").write_bytes(PAYLOAD)
    requests = _serve(monkeypatch, error=AssertionError("must not download"))
    assert loading.resolve_checkpoint(FAKE_NAME, cache_dir=tmp_path) == tmp_path / "Fake-ViT-1.pt"
    assert requests == []


def test_cached_file_with_wrong_hash_is_downloaded_again(fake_model, monkeypatch, tmp_path, caplog):
    target = tmp_path / "Fake-ViT-1.pt"
    target.write_bytes(b"stale")
    requests = _serve(monkeypatch, PAYLOAD)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        assert loading.resolve_checkpoint(FAKE_NAME, cache_dir=tmp_path) == target
    assert requests == [FAKE_URL]
    assert target.read_bytes() == PAYLOAD
    assert any("SHA256 mismatch" in r.getMessage() for r in caplog.records)


def test_load_checkpoint_by_name(fake_model, monkeypatch, state, tmp_path):
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(loading.OPENAI_MODELS, FAKE_NAME, f"https://example.invalid/m/{sha}/Fake-ViT-1.pt")
    _serve(monkeypatch, data)
    sd, got = loading.load_checkpoint(FAKE_NAME, cache_dir=tmp_path)
    assert got == sha
    assert torch.equal(sd["token_embedding.weight"], state["token_embedding.weight"])
