"""CAM files: ``{id}.npy`` as the reference's ``np.save`` wrote them (SPEC §5).

A CAM file is a pickled dict ``{"keys": int64 (K,), "attn_highres": float16 (K, H, W)}``
(:func:`save_cam`, :func:`load_cam`). :func:`load_cam` unpickles with a whitelist (numpy arrays
only), so a CAM folder from elsewhere cannot run code, and checks every size the file states (the
pickle's lengths and memo indices, each array's shape against its data and against
MAX_CAM_CLASSES maps of at most MAX_IMAGE_PIXELS pixels) before anything is allocated, so it
cannot exhaust memory.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import reprlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from toolkit.errors import InputError
from toolkit.files import atomic_writer
from toolkit.images import MAX_IMAGE_PIXELS

# SPEC §5: CAM file format.
KEYS_DTYPE = np.int64
HIGHRES_DTYPE = np.float16
CAM_FILE_SUFFIX = ".npy"
CAM_KEYS = ("keys", "attn_highres")
# CAM file limits (load_cam), checked before anything is allocated: at most MAX_CAM_CLASSES
# maps (and keys) per file, each map at most toolkit.images.MAX_IMAGE_PIXELS pixels (CAMs have
# the size of their image, and no reader of the toolkit accepts a larger image), so a file may
# ask for at most MAX_CAM_ELEMENTS array elements (fewer when the image size is known). No
# shipped vocabulary has more than 171 classes.
MAX_CAM_CLASSES = 1024
MAX_CAM_ELEMENTS = MAX_CAM_CLASSES * (MAX_IMAGE_PIXELS + 1)  # the maps plus the keys
# Widest array element a CAM file may hold (float64 / int64 are 8 bytes; longdouble 16).
MAX_CAM_ITEMSIZE = 16
# Bytes a CAM file holds besides its arrays' data (the .npy header and the pickle opcodes take
# well under 1 KiB): a file larger than its element limit allows plus this is not read.
CAM_FILE_OVERHEAD_BYTES = 64 * 1024
# Pickle globals a CAM file may name: numpy's array reconstruction only. Each one is replaced by
# a checked stand-in (_ArrayUnpickler); the class numpy.ndarray may not be called at all.
_RECONSTRUCT_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_SCALAR_NAMES = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NDARRAY_NAME = ("numpy", "ndarray")
_DTYPE_NAME = ("numpy", "dtype")
# The type strings numpy pickles a dtype of numbers (or of objects) with: kind and item size.
_DTYPE_SPEC = re.compile(r"[biufcO][0-9]{1,2}")
# Pickle opcodes that store into the memo: their index is bounded by the opcodes read so far
# (a pickler numbers its memo from 0), since the unpickler sizes its memo by the index.
_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def save_cam(path, keys, attn_highres) -> None:
    """Write ``{"keys": int64, "attn_highres": float16}`` as the reference's pickled-dict .npy,
    atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    keys = np.asarray(keys, dtype=KEYS_DTYPE).reshape(-1)
    maps = np.asarray(attn_highres).astype(HIGHRES_DTYPE, copy=False)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"attn_highres shape {maps.shape} does not match {keys.shape[0]} keys")
    with atomic_writer(path) as handle:
        np.save(handle, {"keys": keys, "attn_highres": maps}, allow_pickle=True)


class CamLimits(NamedTuple):
    """What one CAM file may ask for (:func:`cam_limits`)."""
    classes: int    # maps (and keys) per file
    pixels: int     # pixels per map
    elements: int   # array elements in the whole file
    pixels_from: str = "MAX_IMAGE_PIXELS"  # where ``pixels`` comes from, for messages

    def file_bytes(self) -> int:
        """Size beyond which a file cannot be a CAM file within these limits."""
        return self.elements * MAX_CAM_ITEMSIZE + CAM_FILE_OVERHEAD_BYTES


def cam_limits(expected_hw: Optional[tuple[int, int]] = None,
               max_elements: Optional[int] = None) -> CamLimits:
    """MAX_CAM_CLASSES maps of ``H x W`` pixels when the image size is known, else of at most
    MAX_IMAGE_PIXELS; ``max_elements`` lowers the element limit further."""
    pixels, pixels_from = MAX_IMAGE_PIXELS, "MAX_IMAGE_PIXELS"
    if expected_hw is not None:
        h, w = (int(v) for v in expected_hw)
        if h < 0 or w < 0:
            raise ValueError(f"expected_hw must be two sizes >= 0, got {expected_hw!r}")
        if h * w < pixels:
            pixels, pixels_from = h * w, f"the image's {w}x{h}"
    elements = min(MAX_CAM_ELEMENTS, MAX_CAM_CLASSES * (pixels + 1))
    if max_elements is not None:
        if int(max_elements) < 0:
            raise ValueError(f"max_elements must be >= 0, got {max_elements!r}")
        elements = min(elements, int(max_elements))
    return CamLimits(MAX_CAM_CLASSES, pixels, elements, pixels_from)


def _brief(value) -> str:
    """A short repr of a value read from a file (bounded in length and depth)."""
    return reprlib.repr(value)


def _is_plain_number_dtype(dtype) -> bool:
    """A numpy dtype of plain numbers (bool, integer, float, complex): no fields, no sub-array."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.names is None
            and dtype.subdtype is None and dtype.itemsize <= MAX_CAM_ITEMSIZE
            and dtype == np.dtype(dtype.str))


class _ArrayBudget:
    """The elements one CAM file may still ask for; every array's pickled state is checked
    against it (and against its own data) before numpy allocates the array."""

    def __init__(self, limits: CamLimits):
        self.limits = limits
        self.elements = 0

    def check_state(self, state) -> None:
        """``state``: the ``(version, shape, dtype, fortran, data)`` an ndarray is pickled with."""
        if not isinstance(state, tuple) or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise pickle.UnpicklingError("an array's pickled state is not numpy's")
        shape, dtype, fortran, data = state[-4:]
        if type(fortran) not in (bool, int):
            raise pickle.UnpicklingError("an array's pickled state is not numpy's")
        if (not isinstance(shape, tuple) or len(shape) > 3
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"array shape {_brief(shape)} is not a tuple of 0 to 3 sizes")
        if not (isinstance(dtype, np.dtype) and (dtype == np.dtype(object) or _is_plain_number_dtype(dtype))):
            raise pickle.UnpicklingError(f"array of dtype {_brief(dtype)} (a CAM file holds numbers)")
        limits = self.limits
        count = math.prod(shape)
        if len(shape) == 1 and count > limits.classes:
            raise pickle.UnpicklingError(f"a 1-d array of {count} elements, more keys than MAX_CAM_CLASSES = "
                                         f"{limits.classes}")
        if len(shape) == 3 and shape[0] > limits.classes:
            raise pickle.UnpicklingError(f"{shape[0]} maps, more than MAX_CAM_CLASSES = {limits.classes}")
        if len(shape) == 3 and shape[1] * shape[2] > limits.pixels:
            raise pickle.UnpicklingError(f"maps of {shape[2]}x{shape[1]} (WxH) = {shape[1] * shape[2]} pixels, more "
                                         f"than {limits.pixels_from} = {limits.pixels}")
        if not dtype.hasobject and self.elements + count > limits.elements:
            raise pickle.UnpicklingError(f"arrays of {self.elements + count} elements in all, more than the "
                                         f"{limits.elements} a CAM file may hold")
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
                raise pickle.UnpicklingError(f"object array of shape {shape} holds {got}")
        else:
            need = count * dtype.itemsize
            if not isinstance(data, (bytes, str)) or len(data) != need:
                got = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else f"a {type(data).__name__}"
                raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dtype} needs {need} bytes "
                                             f"of data, the file holds {got}")
            self.elements += count


class _CheckedArray(np.ndarray):
    """What a CAM file's arrays are rebuilt as: numpy's own ``__setstate__``, once the state
    passed its :class:`_ArrayBudget` (``load_cam`` returns plain ndarray views of them)."""

    def __setstate__(self, state):
        self.__dict__["_budget"].check_state(state)
        np.ndarray.__setstate__(self, state)


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` in a CAM file: an argument of numpy's ``_reconstruct``,
    never a callable (``ndarray(shape, dtype)`` would allocate the pickled shape)."""

    __slots__ = ()  # no __dict__ for a pickled BUILD to fill

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray; numpy pickles arrays with _reconstruct")


_NDARRAY = _NdarrayClass()
_RECONSTRUCT = np.empty(0).__reduce__()[0]    # numpy's _reconstruct, wherever numpy keeps it
_SCALAR = np.float16(0).__reduce__()[0]       # numpy's scalar


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers and plain containers, nothing else, within a budget.

    The globals a CAM file may name are numpy's array reconstruction, each replaced by a checked
    stand-in: ``_reconstruct`` gives an empty :class:`_CheckedArray` (numpy always pickles the
    shape ``(0,)`` there), whose ``__setstate__`` checks the shape, dtype and data length against
    the budget before numpy builds the array; ``scalar`` takes a plain number dtype and exactly
    its bytes; ``dtype`` a type string.
    """

    def __init__(self, file, budget: _ArrayBudget):
        super().__init__(file, encoding="latin1")
        self._budget = budget

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _RECONSTRUCT_NAMES:
            return self._reconstruct
        if key in _SCALAR_NAMES:
            return self._scalar
        if key == _NDARRAY_NAME:
            return _NDARRAY
        if key == _DTYPE_NAME:
            return self._dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def _reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY or shape != (0,):
            raise pickle.UnpicklingError(f"unexpected array reconstruction with shape {_brief(shape)}; numpy "
                                         f"pickles the shape (0,) there")
        array = _RECONSTRUCT(_CheckedArray, (0,), b"b")
        array.__dict__["_budget"] = self._budget
        return array

    @staticmethod
    def _dtype(spec, align=False, copy=False):
        # numpy 2 pickles dtype("f2", False, True); numpy 1 dtype("f2", 0, 1)
        if (not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec)
                or type(align) not in (bool, int) or type(copy) not in (bool, int)):
            raise pickle.UnpicklingError(f"unexpected dtype {_brief(spec)}")
        return np.dtype(spec, bool(align), bool(copy))

    @staticmethod
    def _scalar(dtype, data=None):
        if not _is_plain_number_dtype(dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise pickle.UnpicklingError(f"unexpected numpy scalar of dtype {_brief(dtype)}")
        return _SCALAR(dtype, data)


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes before anything is built: every counted argument (bytes,
    strings, frames) must lie within ``data`` (:func:`pickletools.genops` reads each one, so
    a length field cannot make the unpickler allocate more than the file holds) and every memo
    index must be below the number of opcodes read so far."""
    for count, (opcode, arg, pos) in enumerate(pickletools.genops(data), start=1):
        if opcode.name in _MEMO_PUT_OPCODES and arg >= count:
            raise ValueError(f"memo index {arg} at byte {pos} is out of range")


def _read_npy_object(path: Path, limits: CamLimits):
    """The object stored in a .npy file, with numpy-only unpickling for object arrays."""
    size = path.stat().st_size
    if size > limits.file_bytes():
        raise ValueError(f"{size} bytes, more than the {limits.file_bytes()} a CAM file within the limits holds")
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if not dtype.hasobject:
            raise ValueError("holds a plain array, not the {keys, attn_highres} dict")
        if shape != ():
            raise ValueError(f"holds an object array of shape {shape}, not one dict")
        data = f.read(size - f.tell())  # the size was checked above; one read, one buffer
    _check_opcodes(data)
    obj = _ArrayUnpickler(io.BytesIO(data), _ArrayBudget(limits)).load()
    if not isinstance(obj, np.ndarray) or obj.shape != ():
        raise ValueError("the pickle does not hold one object array")
    return obj.item()


def load_cam(path, expected_hw: Optional[tuple[int, int]] = None,
             max_elements: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(keys int64 (K,), attn_highres (K, H, W))`` of a CAM file (float16 as :func:`save_cam`
    writes it; other float dtypes are accepted as they are); InputError if not.

    Nothing is allocated for an array before its size is checked (:func:`cam_limits`): at most
    MAX_CAM_CLASSES maps of at most MAX_IMAGE_PIXELS pixels, or of ``expected_hw`` pixels when
    the caller knows the image's ``(H, W)``, and at most ``max_elements`` elements in all when
    given; the file's size, the .npy header, each array's pickled shape, dtype and data length
    and the pickle's counted arguments must all agree with that. The size itself is not
    compared with ``expected_hw`` here (callers report a different size in their own words).
    """
    path = Path(path)
    limits = cam_limits(expected_hw, max_elements)
    if not path.is_file():
        raise InputError(path, "CAM file not found" if not path.exists() else "not a file")
    try:
        obj = _read_npy_object(path, limits)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError,
            IndexError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(path, f"not a readable CAM file ({reason})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"not a CAM file: holds a {type(obj).__name__}, not a dict")
    missing = [k for k in CAM_KEYS if k not in obj]
    if missing:
        raise InputError(path, f"not a CAM file: missing {', '.join(repr(k) for k in missing)}")
    keys, maps = obj["keys"], obj["attn_highres"]
    if not isinstance(keys, np.ndarray) or keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise InputError(path, "CAM file: 'keys' is not a 1-d integer array")
    if not isinstance(maps, np.ndarray) or not np.issubdtype(maps.dtype, np.floating):
        got = maps.dtype if isinstance(maps, np.ndarray) else type(maps).__name__
        raise InputError(path, f"CAM file: 'attn_highres' must be a float array (float16 as written), got {got}")
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise InputError(path, f"CAM file: 'attn_highres' shape {maps.shape} does not match "
                               f"{keys.shape[0]} keys")
    return np.asarray(keys).astype(KEYS_DTYPE, copy=False), np.asarray(maps)


def cam_path(cam_out_dir, image_id: str) -> Path:
    """``{cam_out_dir}/{id}.npy``."""
    return Path(cam_out_dir) / f"{image_id}{CAM_FILE_SUFFIX}"
