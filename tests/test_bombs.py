"""Files cannot exhaust memory (issue 10, items 3-5).

* CAM files: a few hundred bytes of pickle that ask numpy for 2**48 elements (or for a memo of
  2**32 slots, or for a 2**50-byte string) are one InputError line, through :func:`load_cam` and
  through ``eval_cam.py`` / ``eval_cam_with_crf.py --on_error skip``, where the good images
  still give the reference's scores.
* Image files: every reader (model input, GT mask, CRF image, COCO-Stuff map) checks the size in
  the header against ``toolkit.images.MAX_IMAGE_PIXELS`` before decoding; a 30000x30000 PNG of a
  hundred KB, and one between PIL's warning and error limits, are one line each.
* A COCO instances JSON nested 100000 levels deep is one ``error:`` line, exit status 2.

The command-line runs go through a small wrapper that reports the peak resident memory of the
command (``ru_maxrss`` of its children), which must stay under :data:`PEAK_LIMIT_KIB`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import eval_helpers as eh
import helpers
import numpy as np
import pytest
from PIL import Image, ImageFile

from clip_es import cam_files as CF
from clip_es.cam_files import load_cam
from clip_es.evaluation import read_bgr, read_gt
from clip_es.registry import get_eval_config
from pipelines import datasets
from toolkit import images
from toolkit.errors import InputError

REPO = Path(__file__).resolve().parent.parent

# Peak resident memory a command fed hostile files may reach (ru_maxrss is in KiB on Linux).
# Importing torch and the toolkit takes most of it (0.75-0.9 GiB measured with the CUDA build of torch).
PEAK_LIMIT_KIB = 1024 * 1024
# 30000 x 30000 = 9e8 pixels: over twice PIL's limit (its DecompressionBombError), 900 MB as
# 8-bit pixels, 2.7 GB as the CRF's BGR.
BOMB_SIDE = 30000
# 12000 x 12000 = 1.44e8 pixels: between PIL's warning (89.5 Mpx) and error (179 Mpx) limits,
# where PIL only warns and decodes.
BETWEEN_SIDE = 12000
# 2**16 cubed = 2**48 elements: what the tiny CAM files ask numpy for.
HUGE_SHAPE = (2**16, 2**16, 2**16)
# Longest a test subprocess may run.
SUBPROCESS_TIMEOUT_S = 600

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, as np.save's pickles name it


# ----------------------------------------------------------------------------- hostile files

class _Call:
    """Pickles as ``func(*args)`` (then ``__setstate__(state)`` when a state is given)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _npy(obj) -> bytes:
    """What ``np.save(path, obj, allow_pickle=True)`` writes for a pickled object (protocol 3)."""
    holder = np.empty((), dtype=object)
    holder[()] = obj
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    return header.getvalue() + pickle.dumps(holder, protocol=3)


def _array_state(shape, dtype, data) -> _Call:
    """An ndarray as numpy pickles it, with any shape, dtype and data."""
    return _Call(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, np.dtype(dtype), False, data))


KEYS = np.array([0], dtype=np.int64)
GOOD_MAPS = np.zeros((1, 2, 3), dtype=np.float16)


def _with_opcodes(opcodes: bytes) -> bytes:
    """A good CAM file with ``opcodes`` right after the pickle's PROTO opcode."""
    good = _npy({"keys": KEYS, "attn_highres": GOOD_MAPS})
    at = good.index(b"\n") + 1 + 2  # end of the .npy header, then PROTO 3
    return good[:at] + opcodes + good[at:]


# name -> (file contents, what the error line says)
HOSTILE_CAMS = {
    # numpy's own pickle layout, BUILD with a state that claims 2**48 float16s and holds 8 bytes
    "shape_2_48": (_npy({"keys": KEYS, "attn_highres": _array_state(HUGE_SHAPE, "f2", b"\0" * 8)}),
                   "65536 maps, more than MAX_CAM_CLASSES = 1024"),
    # within the class and pixel limits (1024 maps of 9000x9000 = 8.3e10 elements), 8 bytes of data
    "length_mismatch": (_npy({"keys": KEYS, "attn_highres": _array_state((1024, 9000, 9000), "f2", b"\0" * 8)}),
                        "needs 165888000000 bytes of data, the file holds 8 bytes"),
    # huge K with tiny H x W (the maps come first in the dict, so they are checked first)
    "huge_k": (_npy({"attn_highres": _array_state((2**40, 1, 1), "f2", b"\0" * 8), "keys": KEYS}),
               "1099511627776 maps, more than MAX_CAM_CLASSES = 1024"),
    # numpy.ndarray called directly: ndarray(shape, dtype) allocates the shape
    "ndarray_call": (_npy({"keys": KEYS, "attn_highres": _Call(np.ndarray, (HUGE_SHAPE, np.dtype("f2")))}),
                     "refusing to call numpy.ndarray"),
    # numpy's _reconstruct with the shape instead of (0,)
    "reconstruct_call": (_npy({"keys": KEYS, "attn_highres": _Call(_RECONSTRUCT, (np.ndarray, HUGE_SHAPE, b"b"))}),
                         "unexpected array reconstruction"),
    # an object array of 7e8 elements (numpy fills 5.6 GB with None) from an empty list
    "object_fill": (_npy({"keys": _array_state((700_000_000,), "O", []), "attn_highres": GOOD_MAPS}),
                    "a 1-d array of 700000000 elements, more keys than MAX_CAM_CLASSES = 1024"),
    # a dtype of 100 fields (numpy builds any structured dtype a string describes)
    "struct_dtype": (_npy({"keys": KEYS, "attn_highres": _Call(
        _RECONSTRUCT, (np.ndarray, (0,), b"b"),
        (1, (1,), _Call(np.dtype, ("f2," * 100, False, True)), False, b"\0" * 200))}),
        "unexpected dtype 'f2,f2,"),
    # NONE, LONG_BINPUT 0xfffffff0, POP: the unpickler sizes its memo by the index (2**33 slots)
    "memo_index": (_with_opcodes(b"N" + b"r" + struct.pack("<I", 0xFFFF_FFF0) + b"0"),
                   "memo index 4294967280 at byte"),
    # BINBYTES8 of 2**50 bytes with 3 bytes behind it: the unpickler allocates the length first
    "bytes8": (_with_opcodes(b"\x8e" + struct.pack("<Q", 2**50) + b"abc"),
               "expected 1125899906842624 bytes in a bytes8"),
}


def _write_one_colour_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit palette PNG of one colour, written row by row (PIL would hold the whole image,
    a byte per pixel, to write it): a hundred KB that decodes to ``width * height`` bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter type 0, then every pixel palette index 0
    packer = zlib.compressobj(9)
    idat = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0))
                     + chunk(b"PLTE", bytes([0, 0, 0])) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb_pngs(tmp_path_factory) -> dict[str, Path]:
    """``bomb``: 30000x30000; ``between``: 12000x12000 (both palette PNGs of one colour)."""
    folder = tmp_path_factory.mktemp("bombs")
    return {"bomb": _write_one_colour_png(folder / "bomb.png", BOMB_SIDE, BOMB_SIDE),
            "between": _write_one_colour_png(folder / "between.png", BETWEEN_SIDE, BETWEEN_SIDE)}


def test_png_writer_writes_real_pngs(tmp_path, bomb_pngs, monkeypatch):
    """The hostile PNGs are valid PNGs (a broken one would also be 'one line'), far smaller than
    their pixels, with the header sizes they claim."""
    assert Image.MAX_IMAGE_PIXELS < BETWEEN_SIDE**2 < 2 * Image.MAX_IMAGE_PIXELS < BOMB_SIDE**2
    small = _write_one_colour_png(tmp_path / "small.png", 13, 5)
    with Image.open(small) as img:
        assert img.mode == "P" and img.size == (13, 5)
        assert np.array_equal(np.asarray(img), np.zeros((5, 13), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # to read the headers of the big ones
    for name, side in (("bomb", BOMB_SIDE), ("between", BETWEEN_SIDE)):
        assert bomb_pngs[name].stat().st_size < 200_000
        with Image.open(bomb_pngs[name]) as img:
            assert img.size == (side, side) and img.mode == "P"


# ----------------------------------------------------------------------------- load_cam

@pytest.mark.parametrize("name", sorted(HOSTILE_CAMS))
def test_load_cam_refuses_hostile_files(name, tmp_path):
    data, problem = HOSTILE_CAMS[name]
    assert len(data) < 1024  # a tiny file
    path = tmp_path / f"{name}.npy"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        load_cam(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable CAM file (") and problem in message, message
    assert "\n" not in message


def test_load_cam_bounds_by_the_image_size(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(_npy({"keys": KEYS, "attn_highres": GOOD_MAPS}))
    keys, maps = load_cam(path, expected_hw=(2, 3))
    assert keys.tolist() == [0] and np.array_equal(maps, GOOD_MAPS)
    assert type(keys) is np.ndarray and type(maps) is np.ndarray  # not the checking subclass
    with pytest.raises(InputError, match=r"maps of 3x2 \(WxH\) = 6 pixels, more than the image's 2x1 = 2\)$"):
        load_cam(path, expected_hw=(1, 2))
    with pytest.raises(InputError, match="arrays of 7 elements in all, more than the 5 a CAM file may hold"):
        load_cam(path, max_elements=5)
    assert load_cam(path, max_elements=7)[1].shape == (1, 2, 3)


def test_load_cam_refuses_a_file_larger_than_the_limits_allow(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(_npy({"keys": KEYS, "attn_highres": GOOD_MAPS}))
    limit = CF.cam_limits((2, 3)).file_bytes()
    with open(path, "ab") as f:  # padding behind the pickle's STOP
        f.truncate(limit + 1)
    with pytest.raises(InputError, match=f"{limit + 1} bytes, more than the {limit} a CAM file within the limits"):
        load_cam(path, expected_hw=(2, 3))


def _as_numpy1(obj):
    """``obj`` pickled the way numpy 1.x pickles arrays: dtype(spec, 0, 1), the state alike."""
    if isinstance(obj, np.ndarray):
        _, args, (version, shape, dtype, fortran, data) = obj.__reduce__()
        if dtype.hasobject:
            data = [_as_numpy1(item) for item in data]
        _, (spec, _align, _copy), dtype_state = dtype.__reduce__()
        return _Call(_RECONSTRUCT, args, (version, shape, _Call(np.dtype, (spec, 0, 1), dtype_state), fortran, data))
    if isinstance(obj, dict):
        return {key: _as_numpy1(value) for key, value in obj.items()}
    return obj


def test_load_cam_reads_numpy1_files(tmp_path):
    """The reference's CAM files were written by numpy 1 (numpy.core.multiarray, dtype args 0, 1)."""
    maps = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    holder = np.empty((), dtype=object)
    holder[()] = {"keys": np.array([3, 1]), "attn_highres": maps}
    pickled = pickle.dumps(_as_numpy1(holder), protocol=3)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in pickled
    pickled = pickled.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    path = tmp_path / "numpy1.npy"
    path.write_bytes(header.getvalue() + pickled)
    keys, loaded = load_cam(path, expected_hw=(3, 4))
    assert keys.tolist() == [3, 1] and loaded.dtype == np.float16 and np.array_equal(loaded, maps)


# ----------------------------------------------------------------------------- one image policy

def _readers():
    """Every image reader of the toolkit: name -> (function of a path, what it calls the file)."""
    voc = get_eval_config("voc2012")
    return {
        "model input": (lambda p: images.open_image(p), "image"),
        "GT mask": (lambda p: read_gt(p, voc), "GT mask"),
        "CRF image": (read_bgr, "image"),
        "COCO-Stuff map": (datasets.stuff_labels, "COCO-Stuff map"),
    }


@pytest.mark.parametrize("reader", ["model input", "GT mask", "CRF image", "COCO-Stuff map"])
def test_every_reader_checks_the_one_pixel_limit_before_decoding(reader, tmp_path, monkeypatch):
    read, what = _readers()[reader]
    path = tmp_path / "x.png"
    Image.new("L", (40, 30)).save(path)
    assert read(path) is not None  # 1200 pixels: read
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1199)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image over the limit")

    import cv2
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(InputError) as info:
        read(path)
    assert str(info.value) == (f"{path}: {what} too large: 40x30 (WxH) = 1200 pixels, more than the limit of 1199 "
                               f"(toolkit.images.MAX_IMAGE_PIXELS)")


@pytest.mark.parametrize("reader", ["model input", "GT mask", "CRF image", "COCO-Stuff map"])
@pytest.mark.parametrize("size", ["bomb", "between"])
def test_every_reader_refuses_bombs_in_one_line(reader, size, bomb_pngs, tmp_path, recwarn):
    read, what = _readers()[reader]
    with pytest.raises(InputError) as info:
        read(bomb_pngs[size])
    message = str(info.value)
    assert message.startswith(f"{bomb_pngs[size]}: {what} too large: ") and "\n" not in message, message
    assert not recwarn.list  # PIL's warning became the error; nothing else escaped


def test_own_limit_holds_when_pil_limit_is_off(bomb_pngs, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match=f"image too large: {BOMB_SIDE}x{BOMB_SIDE} \\(WxH\\) = {BOMB_SIDE**2} "
                                         f"pixels, more than the limit of {images.MAX_IMAGE_PIXELS}"):
        read_bgr(bomb_pngs["bomb"])


def test_pixel_limit_is_pils_default():
    assert images.MAX_IMAGE_PIXELS == 89_478_485
    assert CF.MAX_CAM_ELEMENTS == CF.MAX_CAM_CLASSES * (images.MAX_IMAGE_PIXELS + 1)


# ----------------------------------------------------------------------------- command lines

_PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "status = subprocess.call(sys.argv[2:])\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(status)\n"
)


def _run_measured(tmp_path: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``argv`` from ``tmp_path``; (its result, its peak resident memory in KiB)."""
    peak_file = tmp_path / "peak_kib.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    return proc, int(peak_file.read_text())


def _hostile_voc_folder(root: Path, bomb_pngs: dict[str, Path], crf: bool) -> tuple[list[str], dict]:
    """The golden VOC folder plus one image per hostile file (a copy of a golden image with one
    file replaced). Returns (the eval arguments, {bad file: the texts its line holds})."""
    src = eh.folder("voc2012")
    cams = eh.write_cam_dir("voc2012", root / "cams")
    gt = shutil.copytree(src / "SegmentationClass", root / "gt")
    img = shutil.copytree(src / "JPEGImages", root / "img")
    model = "2007_000100"
    bad: dict[Path, tuple[str, ...]] = {}

    def copy_of_good(image_id: str) -> None:
        shutil.copy(cams / f"{model}.npy", cams / f"{image_id}.npy")
        shutil.copy(gt / f"{model}.png", gt / f"{image_id}.png")
        shutil.copy(img / f"{model}.jpg", img / f"{image_id}.jpg")

    for name, (data, problem) in HOSTILE_CAMS.items():
        copy_of_good(f"cam_{name}")
        (cams / f"cam_{name}.npy").write_bytes(data)
        bad[cams / f"cam_{name}.npy"] = ("not a readable CAM file (", problem)
    for size, png in bomb_pngs.items():
        copy_of_good(f"gt_{size}")
        shutil.copy(png, gt / f"gt_{size}.png")
        bad[gt / f"gt_{size}.png"] = ("GT mask too large: ",)
        if crf:
            copy_of_good(f"img_{size}")
            shutil.copy(png, img / f"img_{size}.jpg")  # a PNG named .jpg: readers go by the contents
            bad[img / f"img_{size}.jpg"] = ("image too large: ",)
    split = root / "split.txt"
    split.write_text((src / "split.txt").read_text() + "".join(f"{p.stem}\n" for p in bad))
    argv = ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--gt_root", str(gt), "--split_file", str(split),
            "--on_error", "skip", "--save_scores", str(root / "scores.json")]
    if crf:
        argv += ["--image_root", str(img), "--eval_only", "--jobs", "1"]
    return argv, bad


def _check_skipped(proc: subprocess.CompletedProcess, bad: dict) -> None:
    """Exit status 1 and, on stderr, the count and one line per bad file, nothing else."""
    assert proc.returncode == 1, proc.stderr
    lines = helpers.without_progress(proc.stderr)
    assert lines[0] == f"{len(bad)} image(s) failed and were skipped:", proc.stderr
    assert len(lines) == 1 + len(bad), proc.stderr
    for path, texts in bad.items():
        mine = [line for line in lines[1:] if line.startswith(f"  {path}: ")]
        assert len(mine) == 1 and all(text in mine[0] for text in texts), (path, texts, proc.stderr)


@pytest.mark.parametrize("script,kind", [("eval_cam.py", "eval_cam"), ("eval_cam_with_crf.py", "eval_crf")])
def test_eval_scripts_skip_hostile_files_within_memory(script, kind, bomb_pngs, tmp_path):
    argv, bad = _hostile_voc_folder(tmp_path, bomb_pngs, crf=kind == "eval_crf")
    proc, peak_kib = _run_measured(tmp_path, [sys.executable, str(REPO / script), *argv])
    _check_skipped(proc, bad)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["images"] == len(eh.variant_ids("voc2012"))  # every good image finished ...
    eh.compare_scores(scores, eh.expected_score("voc2012", kind), 21)  # ... with the reference's scores
    assert peak_kib < PEAK_LIMIT_KIB, f"peak memory {peak_kib} KiB"


_PREPARE_BOTH = (
    "import sys\n"
    "from pipelines.command import main\n"
    "for root in sys.argv[1:]:\n"
    "    print('status', main(['prepare', '--dataset', 'cocostuff', '--all_images', '--root', root,\n"
    "                          '--out', root + '/split.txt']))\n"
)


def test_prepare_refuses_bomb_stuff_maps_within_memory(bomb_pngs, tmp_path):
    """``tagclip prepare`` (its main) on a folder with one bomb map, then on one
    with a map between PIL's limits, in one process: one error line and status 2 each."""
    roots = []
    for size, png in bomb_pngs.items():
        (tmp_path / size / "val2017").mkdir(parents=True)
        shutil.copy(png, tmp_path / size / "val2017" / "000000000139.png")
        roots.append(str(tmp_path / size))
    proc, peak_kib = _run_measured(tmp_path, [sys.executable, "-c", _PREPARE_BOTH, *roots])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["status", "2", "status", "2"]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    for line, root in zip(lines, roots):
        assert line.startswith(f"error: {root}/val2017/000000000139.png: COCO-Stuff map too large: "), line
    assert not any(Path(root, "split.txt").exists() for root in roots)
    assert peak_kib < PEAK_LIMIT_KIB, f"peak memory {peak_kib} KiB"


# ----------------------------------------------------------------------------- nested JSON

def test_deeply_nested_coco_json_is_one_line(tmp_path, capsys):
    depth = 100_000
    (tmp_path / "annotations").mkdir()
    json_path = tmp_path / "annotations" / "instances_val2017.json"
    json_path.write_text('{"images": ' + "[" * depth + "]" * depth + ', "annotations": [], "categories": []}')
    status = datasets.main(["--dataset", "coco2017", "--root", str(tmp_path),
                            "--out", str(tmp_path / "split.txt")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: {json_path}: not valid JSON (arrays or objects nested too deeply to parse)\n"
    assert not (tmp_path / "split.txt").exists()


def test_a_label_line_longer_than_a_cam_file_holds_is_refused(tmp_path, capsys):
    """generate_cams.py never writes a CAM file its readers would refuse (MAX_CAM_CLASSES maps)."""
    from clip_es.cam_files import MAX_CAM_CLASSES
    from clip_es.cli import generate_cams_main

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    labels = tmp_path / "labels.txt"
    labels.write_text("a " + " ".join(["3"] * (MAX_CAM_CLASSES + 1)) + "\n")
    rc = generate_cams_main(["--dataset", "voc2012", "--img_root", str(tmp_path / "img"), "--split_file", str(labels),
                             "--model", "/nonexistent.pt", "--device", "cpu", "--cam_out_dir", str(tmp_path / "cams")])
    assert rc == 2
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()][-1]
    assert line == (f"error: {labels}: image a lists {MAX_CAM_CLASSES + 1} labels, more than a CAM file holds "
                    f"(MAX_CAM_CLASSES = {MAX_CAM_CLASSES})")
