"""Reading a TorchScript archive's tensors as data: no code of the archive runs.

An archive's ``data.pkl`` is unpickled with an allow-list that builds only inert records
(tensor descriptions, stand-ins for TorchScript's module objects); the parameter and buffer
names come from the class declarations in its ``code/`` folder (read as text, never
compiled); the tensors are built from the zip's storage records after every size and bound is
checked against the file's own size. :func:`read_torchscript_data` is the entry point; it
raises :class:`NotReadableAsData` for an archive it cannot read this way.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pathlib
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from typing import Any, NamedTuple

import torch

from toolkit.errors import printable, short_reason

CHUNK_BYTES = 1 << 20  # storage read granularity (1 MiB)
MAX_ARCHIVE_TEXT_BYTES = 64 << 20  # cap on a TorchScript archive's data.pkl, and on its code/ files together

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
            raise NotReadableAsData(
                f"data.pkl is not a readable pickle ({type(exc).__name__}: {short_reason(exc)})") from None
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


