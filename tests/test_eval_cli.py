"""eval_cam.py and eval_cam_with_crf.py end to end on the golden fixture folders (VOC, COCO,
COCO-Stuff): scores equal to the reference's, pseudo-mask PNGs, determinism over --jobs and
the bad-input cases (one ``error:`` line and exit 2; ``--on_error skip`` -> report, exit 1)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import eval_helpers as eh
import helpers
import numpy as np
import pytest
from PIL import Image

from clip_es.eval_cli import eval_cam_main, eval_crf_main
from clip_es.evaluation import SegEvaluator, predict, read_gt
from clip_es.registry import get_eval_config
from toolkit.palette import voc_colormap

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cam_dirs(tmp_path_factory):
    """Golden CAM folders. The folder names deliberately mention another dataset: the class
    count must come from --dataset only (quirk Q9)."""
    root = tmp_path_factory.mktemp("cams")
    return {v: eh.write_cam_dir(v, root / f"cocostuff_coco_voc_{i}") for i, v in enumerate(eh.VARIANTS)}


def _cam_args(variant, cam_dir, *extra):
    f = eh.folder(variant)
    return ["--dataset", eh.dataset_of(variant), "--cam_out_dir", str(cam_dir),
            "--gt_root", str(f / "SegmentationClass"), "--split_file", str(f / "split.txt"), *extra]


def _crf_args(variant, cam_dir, *extra, gt=True):
    f = eh.folder(variant)
    args = ["--dataset", eh.dataset_of(variant), "--cam_out_dir", str(cam_dir),
            "--image_root", str(f / "JPEGImages"), "--split_file", str(f / "split.txt"), *extra]
    return args + (["--gt_root", str(f / "SegmentationClass")] if gt else [])


def _check_masks(mask_dir: Path, variant: str, kind: str):
    ids = eh.variant_ids(variant)
    assert sorted(p.name for p in mask_dir.iterdir()) == sorted(f"{i}.png" for i in ids)  # no temp files left
    palette = voc_colormap().ravel().tolist()
    for image_id in ids:
        with Image.open(mask_dir / f"{image_id}.png") as img:
            assert img.mode == "P"
            assert img.getpalette()[:768] == palette
            labels = np.array(img)
        with Image.open(eh.folder(variant) / "SegmentationClass" / f"{image_id}.png") as gt:
            assert labels.shape == (gt.height, gt.width)
        np.testing.assert_array_equal(labels, eh.reference_pred(variant, image_id, kind), err_msg=image_id)


def _one_error_line(err: str) -> str:
    lines = helpers.without_progress(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("variant", eh.VARIANTS)
def test_eval_cam_cli_parity_and_masks(variant, cam_dirs, tmp_path, capsys):
    config = get_eval_config(eh.dataset_of(variant))
    masks, scores = tmp_path / "masks", tmp_path / "out" / "scores.json"
    rc = eval_cam_main(_cam_args(variant, cam_dirs[variant], "--cam_type", "attn_highres",
                                 "--pseudo_mask_save_path", str(masks), "--save_scores", str(scores)))
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert f"{len(eh.variant_ids(variant))} images to eval" in out
    miou = json.loads(scores.read_text())["Mean IoU"]
    assert out.splitlines()[-1] == (f"evaluated {len(eh.variant_ids(variant))} image(s) (0 skipped): mIoU {miou:.4f}; "
                                    f"pseudo masks {masks}, scores {scores}")
    assert "eval:" in captured.err   # the progress bar
    assert ("thres:1, mIoU:" in out) == config.has_background
    assert config.class_names[1] in out and config.class_names[-1] in out
    got = json.loads(scores.read_text())
    assert got["dataset"] == config.name and got["num_classes"] == config.num_classes
    want = eh.expected_score(variant, "eval_cam")
    eh.compare_scores(got, want, config.num_classes)
    for key in ("Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    _check_masks(masks, variant, "cam")


@pytest.mark.parametrize("variant", eh.VARIANTS)
def test_eval_crf_cli_parity(variant, cam_dirs, tmp_path, capsys):
    config = get_eval_config(eh.dataset_of(variant))
    scores = tmp_path / "scores.json"
    jobs = "2" if variant == "voc2012" else "1"
    rc = eval_crf_main(_crf_args(variant, cam_dirs[variant], "--eval_only", "--jobs", jobs,
                                 "--save_scores", str(scores)))
    out = capsys.readouterr().out
    assert rc == 0 and "Mean IoU" in out
    got = json.loads(scores.read_text())
    eh.compare_scores(got, eh.expected_score(variant, "eval_crf"), config.num_classes)


def test_crf_pseudo_masks(cam_dirs, tmp_path, capsys):
    masks = tmp_path / "deep" / "masks"
    rc = eval_crf_main(_crf_args("coco2017", cam_dirs["coco2017"], "--pseudo_mask_save_path", str(masks),
                                 "--jobs", "1", gt=False))
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0 and "Mean IoU" not in out  # no GT given: masks only
    n = len(eh.variant_ids("coco2017"))
    assert out.splitlines()[-1] == f"processed {n} image(s) (0 skipped); pseudo masks {masks}"
    assert "crf:" in captured.err   # the progress bar
    _check_masks(masks, "coco2017", "crf")
    # with GT as well: masks and scores
    masks2 = tmp_path / "masks2"
    rc = eval_crf_main(_crf_args("cocostuff_gtlabels", cam_dirs["cocostuff_gtlabels"],
                                 "--pseudo_mask_save_path", str(masks2), "--jobs", "1"))
    out = capsys.readouterr().out
    assert rc == 0 and "Mean IoU" in out and "electronic" in out
    _check_masks(masks2, "cocostuff_gtlabels", "crf")


def test_crf_jobs_deterministic(cam_dirs, tmp_path, capsys):
    results = []
    for jobs in ("1", "3"):
        masks, scores = tmp_path / f"m{jobs}", tmp_path / f"s{jobs}.json"
        assert eval_crf_main(_crf_args("voc2012_gtlabels", cam_dirs["voc2012_gtlabels"], "--jobs", jobs,
                                       "--pseudo_mask_save_path", str(masks), "--save_scores", str(scores))) == 0
        results.append((scores.read_text(), {p.name: p.read_bytes() for p in sorted(masks.iterdir())}))
    capsys.readouterr()
    assert results[0] == results[1]


def test_confidence_threshold_masks(cam_dirs, tmp_path, capsys):
    plain, cut = tmp_path / "plain", tmp_path / "cut"
    for path, extra in ((plain, []), (cut, ["--confidence_threshold", "0.9"])):
        assert eval_crf_main(_crf_args("voc2012", cam_dirs["voc2012"], "--jobs", "1",
                                       "--pseudo_mask_save_path", str(path), *extra, gt=False)) == 0
        assert eval_cam_main(_cam_args("voc2012", cam_dirs["voc2012"], "--pseudo_mask_save_path",
                                       str(path / "cam"), *extra)) == 0
    capsys.readouterr()
    for sub in (".", "cam"):
        a = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted((plain / sub).glob("*.png"))])
        b = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted((cut / sub).glob("*.png"))])
        assert (b == 255).any() and not (a == 255).any()
        assert ((b == 255) | (a == b)).all()


# ----------------------------------------------------------------------------- threshold search

# Constant background thresholds (cam_eval_thres < 1) are 0.05, 0.10, ..., 0.60. One CAM pixel
# sits halfway between every two neighbours and at both ends: 0.025, 0.075, ..., 0.625 (13
# pixels; float16 moves them by < 3e-4, far less than the 0.025 margins). A pixel is class 1
# when its CAM beats the constant background (strictly; argmax takes the background on ties).
MIDPOINTS = [round(0.025 + 0.05 * k, 3) for k in range(13)]


def _cam_and_gt_folder(root: Path, cam_row, gt_row) -> list[str]:
    """One-image VOC folder: a 1xW CAM with key 0 (label 1) and a 1xW GT of 0/1."""
    for sub in ("cams", "gt"):
        (root / sub).mkdir(parents=True)
    cam = np.asarray(cam_row, np.float16)[None, None, :]
    np.save(root / "cams" / "a.npy", {"keys": np.array([0]), "attn_highres": cam})
    Image.fromarray(np.asarray(gt_row, np.uint8)[None, :]).save(root / "gt" / "a.png")
    (root / "split.txt").write_text("a 0\n")
    return ["--dataset", "voc2012", "--cam_out_dir", str(root / "cams"), "--gt_root", str(root / "gt"),
            "--split_file", str(root / "split.txt"), "--cam_eval_thres", "0.5"]


def _printed_mious(out: str) -> dict[float, float]:
    pairs = [line.split(", mIoU:") for line in out.splitlines() if line.startswith("thres:")]
    return {float(t[len("thres:"):]): float(m) for t, m in pairs}


def test_constant_threshold_search_finds_the_threshold_the_gt_was_cut_at(tmp_path, capsys):
    """GT = CAM > 0.3, so thres 0.3 reproduces it exactly (mIoU 1) and every other candidate
    misclassifies at least the pixel between it and 0.3."""
    gt = [1 if v > 0.3 else 0 for v in MIDPOINTS]  # background: 0.025..0.275 (6 px), class 1: 7 px
    scores = tmp_path / "s.json"
    assert eval_cam_main(_cam_and_gt_folder(tmp_path, MIDPOINTS, gt) + ["--save_scores", str(scores)]) == 0
    mious = _printed_mious(capsys.readouterr().out)
    assert list(mious) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
    # thres 0.3: prediction == GT -> IoU 1 for background and class 1
    assert mious[0.3] == 1.0
    # thres 0.25: the 0.275 pixel turns class 1; background 5 / 6, class 1 7 / 8
    #   mIoU = (5/6 + 7/8) / 2 = (40 + 42) / 96 = 41/48
    assert mious[0.25] == pytest.approx(41 / 48, abs=1e-12)
    # thres 0.35: the 0.325 pixel turns background; background 6 / 7, class 1 6 / 7 -> 6/7
    assert mious[0.35] == pytest.approx(6 / 7, abs=1e-12)
    # thres 0.05: only 0.025 is background: background 1 / 6, class 1 7 / 12
    #   mIoU = (1/6 + 7/12) / 2 = (2 + 7) / 24 = 3/8
    assert mious[0.05] == pytest.approx(3 / 8, abs=1e-12)
    # thres 0.6: only 0.625 is class 1: background 6 / 12, class 1 1 / 7
    #   mIoU = (1/2 + 1/7) / 2 = 9/28
    assert mious[0.6] == pytest.approx(9 / 28, abs=1e-12)
    got = json.loads(scores.read_text())
    assert got["thres"] == 0.3
    assert got["Mean IoU"] == 1.0


def test_constant_threshold_search_keeps_the_first_of_equal_best(tmp_path, capsys):
    """Without the 0.275 pixel, thres 0.25 and 0.3 both reproduce GT = CAM > 0.3 (mIoU 1):
    the first tried, 0.25, is chosen."""
    cams = [v for v in MIDPOINTS if v != 0.275]
    gt = [1 if v > 0.3 else 0 for v in cams]
    scores = tmp_path / "s.json"
    assert eval_cam_main(_cam_and_gt_folder(tmp_path, cams, gt) + ["--save_scores", str(scores)]) == 0
    mious = _printed_mious(capsys.readouterr().out)
    assert mious[0.25] == mious[0.3] == 1.0
    assert mious[0.2] < 1.0 and mious[0.35] < 1.0
    got = json.loads(scores.read_text())
    assert got["thres"] == 0.25
    assert got["Mean IoU"] == 1.0


def _synthetic_voc(root: Path, cam_value: float, gt_value: int = 1, size=(4, 6)):
    """One-image VOC-style folder: CAM with key 0 (label 1) at ``cam_value`` everywhere."""
    (root / "cams").mkdir(parents=True)
    (root / "gt").mkdir()
    (root / "img").mkdir()
    h, w = size
    np.save(root / "cams" / "a.npy", {"keys": np.array([0]), "attn_highres": np.full((1, h, w), cam_value, np.float16)})
    Image.fromarray(np.full((h, w), gt_value, np.uint8)).save(root / "gt" / "a.png")
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "img" / "a.jpg")
    (root / "split.txt").write_text("a 0\n")
    return ["--dataset", "voc2012", "--cam_out_dir", str(root / "cams"), "--gt_root", str(root / "gt"),
            "--split_file", str(root / "split.txt")]


def test_fallback_threshold_zero(tmp_path, capsys):
    """Every tried threshold gives mIoU <= 0 -> the final run uses thres 0 (constant-0 background)."""
    args = _synthetic_voc(tmp_path, 0.25, gt_value=1)
    scores = tmp_path / "s.json"
    assert eval_cam_main(args + ["--pseudo_mask_save_path", str(tmp_path / "m"), "--save_scores", str(scores)]) == 0
    out = capsys.readouterr().out
    assert "thres:1, mIoU:0.0" in out  # bg 0.75 beats 0.25 everywhere -> all background
    got = json.loads(scores.read_text())
    assert got["thres"] == 0
    assert got["Mean IoU"] == pytest.approx(1.0)  # constant-0 background: the CAM (label 1) wins
    assert (np.array(Image.open(tmp_path / "m" / "a.png")) == 1).all()  # masks follow the final run


def test_unexpected_gt_values_warn(tmp_path, capsys):
    args = _synthetic_voc(tmp_path, 0.8, gt_value=40)
    assert eval_cam_main(args) == 0
    err = capsys.readouterr().err
    assert "warning: 24 GT pixels" in err and "--dataset voc2012" in err


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def voc_copy(cam_dirs, tmp_path):
    """Writable copies of the VOC CAMs, GT and images."""
    f = eh.folder("voc2012")
    cams = shutil.copytree(cam_dirs["voc2012"], tmp_path / "cams")
    gt = shutil.copytree(f / "SegmentationClass", tmp_path / "gt")
    img = shutil.copytree(f / "JPEGImages", tmp_path / "img")
    split = tmp_path / "split.txt"
    shutil.copy(f / "split.txt", split)
    return cams, gt, img, split


def _voc_cam_argv(cams, gt, split, *extra):
    return ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--gt_root", str(gt), "--split_file", str(split),
            *extra]


def _voc_crf_argv(cams, gt, img, split, *extra):
    return _voc_cam_argv(cams, gt, split, "--image_root", str(img), "--eval_only", "--jobs", "1", *extra)


BAD = "2007_000114"


def _break(kind, cams, gt, img):
    if kind == "missing_cam":
        (cams / f"{BAD}.npy").unlink()
        return cams / f"{BAD}.npy", "CAM file not found"
    if kind == "corrupt_cam":
        (cams / f"{BAD}.npy").write_bytes(b"\x93NUMPY garbage")
        return cams / f"{BAD}.npy", "not a readable CAM file"
    if kind == "keys_outside":
        d = np.load(cams / f"{BAD}.npy", allow_pickle=True).item()
        np.save(cams / f"{BAD}.npy", {"keys": d["keys"] + 20, "attn_highres": d["attn_highres"]})
        return cams / f"{BAD}.npy", "outside the 20-class voc2012 vocabulary"
    if kind == "gt_size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(gt / f"{BAD}.png")
        return gt / f"{BAD}.png", "GT mask size 12x10 (WxH) differs from the CAM's 224x224"
    if kind == "missing_gt":
        (gt / f"{BAD}.png").unlink()
        return gt / f"{BAD}.png", "GT mask not found"
    if kind == "missing_image":
        (img / f"{BAD}.jpg").unlink()
        return img / f"{BAD}.jpg", "image not found"
    if kind == "image_size":
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img / f"{BAD}.jpg")
        return img / f"{BAD}.jpg", "image size 12x10 (WxH) differs"
    raise AssertionError(kind)


def _expected_without_bad(variant="voc2012"):
    config = get_eval_config(eh.dataset_of(variant))
    ev = SegEvaluator(config.num_classes)
    for image_id, (keys, cams) in eh.golden_cams(variant).items():
        if image_id != BAD:
            gt = read_gt(eh.folder(variant) / "SegmentationClass" / f"{image_id}.png", config)
            ev.update(predict(keys, cams, config, 1)[0], gt)
    return ev.scores()


@pytest.mark.parametrize("kind", ["missing_cam", "corrupt_cam", "keys_outside", "gt_size", "missing_gt"])
def test_eval_cam_bad_input(kind, voc_copy, tmp_path, capsys):
    cams, gt, img, split = voc_copy
    path, problem = _break(kind, cams, gt, img)
    assert eval_cam_main(_voc_cam_argv(cams, gt, split)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: ") and problem in line
    scores = tmp_path / "s.json"
    assert eval_cam_main(_voc_cam_argv(cams, gt, split, "--on_error", "skip", "--save_scores", str(scores))) == 1
    captured = capsys.readouterr()
    assert "1 image(s) failed and were skipped:" in captured.err and f"{path}: " in captured.err
    got = json.loads(scores.read_text())
    assert got["images"] == 7
    assert got["Mean IoU"] == pytest.approx(_expected_without_bad().miou, abs=1e-12)


@pytest.mark.parametrize("kind", ["missing_image", "image_size", "missing_cam", "keys_outside", "gt_size"])
def test_eval_crf_bad_input(kind, voc_copy, tmp_path, capsys):
    cams, gt, img, split = voc_copy
    path, problem = _break(kind, cams, gt, img)
    assert eval_crf_main(_voc_crf_argv(cams, gt, img, split)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: ") and problem in line
    scores = tmp_path / "s.json"
    assert eval_crf_main(_voc_crf_argv(cams, gt, img, split, "--on_error", "skip", "--save_scores", str(scores))) == 1
    captured = capsys.readouterr()
    assert "1 image(s) failed and were skipped:" in captured.err
    assert json.loads(scores.read_text())["images"] == 7


def test_usage_errors(voc_copy, tmp_path, capsys):
    cams, gt, img, split = voc_copy
    with pytest.raises(SystemExit) as info:  # --dataset is required: never guessed from a path
        eval_cam_main(["--cam_out_dir", str(cams), "--gt_root", str(gt), "--split_file", str(split)])
    assert info.value.code == 2
    capsys.readouterr()
    cases = [
        (eval_crf_main, ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--image_root", str(img),
                         "--split_file", str(split), "--eval_only"], "--gt_root: required with --eval_only"),
        (eval_crf_main, ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--image_root", str(img),
                         "--split_file", str(split)], "--pseudo_mask_save_path: required"),
        (eval_cam_main, _voc_cam_argv(tmp_path / "nope", gt, split), "CAM folder not found"),
        (eval_cam_main, _voc_cam_argv(cams, gt, tmp_path / "nope.txt"), "nope.txt: file not found"),
        (eval_cam_main, _voc_cam_argv(cams, gt, split, "--pseudo_mask_save_path", str(split)),
         "pseudo-mask folder is a file"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2
        assert message in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- root scripts

@pytest.mark.parametrize("script", ["eval_cam.py", "eval_cam_with_crf.py"])
def test_root_scripts(script, cam_dirs, tmp_path):
    variant = "cocostuff"
    if script == "eval_cam.py":
        argv = _cam_args(variant, cam_dirs[variant])
    else:
        argv = _crf_args(variant, cam_dirs[variant], "--eval_only", "--jobs", "2")
    proc = subprocess.run([sys.executable, str(REPO / script), *argv, "--save_scores", str(tmp_path / "s.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Mean IoU" in proc.stdout and "water" in proc.stdout
    kind = "eval_cam" if script == "eval_cam.py" else "eval_crf"
    eh.compare_scores(json.loads((tmp_path / "s.json").read_text()), eh.expected_score(variant, kind), 27)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """eval_cam_with_crf.py keeps its resume journal in the current folder for --eval_only
    runs: run every test from its own folder, not from the repository."""
    monkeypatch.chdir(tmp_path)
