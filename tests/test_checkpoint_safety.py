"""Checkpoints never run code (issue 10, item 1) and load errors keep their reason (item 13).

Every hostile archive here is built by the test itself: scripted modules whose ``__setstate__``
writes a file (``torch.from_file(..., shared=True)``) or never returns, and hand-assembled
TorchScript zips whose ``data.pkl`` names dangerous globals. The payloads are first shown to
work when TorchScript loads them, so that their absence under the toolkit's loader means
something. Loads that could run a payload run in a child process with a timeout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import types
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import helpers
import numpy as np
import pytest
import torch

import clip
from clip import loading
from clip.model import StateDictMismatch, build_model
from toolkit.errors import InputError

PAYLOAD_BYTES = 8  # what the file-writing payload writes: this many bytes ...
PAYLOAD_FILL = 88  # ... of this value ("X")
EXTENSIONS = (".pt", ".pth", ".bin", "")
HOSTILE_LOAD_TIMEOUT_S = 240  # the child that loads every hostile file (torch import included)
SPIN_PROOF_S = 3.0  # TorchScript must still be inside the looping payload after this long
CHILD_START_TIMEOUT_S = 120  # for a child to import torch and say it is ready
FAKE_RELEASE = "Fake-ViT/1"


# ----------------------------------------------------------------------------- payload modules


class FileWriter(torch.nn.Module):
    """Its ``__setstate__`` creates the file named in its state and fills it with bytes."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.size = PAYLOAD_BYTES
        self.fill = PAYLOAD_FILL
        self.written = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, int, int, bool]:
        return (self.target, self.size, self.fill, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, int, int, bool]) -> None:
        self.target, self.size, self.fill, self.training = state
        self.written = torch.from_file(self.target, shared=True, size=self.size, dtype=torch.uint8)
        self.written.fill_(self.fill)


class Spinner(torch.nn.Module):
    """Its ``__setstate__`` never returns."""

    def __init__(self):
        super().__init__()
        self.spin = True
        self.turns = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[bool, bool]:
        return (self.spin, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[bool, bool]) -> None:
        self.spin, self.training = state
        turns = 0
        while self.spin:
            turns += 1
        self.turns = turns


class ParamWriter(torch.nn.Module):
    """A file writer that also restores a parameter in its ``__setstate__``: the data reader
    cannot know that parameter's value without running the code, so it refuses the archive."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = torch.nn.Parameter(torch.full((3,), 0.5), requires_grad=False)
        self.written = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.target, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target, self.weight, self.training = state
        self.written = torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8)
        self.written.fill_(88)


class Layout(torch.nn.Module):
    """Parameters and buffers in the layouts a TorchScript archive can store: views of one
    float16 storage (strided, transposed, offset), a buffer before a parameter, ``None`` state,
    a non-persistent buffer, a plain tensor attribute (not state) and a submodule."""

    def __init__(self):
        super().__init__()
        base = torch.arange(48, dtype=torch.float32).reshape(6, 8).half()
        self.register_buffer("first_buffer", base.t())
        self.strided = torch.nn.Parameter(base[1:4, ::3], requires_grad=False)
        self.register_buffer("row", base[5])
        self.register_parameter("absent", None)
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.note = torch.zeros(3)  # an attribute, not state
        self.register_buffer("input_resolution", torch.tensor(224))
        self.inner = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.note[0]


# ----------------------------------------------------------------------------- builders


@contextmanager
def _torchscript_deprecation_ignored():
    """torch warns that TorchScript is deprecated; here it only makes fixtures and references."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    """The reference: what TorchScript itself gives (runs the archive's code)."""
    with _torchscript_deprecation_ignored():
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _save_scripted(module: torch.nn.Module, path: Path) -> Path:
    with _torchscript_deprecation_ignored():
        torch.jit.script(module).save(str(path))
    return path


_tree = helpers.module_tree


def _clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small valid CLIP ViT state dict (float16, OpenAI's names)."""
    return helpers.random_state_dict(seed=seed, vision_width=64, vision_layers=2, text_width=64, text_layers=1,
                                     vocab_size=100, image_resolution=32, patch_size=16, dtype=torch.float16)


def _traced_clip(path: Path) -> Path:
    """Our CLIP in float16 with OpenAI's scalar buffers, saved by ``torch.jit.trace`` as
    OpenAI's archives were (a traced method that touches part of the model)."""
    model = helpers.random_model(seed=3, vision_width=64, vision_layers=2, text_width=64, text_layers=1,
                                 vocab_size=100, image_resolution=32, patch_size=16).half()
    del model.context_length  # a plain attribute of our CLIP; a buffer in OpenAI's archives
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 100)):
        model.register_buffer(name, torch.tensor(value))
    model.final_projection = types.MethodType(lambda self, x: self.ln_final(x) @ self.text_projection, model)
    with _torchscript_deprecation_ignored():
        traced = torch.jit.trace_module(model, {"final_projection": torch.zeros(1, 64, dtype=torch.float16)})
        traced.save(str(path))
    return path


# A TorchScript archive assembled by hand: data.pkl written opcode by opcode.

def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _op_int(value: int) -> bytes:
    return b"\x8a\x08" + value.to_bytes(8, "little", signed=True)  # LONG1, 8 bytes


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


HANDMADE_CODE = 'class Handmade(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n  training : bool\n'


def _handmade_pickle(numel: int = 4, offset: int = 0, size=(4,), stride=(1,), value: Optional[bytes] = None) -> bytes:
    """data.pkl of a ``__torch__.Handmade`` module whose parameter ``w`` is a float32 view of
    storage ``0``; ``value`` replaces that tensor's opcodes."""
    persistent = _op_tuple(_op_str("storage"), _op_global("torch", "FloatStorage"), _op_str("0"), _op_str("cpu"),
                           _op_int(numel)) + b"Q"
    tensor = (_op_global("torch._utils", "_rebuild_tensor_v2")
              + _op_tuple(persistent, _op_int(offset), _op_tuple(*map(_op_int, size)), _op_tuple(*map(_op_int, stride)),
                          b"\x89", _op_global("collections", "OrderedDict") + b")R")
              + b"R")
    attributes = b"}(" + _op_str("w") + (tensor if value is None else value) + _op_str("training") + b"\x88u"
    return b"\x80\x02" + _op_global("__torch__", "Handmade") + b")\x81" + attributes + b"b."


def _handmade_archive(path: Path, data_pkl: bytes, storage: bytes = struct.pack("<4f", 1, 2, 3, 4),
                      storage_compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("handmade/data.pkl", data_pkl)
        z.writestr("handmade/code/__torch__.py", HANDMADE_CODE)
        z.writestr("handmade/data/0", storage, compress_type=storage_compression)
        z.writestr("handmade/constants.pkl", b"\x80\x02).")
        z.writestr("handmade/version", b"3\n")
        z.writestr("handmade/byteorder", b"little")
    return path


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def _data_refusal(path: Path, reason: str) -> str:
    """The whole message for an archive the data reader refuses."""
    return (f"{path}: {loading.CANNOT_READ_AS_DATA} ({reason}); only {loading.ALLOW_CODE_FLAG} loads it, "
            f"which runs code from the file: use it only for a file you trust")


def _payload_written(target: Path) -> bool:
    return target.exists() and target.read_bytes() == bytes([PAYLOAD_FILL]) * PAYLOAD_BYTES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "default-cache"))


# ----------------------------------------------------------------------------- the payloads work


def test_file_writing_payload_writes_when_torchscript_loads_it(tmp_path):
    target = tmp_path / "written-by-payload"
    path = _save_scripted(FileWriter(str(target)), tmp_path / "writer.pt")
    assert not target.exists()
    _jit_state(path)
    assert _payload_written(target)


CHILD_ENV_PATH = os.pathsep.join(filter(None, [str(helpers.REPO_ROOT), os.environ.get("PYTHONPATH")]))

SPIN_CHILD = """
import sys
import torch
print("ready", flush=True)
torch.jit.load(sys.argv[1])
print("returned", flush=True)
"""


def test_looping_payload_loops_when_torchscript_loads_it(tmp_path):
    path = _save_scripted(Spinner(), tmp_path / "spinner.pt")
    proc = subprocess.Popen([sys.executable, "-c", SPIN_CHILD, str(path)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": CHILD_ENV_PATH})
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=SPIN_PROOF_S)
    finally:
        proc.kill()
        proc.communicate(timeout=CHILD_START_TIMEOUT_S)


# ----------------------------------------------------------------------------- hostile archives


HOSTILE_CHILD = """
import json, sys
import torch
import clip
from clip import loading
from toolkit.errors import InputError

paths, expected_path, cache = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
expected = torch.load(expected_path, weights_only=True)
results = {}
for path in paths:
    entry = results[path] = {}
    try:
        state = loading.load_state_dict(path)
        entry["state"] = set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
    except InputError as err:
        entry["state_error"] = str(err)
    try:
        model = clip.load_clip(path, cache_dir=cache)
        entry["model"] = all(torch.equal(model.state_dict()[k], v.float()) for k, v in expected.items())
    except InputError as err:
        entry["model_error"] = str(err)
print(json.dumps(results))
"""


def test_hostile_archives_load_as_data_without_running_code(tmp_path):
    """Payloads alone and payloads beside a real-looking CLIP state, under every extension:
    no file appears, every load ends, with the CLIP tensors or a one-line InputError."""
    target = tmp_path / "written-by-payload"
    state = _clip_state()
    built = tmp_path / "built"
    built.mkdir()
    archives = {
        "writer": _save_scripted(FileWriter(str(target)), built / "writer.pt"),
        "spinner": _save_scripted(Spinner(), built / "spinner.pt"),
        "clip_writer": _save_scripted(_tree(state, FileWriter(str(target))), built / "clip_writer.pt"),
        "clip_spinner": _save_scripted(_tree(state, Spinner()), built / "clip_spinner.pt"),
    }
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    paths = {}
    for kind, archive in archives.items():
        for ext in EXTENSIONS:
            paths[str(hostile / f"{kind}{ext}")] = kind
            shutil.copyfile(archive, hostile / f"{kind}{ext}")
    expected = tmp_path / "expected.pt"
    torch.save(state, expected)
    try:
        child = subprocess.run([sys.executable, "-c", HOSTILE_CHILD, json.dumps(list(paths)), str(expected),
                                str(tmp_path / "cache")], cwd=tmp_path, capture_output=True, text=True,
                               timeout=HOSTILE_LOAD_TIMEOUT_S, env={**os.environ, "PYTHONPATH": CHILD_ENV_PATH})
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the hostile archives did not end within {HOSTILE_LOAD_TIMEOUT_S} s")
    assert not target.exists(), "a payload ran"
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert set(results) == set(paths)
    for path, kind in paths.items():
        if kind.startswith("clip_"):
            assert results[path] == {"state": True, "model": True}, path
        else:
            missing = f"{path}: not a CLIP ViT checkpoint: missing key visual.conv1.weight"
            assert results[path] == {"state_error": missing, "model_error": missing}, path


def test_hostile_archive_is_handed_to_torchscript_with_allow_code(tmp_path):
    target = tmp_path / "written-by-payload"
    state = _clip_state()
    path = _save_scripted(_tree(state, FileWriter(str(target))), tmp_path / "clip_writer")
    with _torchscript_deprecation_ignored():
        model = clip.load_clip(str(path), cache_dir=tmp_path / "cache", allow_code=True)
    assert _payload_written(target)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value.float()), key
    target.unlink()
    with _torchscript_deprecation_ignored():
        loaded = loading.load_state_dict(path, allow_code=True)
    assert _payload_written(target)
    assert set(loaded) == set(state)
    target.unlink()
    assert set(loading.load_state_dict(path)) == set(state)  # by default: data only
    assert not target.exists()


def test_archive_whose_parameters_need_its_code_is_refused_naming_the_flag(tmp_path):
    target = tmp_path / "written-by-payload"
    path = _save_scripted(_tree(_clip_state(), ParamWriter(str(target))), tmp_path / "param_writer.bin")
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    reason = (f"module payload (__torch__.{__name__}.ParamWriter) sets its parameters with its own "
              f"__setstate__ code")
    assert _one_line(e) == _data_refusal(path, reason)
    assert not target.exists()


def test_openai_release_falls_back_to_torchscript(tmp_path, monkeypatch, caplog):
    """A file whose SHA256 is one of OpenAI's releases is trusted: if the data reader refuses
    it, TorchScript loads it (and runs its code), with a warning that says so."""
    target = tmp_path / "written-by-payload"
    state = _clip_state()
    path = _save_scripted(_tree(state, ParamWriter(str(target))), tmp_path / "released.pt")
    with pytest.raises(InputError, match=loading.ALLOW_CODE_FLAG):
        loading.load_state_dict(path)
    assert not target.exists()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(loading.OPENAI_MODELS, FAKE_RELEASE, f"https://example.invalid/clip/models/{sha}/x.pt")
    with caplog.at_level("WARNING", logger=loading.__name__), _torchscript_deprecation_ignored():
        loaded = loading.load_state_dict(path)
    assert _payload_written(target)
    assert set(loaded) == {"payload.weight", *state}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert any(f"OpenAI's {FAKE_RELEASE} release" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- data reader = TorchScript


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, same dtype, shape, strides, offsets, values and the same
    pattern of shared storages."""
    assert list(got) == list(want)
    for key, w in want.items():
        g = got[key]
        assert (g.dtype, g.shape, g.stride(), g.storage_offset()) == (w.dtype, w.shape, w.stride(), w.storage_offset()), key
        assert torch.equal(g, w), key

    def sharing(state):
        groups: dict[int, set[str]] = {}
        for key, value in state.items():
            groups.setdefault(value.untyped_storage().data_ptr(), set()).add(key)
        return sorted(sorted(group) for group in groups.values())

    assert sharing(got) == sharing(want)


def test_data_reader_gives_torchscripts_state_dict_for_openai_layout(tmp_path):
    state = _clip_state(seed=5)
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(100))
    path = tmp_path / "openai-layout.pt"
    helpers.save_torchscript(state, path)
    want = _jit_state(path)
    assert want["visual.conv1.weight"].dtype == torch.float16 and want["vocab_size"].dtype == torch.int64
    _assert_same_state(loading.read_torchscript_data(path), want)
    _assert_same_state(loading.load_state_dict(path), want)


def test_data_reader_gives_torchscripts_state_dict_for_a_traced_clip(tmp_path):
    path = _traced_clip(tmp_path / "traced.pt")
    want = _jit_state(path)
    assert {"input_resolution", "context_length", "vocab_size", "visual.conv1.weight"} <= set(want)
    _assert_same_state(loading.read_torchscript_data(path), want)
    model = clip.load_clip(str(path), cache_dir=tmp_path / "cache")
    for key, value in want.items():
        if key not in ("input_resolution", "context_length", "vocab_size"):
            assert torch.equal(model.state_dict()[key], value.float()), key


def test_data_reader_gives_torchscripts_state_dict_for_views_and_odd_layouts(tmp_path):
    path = _save_scripted(Layout(), tmp_path / "layout.pt")
    want = _jit_state(path)
    assert list(want) == ["strided", "first_buffer", "row", "scratch", "input_resolution", "inner.weight"]
    assert not want["strided"].is_contiguous() and not want["first_buffer"].is_contiguous()
    assert want["row"].storage_offset() == 40
    assert want["strided"].untyped_storage().data_ptr() == want["row"].untyped_storage().data_ptr()
    _assert_same_state(loading.read_torchscript_data(path), want)


def test_handmade_archive_reads_like_torchscript(tmp_path):
    path = _handmade_archive(tmp_path / "handmade.pt", _handmade_pickle(offset=1, size=(3,)))
    got = loading.read_torchscript_data(path)
    _assert_same_state(got, _jit_state(path))
    assert got["w"].tolist() == [2.0, 3.0, 4.0]


# ----------------------------------------------------------------------------- what data.pkl may hold


@pytest.mark.parametrize("module, name, args", [
    ("os", "system", lambda marker: (_op_str(f"touch {marker}"),)),
    ("posix", "system", lambda marker: (_op_str(f"touch {marker}"),)),
    ("builtins", "eval", lambda marker: (_op_str(f"open({str(marker)!r}, 'w').close()"),)),
    ("builtins", "getattr", lambda marker: (_op_str(str(marker)), _op_str("upper"))),
    ("torch", "from_file", lambda marker: (_op_str(str(marker)), b"\x88", _op_int(8))),
])
def test_disallowed_global_in_data_pkl_is_refused_by_name(tmp_path, module, name, args):
    marker = tmp_path / "marker"
    call = _op_global(module, name) + _op_tuple(*args(marker)) + b"R"
    for data_pkl in (b"\x80\x02" + call + b".", _handmade_pickle(value=call)):  # as the root, as a tensor
        path = _handmade_archive(tmp_path / "evil.pt", data_pkl)
        with pytest.raises(InputError) as e:
            loading.load_state_dict(path)
        assert _one_line(e) == _data_refusal(path, f"data.pkl names the global {module}.{name}, which is not "
                                                   f"allowed in data")
        assert not marker.exists()


def test_declared_storage_larger_than_its_record_is_refused_before_allocating(tmp_path):
    path = _handmade_archive(tmp_path / "huge.pt", _handmade_pickle(numel=1 << 40))
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, f"storage record data/0 holds 16 bytes, data.pkl declares "
                                               f"{1 << 40} x torch.float32 = {4 << 40}")


@pytest.mark.parametrize("layout, reason", [
    ({"size": (5,)}, "a tensor of size [5], stride [1], offset 0 does not fit storage 0 of 4 elements"),
    ({"offset": 2, "size": (3,)}, "a tensor of size [3], stride [1], offset 2 does not fit storage 0 of 4 elements"),
    ({"size": (2, 2), "stride": (3, 1)},
     "a tensor of size [2, 2], stride [3, 1], offset 0 does not fit storage 0 of 4 elements"),
    ({"size": (1000,), "stride": (0,)},  # an expanded view: larger than its storage
     "a tensor of size [1000], stride [0], offset 0 does not fit storage 0 of 4 elements"),
    ({"size": (2,), "stride": (-1,)}, "a tensor's stride is not a tuple of non-negative integers"),
    ({"size": (2,), "stride": (1, 1)}, "a tensor of storage 0 has 1 sizes but 2 strides"),
])
def test_tensor_outside_its_storage_is_refused(tmp_path, layout, reason):
    path = _handmade_archive(tmp_path / "bounds.pt", _handmade_pickle(**layout))
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, reason)


def test_compressed_or_corrupt_storage_is_refused(tmp_path):
    path = _handmade_archive(tmp_path / "deflated.pt", _handmade_pickle(), storage_compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, "storage record data/0 is compressed (TorchScript stores tensors "
                                               "as is)")
    path = _handmade_archive(tmp_path / "corrupt.pt", _handmade_pickle())
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<4f", 1, 2, 3, 4))
    data[at] ^= 0xFF  # one flipped byte in the stored tensor: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e).startswith(f"{path}: {loading.NOT_A_CHECKPOINT}: Bad CRC-32")


def test_class_without_declaration_is_refused(tmp_path):
    data_pkl = _handmade_pickle().replace(b"c__torch__\nHandmade\n", b"c__torch__\nStranger\n")
    path = _handmade_archive(tmp_path / "stranger.pt", data_pkl)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, "class __torch__.Stranger is not declared in code/__torch__.py")


# ----------------------------------------------------------------------------- messages keep their reason


def _record(tag: str) -> str:
    return tag


class CallsRecord:
    def __reduce__(self):
        return (_record, ("unpickled code ran",))


class CallsSystem:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("payload, global_name", [
    (CallsRecord(), f"{_record.__module__}.{_record.__qualname__}"),
    (CallsSystem(), f"{os.system.__module__}.system"),
])
def test_weights_only_refusal_names_the_refused_global(tmp_path, payload, global_name):
    path = tmp_path / "pickled.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": payload}, path)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    message = _one_line(e)
    prefix = f"{path}: {loading.NOT_A_CHECKPOINT}: refused by weights-only loading: "
    assert message.startswith(prefix)
    reason = message[len(prefix):]
    assert f"GLOBAL {global_name}" in reason
    assert "weights_only" not in reason and "Weights only load failed" not in reason


def _mlp_wider(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """The vision tower's MLPs ``hidden`` wide instead of 4 x width (as in ViT-g-14)."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("visual.") and key.endswith("mlp.c_fc.weight"):
            width = value.shape[1]
            out[key] = torch.zeros(hidden, width, dtype=value.dtype)
            out[key.replace("c_fc.weight", "c_fc.bias")] = torch.zeros(hidden, dtype=value.dtype)
            out[key.replace("c_fc.weight", "c_proj.weight")] = torch.zeros(width, hidden, dtype=value.dtype)
    return out


def test_strict_load_failure_names_the_first_size_mismatch_and_counts_the_rest(tmp_path):
    path = tmp_path / "vit-g-like.pt"
    torch.save(_mlp_wider(_clip_state(), 300), path)
    with pytest.raises(InputError) as e:
        clip.load_clip(str(path), cache_dir=tmp_path / "cache")
    assert _one_line(e) == (f"{path}: not a CLIP ViT checkpoint: Size mismatch for "
                            f"visual.transformer.resblocks.0.mlp.c_fc.weight: [300, 64] in the state dict, "
                            f"[256, 64] in the model (and 5 more; in all 6 size mismatches)")


def test_strict_load_failure_names_the_first_missing_key_and_counts_the_rest(tmp_path):
    state = _clip_state()
    del state["visual.ln_pre.weight"]
    state["visual.extra"] = torch.zeros(2, dtype=torch.float16)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(InputError) as e:
        clip.load_clip(str(path), cache_dir=tmp_path / "cache")
    assert _one_line(e) == (f"{path}: not a CLIP ViT checkpoint: Missing key visual.ln_pre.weight "
                            f"(and 1 more; in all 1 missing, 1 unexpected)")
    del state["visual.extra"]
    with pytest.raises(StateDictMismatch, match=r"^Missing key visual\.ln_pre\.weight$"):
        build_model(state)


def test_build_model_reports_an_unexpected_key_alone():
    state = _clip_state()
    state["visual.extra\nline"] = torch.zeros(2)
    with pytest.raises(StateDictMismatch) as e:
        build_model(state)
    assert str(e.value) == "Unexpected key 'visual.extra\\nline'"


@pytest.mark.parametrize("kind", ["torch", "npz", "torchscript"])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path, kind):
    state = _clip_state()
    state["visual.class_embedding"][3] = float("nan")
    state["token_embedding.weight"][0, 0] = float("inf")
    path = tmp_path / f"nan.{kind}"
    if kind == "torch":
        torch.save(state, path)
    elif kind == "npz":
        with open(path, "wb") as f:  # a file object, so np.savez keeps the name as given
            np.savez(f, **{k: v.numpy() for k, v in state.items()})
    else:
        helpers.save_torchscript(state, path)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == f"{path}: {loading.NON_FINITE} visual.class_embedding (1 of 64 values)"


def test_all_nan_checkpoint_is_refused(tmp_path):
    state = {k: torch.full_like(v, float("nan")) for k, v in _clip_state().items()}
    path = tmp_path / "all-nan.pt"
    torch.save(state, path)
    with pytest.raises(InputError) as e:
        clip.load_clip(str(path), cache_dir=tmp_path / "cache")
    first = next(iter(state))
    assert _one_line(e) == f"{path}: {loading.NON_FINITE} {first} ({state[first].numel()} of {state[first].numel()} values)"


@pytest.mark.parametrize("data_pkl, reason", [
    # BUILD with attribute state on an allowed global: were it the function itself, its defaults
    # would change for every later file (metadata=1: the good archive below would be refused)
    (b"\x80\x02" + _op_global("torch._utils", "_rebuild_tensor_v2") + b"N}" + _op_str("__defaults__")
     + _op_tuple(_op_int(1)) + b"s\x86b.", "data.pkl gives a state to a global it may name"),
    # BUILD on a storage type
    (b"\x80\x02" + _op_global("torch", "FloatStorage") + b"}b.", "data.pkl gives a state to a storage type"),
])
def test_data_pkl_cannot_change_what_it_may_name(tmp_path, data_pkl, reason):
    path = _handmade_archive(tmp_path / "build.pt", data_pkl)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, reason)
    good = _handmade_archive(tmp_path / "good.pt", _handmade_pickle())
    assert loading.read_torchscript_data(good)["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_memo_index_beyond_the_pickle_is_refused_before_unpickling(tmp_path):
    """Python's C unpickler sizes its memo by the largest index stored: LONG_BINPUT 2**31 would
    make it allocate 16 GiB for a 12-byte data.pkl."""
    data_pkl = b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 31) + b"."
    path = _handmade_archive(tmp_path / "memo.pt", data_pkl)
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, f"data.pkl stores memo entry {1 << 31} after only 2 opcodes")


def test_truncated_data_pkl_is_refused(tmp_path):
    path = _handmade_archive(tmp_path / "cut.pt", _handmade_pickle()[:-2])  # no BUILD, no STOP
    with pytest.raises(InputError) as e:
        loading.load_state_dict(path)
    assert _one_line(e) == _data_refusal(path, "data.pkl is not a readable pickle (pickle exhausted before seeing STOP)")
