"""Command-line tests: classify.py, ``tagclip tag`` and ``tagclip demo`` (SPEC §4, §8).

Runs use the tiny random checkpoint in tests/fixtures/golden (OpenAI key names, float16) and
images the tests draw themselves. Every run points TAGCLIP_CACHE (model SHA256 memo and text
feature cache) into pytest's temporary folders, so no real cache is read or written.

Most runs are real subprocesses (exit status, stdout/stderr as a user sees them). The many
bad-input cases run in-process through ``classify_main`` to keep the file fast; one of them
is repeated as a subprocess to check the process-level contract.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip import loading
from pipelines.command import main
from tagclip.cli import classify_main
from tagclip.labels import label_file_lines, labels_to_onehot
from tagclip.metrics import f1_overall, format_metrics, mean_average_precision
from tagclip.text_features import default_text_cache_dir
from toolkit.errors import InputError
from toolkit.images import iter_image_files
from toolkit.splits import read_split
from toolkit.vocab import VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent
CLASSIFY = REPO / "classify.py"
TINY = Path(__file__).resolve().parent / "fixtures" / "golden" / "tiny_clip_fp16.npz"
SAMPLES = REPO / "pipelines" / "samples"
VOC_LABEL_FILE = "voc2007_val_tagclip.txt"
CUSTOM_LABEL_FILE = "custom_val_tagclip.txt"
SUBPROCESS_TIMEOUT_S = 240

MAP_LINE = re.compile(r"^mAP: \d+\.\d{6}$", re.M)
F1_LINE = re.compile(r"^F1: (\d+\.\d{6}|nan), Precision: \d+\.\d{6}, Recall: \d+\.\d{6}$", re.M)

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One TAGCLIP_CACHE for the module, so each vocabulary's text features are encoded once."""
    return tmp_path_factory.mktemp("tagclip-cache")


@pytest.fixture(autouse=True)
def _in_process_isolation(shared_cache, tmp_path, monkeypatch):
    """In-process runs: cache in tmp, one torch thread (the box is shared)."""
    monkeypatch.setenv("TAGCLIP_CACHE", str(shared_cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args, *, cwd: Path, cache: Path, entry=None) -> subprocess.CompletedProcess:
    """Run ``classify.py ARGS`` (or ``python -m ENTRY ARGS``) in a fresh interpreter."""
    env = dict(os.environ)
    env.update(
        TAGCLIP_CACHE=str(cache),
        XDG_CACHE_HOME=str(cwd / "xdg-cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    head = [sys.executable, str(CLASSIFY)] if entry is None else [sys.executable, "-m", entry]
    return subprocess.run([*head, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)


def run_in_process(fn, argv, capsys) -> tuple[int, str, str]:
    rc = fn([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def noise_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth-ish random picture (a blocky colour field plus noise) in mode RGB or L."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("L") if mode == "L" else img


def read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    ids = [r[0] for r in body]
    values = np.array([[float(v) for v in r[1:]] for r in body], dtype=np.float64)
    return header, ids, values.reshape(len(body), len(header) - 1)


def check_label_file(path: Path, ids, num_classes: int) -> list[list[int]]:
    """The label file has one line per id, in order, each with >= 1 ascending in-range label."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines] == list(ids)
    labels = []
    for line in lines:
        assert line == line.strip() and "  " not in line, repr(line)
        cls = [int(tok) for tok in line.split()[1:]]
        assert cls, f"no label on line {line!r}"
        assert cls == sorted(set(cls)), line
        assert all(0 <= c < num_classes for c in cls), line
        labels.append(cls)
    return labels


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_input_error(rc: int, err: str, offending: str, out_dir: Path) -> None:
    """Exit 2, a final ``error: ...`` line naming the file, no traceback, no output written.

    Only the resume journal of finished rows (``.<label file>.journal``) may stay behind.
    """
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith("error: "), err
    assert offending in line, (offending, line)
    leftovers = sorted(p.name for p in out_dir.rglob("*")) if out_dir.exists() else []
    assert set(leftovers) <= {f".{VOC_LABEL_FILE}.journal"}, leftovers


# VOC-layout data set for the split-mode runs: (id, size, mode, labels); split order != id order.
VOC_IMAGES = [
    ("000012", (80, 60), "L", (6, 14)),        # grayscale JPEG
    ("000005", (64, 48), "RGB", (8, 14)),
    ("000019", (32, 96), "RGB", ()),           # an id without labels is allowed
    ("000007", (96, 64), "RGB", (6,)),
    ("000016", (304, 64), "RGB", (1, 14)),     # 19 x 4 = 76 patches (SPEC Q8)
    ("000009", (48, 48), "RGB", (12, 14)),
    ("000017", (10, 7), "RGB", (14,)),          # smaller than one patch
]


def make_voc(root: Path, images=VOC_IMAGES, split_name: str = "test_cls.txt") -> tuple[Path, Path]:
    """``root/VOC2007/JPEGImages/{id}.jpg`` plus a split file; returns (img_root, split)."""
    img_root = root / "VOC2007" / "JPEGImages"
    img_root.mkdir(parents=True)
    for k, (image_id, (w, h), mode, _) in enumerate(images):
        noise_image(w, h, mode, seed=k).save(img_root / f"{image_id}.jpg", quality=90)
    split = root / "VOC2007" / split_name
    split.write_text("".join(" ".join([i, *map(str, lab)]) + "\n" for i, _, _, lab in images))
    return img_root, split


def expected_metrics(split: Path, ids, scores: np.ndarray) -> str:
    entries = {e.id: e for e in read_split(split, num_classes=len(VOC_CLASSES))}
    onehot = labels_to_onehot([entries[i] for i in ids], len(VOC_CLASSES))
    s = torch.from_numpy(scores)
    return format_metrics(mean_average_precision(s, onehot), *f1_overall(s, onehot, 0.5))


def cache_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------- 1. split mode


def test_voc_split_end_to_end(tmp_path, monkeypatch):
    img_root, split = make_voc(tmp_path)
    ids = [i for i, *_ in VOC_IMAGES]
    cache = tmp_path / "fresh-cache"  # own cache: the text features must be written by run 1
    monkeypatch.setenv("TAGCLIP_CACHE", str(cache))
    text_dir = default_text_cache_dir()
    assert text_dir == cache / "text"
    common = ["--dataset", "voc2007", "--img_root", img_root.relative_to(tmp_path),
              "--split_file", split.relative_to(tmp_path), "--model_path", TINY, "--device", "cpu"]

    first = run_cli([*common, "--output_dir", "out", "--scores_out", "s.csv"], cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stderr
    stdout = first.stdout
    for line in ("num_classes_dataset: 20", "num_classes_all: 45", f"num_images: {len(ids)}"):
        assert re.search(rf"^{line}$", stdout, re.M), stdout
    assert MAP_LINE.search(stdout) and F1_LINE.search(stdout), stdout

    label_path = tmp_path / "out" / VOC_LABEL_FILE
    check_label_file(label_path, ids, 20)
    header, csv_ids, csv_scores = read_csv(tmp_path / "s.csv")
    assert header == ["id", *VOC_CLASSES]
    assert csv_ids == ids
    assert np.isfinite(csv_scores).all()

    cached = cache_snapshot(text_dir)
    assert cached and all(name.endswith(".npy") for name in cached), cached

    second = run_cli([*common, "--output_dir", "out2", "--scores_out", "s.npy"], cwd=tmp_path, cache=cache)
    assert second.returncode == 0, second.stderr
    assert cache_snapshot(text_dir) == cached  # reused, not recomputed and rewritten
    npy = np.load(tmp_path / "s.npy", allow_pickle=False)
    assert npy.dtype == np.float32 and npy.shape == (len(ids), 20)
    # Bit-for-bit equality of a fresh and a cached run: test_text_cache_hit_gives_identical_scores.
    np.testing.assert_allclose(npy, csv_scores, rtol=0, atol=1e-6)
    written = label_path.read_text(encoding="utf-8")
    assert (tmp_path / "out2" / VOC_LABEL_FILE).read_text(encoding="utf-8") == written

    # The label file and the metrics follow from the scores alone (SPEC §4).
    recomputed = label_file_lines(ids, torch.from_numpy(npy), 0.5)
    assert "".join(ln + "\n" for ln in recomputed) == written
    block = expected_metrics(split, ids, npy)
    assert block in stdout and block in second.stdout


def test_text_cache_hit_gives_identical_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "fresh-cache"))
    img_root, split = make_voc(tmp_path, VOC_IMAGES[:2])
    results = []
    for run in ("fresh", "cached"):
        npy = tmp_path / f"{run}.npy"
        rc, _, err = run_in_process(classify_main, [
            "--img_root", img_root, "--split_file", split, "--model_path", TINY, "--device", "cpu",
            "--output_dir", tmp_path / run, "--scores_out", npy], capsys)
        assert rc == 0, err
        results.append(np.load(npy))
    assert len(list((tmp_path / "fresh-cache" / "text").glob("*.npy"))) == 1
    assert np.array_equal(results[0], results[1]), np.abs(results[0] - results[1]).max()


# ----------------------------------------------------------------------------- 2 + 6. folder mode


def make_unusual_images(folder: Path) -> list[str]:
    """Valid but unusual files; returns their ids in sorted order."""
    folder.mkdir(parents=True)
    noise_image(40, 30, "L", seed=1).save(folder / "gray.jpg")
    noise_image(50, 40, seed=2).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = noise_image(33, 21, seed=3).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 33, dtype=np.uint8), (21, 1))))
    rgba.save(folder / "rgba.png")
    noise_image(45, 45, seed=4).quantize(16).save(folder / "palette.png", transparency=0)
    deep = (np.random.default_rng(5).integers(0, 65536, size=(24, 36))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    noise_image(10, 7, seed=6).save(folder / "tiny10x7.png")
    noise_image(304, 64, seed=7).save(folder / "wide304x64.jpg")
    (folder / "notes.txt").write_text("not an image\n")  # ignored: not an image extension
    with Image.open(folder / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(folder / "deep16.png") as im:
        assert im.mode.startswith("I")
    with Image.open(folder / "palette.png") as im:
        assert im.mode == "P"
    return sorted(["gray", "cmyk", "rgba", "palette", "deep16", "tiny10x7", "wide304x64"])


def test_folder_mode_tags_every_image_including_unusual_ones(tmp_path, shared_cache):
    ids = make_unusual_images(tmp_path / "pics")
    res = run_cli(["--img_root", "pics", "--model_path", TINY, "--device", "cpu",
                   "--output_dir", "out", "--scores_out", "s.npy"], cwd=tmp_path, cache=shared_cache)
    assert res.returncode == 0, res.stderr
    assert f"num_images: {len(ids)}" in res.stdout
    assert "mAP" not in res.stdout and "F1" not in res.stdout  # no labels, no metrics
    check_label_file(tmp_path / "out" / VOC_LABEL_FILE, ids, 20)
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (len(ids), 20) and np.isfinite(scores).all()


def test_open_vocabulary_inline_and_from_file(tmp_path, shared_cache, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k, (w, h) in enumerate([(64, 48), (48, 64), (32, 32)]):
        noise_image(w, h, seed=10 + k).save(pics / f"img{k}.jpg")
    ids = ["img0", "img1", "img2"]

    res = run_cli(["--img_root", pics, "--classes", "cat,dog,sofa", "--background", "floor,wall",
                   "--model_path", TINY, "--device", "cpu", "--output_dir", "out", "--scores_out", "s.csv"],
                  cwd=tmp_path, cache=shared_cache)
    assert res.returncode == 0, res.stderr
    assert "num_classes_dataset: 3" in res.stdout and "num_classes_all: 5" in res.stdout
    check_label_file(tmp_path / "out" / CUSTOM_LABEL_FILE, ids, 3)
    header, csv_ids, csv_scores = read_csv(tmp_path / "s.csv")
    assert header == ["id", "cat", "dog", "sofa"] and csv_ids == ids

    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\n\nsofa\n")
    rc, out, err = run_in_process(classify_main, [
        "--img_root", pics, "--classes", words, "--background", "floor,wall", "--model_path", TINY,
        "--device", "cpu", "--output_dir", tmp_path / "out2", "--scores_out", tmp_path / "s2.npy"], capsys)
    assert rc == 0, err
    assert "num_classes_dataset: 3" in out and "num_classes_all: 5" in out
    check_label_file(tmp_path / "out2" / CUSTOM_LABEL_FILE, ids, 3)
    np.testing.assert_allclose(np.load(tmp_path / "s2.npy"), csv_scores, rtol=0, atol=1e-6)


def _tag_folder(tmp_path: Path) -> Path:
    pics = tmp_path / "pics"
    pics.mkdir()
    noise_image(48, 32, seed=20).save(pics / "b.jpg")
    noise_image(32, 48, seed=21).save(pics / "a.png")
    return pics


def test_tag_subcommand(tmp_path, capsys):
    pics = _tag_folder(tmp_path)
    assert 'tagclip = "pipelines.command:main"' in (REPO / "pyproject.toml").read_text()
    rc, out, err = run_in_process(main, [
        "tag", pics, "--classes", "cat,dog", "--model_path", TINY, "--device", "cpu",
        "--output_dir", tmp_path / "out", "--scores_out", tmp_path / "x.csv"], capsys)
    assert rc == 0, err
    header, ids, scores = read_csv(tmp_path / "x.csv")
    assert header == ["id", "cat", "dog"] and ids == ["a", "b"]
    check_label_file(tmp_path / "out" / CUSTOM_LABEL_FILE, ["a", "b"], 2)


def test_tag_subcommand_via_python_m(tmp_path, shared_cache):
    pics = _tag_folder(tmp_path)
    res = run_cli(["tag", pics, "--classes", "cat,dog", "--model_path", TINY, "--device", "cpu",
                   "--output_dir", "out", "--scores_out", "x.csv"],
                  cwd=tmp_path, cache=shared_cache, entry="pipelines")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x.csv").is_file(), (res.stdout, res.stderr)


# ----------------------------------------------------------------------------- 3. bad input


def _random_bytes(n: int, seed: int) -> bytes:
    return b"\x13junk" + np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _setup_bad(case: str, tmp: Path) -> tuple[list, str]:
    """Build the inputs for one bad-input case; returns (extra argv, text naming the culprit)."""
    good = [("000001", (48, 32), "RGB", (14,)), ("000002", (32, 48), "RGB", (6, 7))]
    img_root, split = make_voc(tmp, good)
    model, extra = str(TINY), []
    if case == "missing_image":
        split.write_text("000001 14\n000003 7\n000002 6 7\n")
        culprit = str(img_root / "000003.jpg")
    elif case == "corrupt_image":
        (img_root / "000002.jpg").write_bytes(_random_bytes(2000, 1))
        culprit = str(img_root / "000002.jpg")
    elif case == "zero_byte_image":
        (img_root / "000002.jpg").write_bytes(b"")
        culprit = str(img_root / "000002.jpg")
    elif case == "empty_split":
        split.write_text("")
        culprit = str(split)
    elif case == "malformed_split":
        split.write_text("000001 14\n000002 6 seven\n")
        culprit = str(split)
    elif case == "label_outside_vocabulary":
        split.write_text("000001 14\n000002 25\n")
        culprit = str(split)
    elif case == "missing_checkpoint":
        model = culprit = str(tmp / "no_such_checkpoint.npz")
    elif case == "corrupt_checkpoint":
        model = culprit = str(tmp / "corrupt.npz")
        Path(model).write_bytes(_random_bytes(4096, 2))
    elif case == "truncated_checkpoint":
        model = culprit = str(tmp / "truncated.npz")
        data = TINY.read_bytes()
        Path(model).write_bytes(data[: len(data) // 2])
    elif case == "unknown_model_name":
        model = culprit = "ViT-Q/99"
    elif case == "duplicate_class_name":
        extra, culprit = ["--classes", "cat,dog,cat"], "cat,dog,cat"
    elif case == "background_word_is_a_class":
        extra, culprit = ["--classes", "cat,dog", "--background", "sky,dog"], "'dog' is also a class name"
    elif case == "duplicate_class_name_in_file":
        names = tmp / "names.txt"
        names.write_text("cat\ndog\ncat\n")
        extra, culprit = ["--classes", str(names)], str(names)
    elif case == "bogus_device":
        extra, culprit = ["--device", "bogus"], "bogus"
    elif case == "cuda_without_a_gpu":  # this machine has none (CI and development both)
        assert not torch.cuda.is_available()
        extra, culprit = ["--device", "cuda"], "no CUDA device"
    else:
        raise AssertionError(case)
    argv = ["--dataset", "voc2007", "--img_root", img_root, "--split_file", split, "--model_path", model,
            "--device", "cpu", "--output_dir", tmp / "out", "--scores_out", tmp / "out" / "s.npy", *extra]
    return argv, culprit


BAD_CASES = ["missing_image", "corrupt_image", "zero_byte_image", "empty_split", "malformed_split",
             "label_outside_vocabulary", "missing_checkpoint", "corrupt_checkpoint",
             "truncated_checkpoint", "unknown_model_name", "duplicate_class_name",
             "background_word_is_a_class", "duplicate_class_name_in_file", "bogus_device", "cuda_without_a_gpu"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_stops_with_one_error_line(case, tmp_path, capsys):
    argv, culprit = _setup_bad(case, tmp_path)
    rc, out, err = run_in_process(classify_main, argv, capsys)
    assert_input_error(rc, err, culprit, tmp_path / "out")
    if case == "malformed_split":
        assert "line 2" in last_line(err)
    if case == "duplicate_class_name":
        assert "'cat'" in last_line(err)


@pytest.mark.parametrize("flag,value,problem", [
    ("--batch_size", "0", "must be at least 1, got 0"),
    ("--workers", "-1", "must be at least 0, got -1"),
    ("--max_side", "1", "must be at least 16, got 1"),
    ("--batch_size", "two", "not an integer: 'two'"),
])
def test_bad_option_values_are_usage_errors(flag, value, problem, tmp_path, capsys):
    img_root, split = make_voc(tmp_path, VOC_IMAGES[:1])
    with pytest.raises(SystemExit) as info:
        classify_main(["--img_root", str(img_root), "--split_file", str(split), "--model_path", str(TINY),
                       "--output_dir", str(tmp_path / "out"), flag, value])
    assert info.value.code == 2
    line = last_line(capsys.readouterr().err)
    assert f"argument {flag}: {problem}" in line
    assert not (tmp_path / "out").exists()


def test_a_bug_is_an_internal_error_with_its_traceback(tmp_path, capsys, monkeypatch):
    """Not bad input: the traceback stays, one line says it is a bug, exit status 70 (neither
    1, 'done with skips', nor 2, 'bad input'); a ValueError is no exception to that."""
    import tagclip.cli as cli
    from toolkit.errors import EXIT_INTERNAL_ERROR

    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(cli, "label_file_lines", broken)
    img_root, split = make_voc(tmp_path, VOC_IMAGES[:2])
    rc, out, err = run_in_process(classify_main, ["--img_root", img_root, "--split_file", split, "--model_path",
                                                  TINY, "--device", "cpu", "--output_dir", tmp_path / "out"], capsys)
    assert rc == EXIT_INTERNAL_ERROR == 70
    assert "Traceback" in err and "ValueError: an internal inconsistency" in err
    assert last_line(err).startswith("internal error:") and "bug" in last_line(err)


def test_bad_input_exit_status_of_the_process(tmp_path, shared_cache):
    argv, culprit = _setup_bad("corrupt_image", tmp_path)
    res = run_cli(argv, cwd=tmp_path, cache=shared_cache)
    assert_input_error(res.returncode, res.stderr, culprit, tmp_path / "out")


def test_on_error_skip_reports_failures_and_keeps_good_images(tmp_path, shared_cache):
    images = [("000001", (48, 32), "RGB", (14,)), ("000002", (64, 48), "RGB", (6, 14)),
              ("000003", (32, 48), "RGB", (7,)), ("000004", (48, 48), "L", (8, 17)),
              ("000005", (80, 48), "RGB", (6,)), ("000006", (40, 40), "RGB", (11, 14)),
              ("000007", (64, 32), "RGB", (0,))]
    img_root, split = make_voc(tmp_path, images)
    (img_root / "000003.jpg").write_bytes(_random_bytes(3000, 3))
    (img_root / "000006.jpg").write_bytes(b"")
    good = ["000001", "000002", "000004", "000005", "000007"]

    res = run_cli(["--img_root", img_root, "--split_file", split, "--model_path", TINY, "--device", "cpu",
                   "--on_error", "skip", "--output_dir", "out", "--scores_out", "s.npy"],
                  cwd=tmp_path, cache=shared_cache)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(img_root / "000003.jpg") in res.stderr and str(img_root / "000006.jpg") in res.stderr
    assert "2 image(s) failed" in res.stderr
    check_label_file(tmp_path / "out" / VOC_LABEL_FILE, good, 20)
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (len(good), 20) and np.isfinite(scores).all()
    assert expected_metrics(split, good, scores) in res.stdout


# ----------------------------------------------------------------------------- 4. checksum


def test_named_model_with_wrong_checksum_and_no_network(tmp_path, monkeypatch):
    target = tmp_path / "ViT-B-16.pt"
    target.write_bytes(b"this is not the ViT-B/16 checkpoint")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(InputError) as info:
        loading.resolve_checkpoint("ViT-B/16", cache_dir=tmp_path)
    message = str(info.value)
    assert info.value.path == str(target)
    assert str(target) in message
    assert "could not be downloaded" in message and "place it at this path" in message
    assert not (tmp_path / "ViT-B-16.pt.part").exists()


# ----------------------------------------------------------------------------- 5. demo


def test_demo_prints_every_sample_under_both_vocabularies(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))  # text features computed, not cached
    samples = [name for _, name in iter_image_files(SAMPLES)]
    assert len(samples) == 4, samples  # astronaut, cat, coffee, rocket
    rc, out, err = run_in_process(main, ["demo", "--model_path", TINY, "--device", "cpu"], capsys)
    assert rc == 0, err
    voc_at, coco_at = out.find("voc2007 vocabulary"), out.find("coco2014 vocabulary")
    assert 0 <= voc_at < coco_at, out
    *body, summary = out.splitlines()
    assert summary == f"tagged 4 image(s) from {SAMPLES} with the voc2007 and coco2014 vocabularies on cpu"
    body = "\n".join(body)
    for section in (body[voc_at:coco_at], body[coco_at:]):
        listed = [ln.split()[0] for ln in section.splitlines()[1:] if ln.strip()]
        assert listed == samples, section
    assert "text (" in err   # progress while the vocabularies' text features are computed


def _all_parsers():
    from clip_es.cli import generate_cams_parser
    from clip_es.eval_cli import eval_cam_parser, eval_crf_parser
    from pipelines import command, datasets
    from tagclip.cli import classify_parser

    top = command.parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"classify.py": classify_parser(), "generate_cams.py": generate_cams_parser(),
            "eval_cam.py": eval_cam_parser(), "eval_cam_with_crf.py": eval_crf_parser(),
            "tagclip tag": subs["tag"], "tagclip segment": subs["segment"], "tagclip demo": subs["demo"],
            "tagclip prepare": datasets.build_parser()}


def test_every_help_shows_every_default():
    """--help of every command: each option that takes a value says its default."""
    for name, parser in _all_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and action.default is not argparse.SUPPRESS \
                    and not action.required:
                text = formatter._expand_help(action) if action.help else ""
                assert "default" in text, (name, action.option_strings, text)


def test_one_spelling_per_concept_with_the_papers_as_aliases():
    parsers = _all_parsers()
    for name in ("classify.py", "generate_cams.py", "eval_cam.py", "eval_cam_with_crf.py"):
        assert "--img_root" in parsers[name]._option_string_actions, name
    for name in ("classify.py", "generate_cams.py", "tagclip tag", "tagclip segment", "tagclip demo"):
        assert "--model_path" in parsers[name]._option_string_actions, name
    for name in ("classify.py", "tagclip tag"):
        assert "--output_dir" in parsers[name]._option_string_actions, name
    # the authors' spellings still work
    assert parsers["generate_cams.py"]._option_string_actions["--model"].dest == "model_path"
    assert parsers["eval_cam_with_crf.py"]._option_string_actions["--image_root"].dest == "image_root"
    # a command without split files does not speak of them
    assert "split" not in parsers["tagclip tag"].format_help().replace("--split", "")


def test_classes_that_look_like_a_missing_file_are_an_error(tmp_path, capsys):
    pics = _tag_folder(tmp_path)
    for value in ("my_classes.txt", "lists/classes", "CLASSES.TXT"):
        rc, out, err = run_in_process(main, ["tag", pics, "--classes", value, "--model_path", TINY, "--device",
                                             "cpu", "--output_dir", tmp_path / "out"], capsys)
        assert rc == 2, (value, err)
        assert last_line(err) == f"error: {value}: no such word list file (a value with a '/' or a .txt suffix " \
                                 "is read as a file; give class names as a comma list, e.g. 'cat,dog')"
        assert not (tmp_path / "out").exists()
    (tmp_path / "my_classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    rc, out, err = run_in_process(main, ["tag", pics, "--classes", tmp_path / "my_classes.txt", "--model_path",
                                         TINY, "--device", "cpu", "--output_dir", tmp_path / "out"], capsys)
    assert rc == 0, err


def test_tag_prints_each_images_tags_best_first_and_a_summary(tmp_path, capsys):
    pics = _tag_folder(tmp_path)
    argv = ["tag", pics, "--classes", "cat,dog,sofa", "--model_path", TINY, "--device", "cpu",
            "--output_dir", tmp_path / "out", "--scores_out", tmp_path / "s.csv"]
    rc, out, err = run_in_process(main, argv, capsys)
    assert rc == 0, err
    header, ids, scores = read_csv(tmp_path / "s.csv")
    labels = {line.split()[0]: [int(c) for c in line.split()[1:]]
              for line in (tmp_path / "out" / CUSTOM_LABEL_FILE).read_text().splitlines()}
    for image_id, row in zip(ids, scores):
        tags = sorted(labels[image_id], key=lambda c: -row[c])
        expected = f"{image_id}: " + ", ".join(f"{header[1 + c]} {row[c]:.3f}" for c in tags)
        assert expected in out.splitlines(), (expected, out)
    assert out.splitlines()[-1] == (f"tagged 2 of 2 image(s) (0 skipped): labels {tmp_path / 'out' / CUSTOM_LABEL_FILE}"
                                    f", scores {tmp_path / 's.csv'}")
    assert "classify:" in err and "text (" in err   # progress bars on stderr
    rc, quiet, err = run_in_process(main, argv + ["--quiet"], capsys)
    assert rc == 0 and not any(line.startswith(("a: ", "b: ")) for line in quiet.splitlines())
    assert "resuming" not in err   # a finished run leaves no journal behind
