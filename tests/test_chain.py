"""The whole classify -> generate_cams -> eval_cam -> eval_cam_with_crf chain from the command
line, on a synthetic VOC-layout folder (JPEGImages, SegmentationClass palette PNGs, split)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_es.cam_files import load_cam
from clip_es.masks import write_label_png

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "golden" / "tiny_clip_fp16.npz"
SIZES = [(96, 64), (64, 80), (304, 64), (48, 48)]  # (W, H); 304x64 has exactly 76 patches (Q8)


def _run(script, *args, env):
    # Run from the data folder (TAGCLIP_CACHE's parent), never from the repository.
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=Path(env["TAGCLIP_CACHE"]).parent,
                          env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("VOC2012")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        image_id = f"2012_{i:06d}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        cls = int(rng.integers(0, 20))
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = cls + 1
        gt[0, :] = 255
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", gt)  # VOC palette PNG
        lines.append(f"{image_id} {cls}\n")
    (root / "val.txt").write_text("".join(lines))
    env = dict(os.environ, TAGCLIP_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    return root, env


def test_classify_then_segment_chain(voc, tmp_path):
    root, env = voc
    out = tmp_path / "output"
    _run("classify.py", "--dataset", "voc2012", "--img_root", root / "JPEGImages", "--split_file",
         root / "val.txt", "--model_path", TINY, "--output_dir", out, "--save_file", "--device", "cpu", env=env)
    label_file = out / "voc2012_val_tagclip.txt"
    labels = {ln.split()[0]: [int(c) for c in ln.split()[1:]] for ln in label_file.read_text().splitlines()}
    assert list(labels) == [ln.split()[0] for ln in (root / "val.txt").read_text().splitlines()]

    cams = tmp_path / "cams"
    _run("generate_cams.py", "--dataset", "voc2012", "--img_root", root / "JPEGImages", "--split_file",
         label_file, "--model", TINY, "--cam_out_dir", cams, "--device", "cpu", env=env)
    for (w, h), (image_id, ids) in zip(SIZES, labels.items()):
        keys, maps = load_cam(cams / f"{image_id}.npy")
        assert keys.tolist() == ids                      # label-file order
        assert maps.dtype == np.float16 and maps.shape == (len(ids), h, w)
        assert float(maps.max()) <= 1.0 and float(maps.min()) >= 0.0

    masks = tmp_path / "pseudo"
    scores = tmp_path / "scores.json"
    stdout = _run("eval_cam.py", "--dataset", "voc2012", "--cam_out_dir", cams, "--cam_type", "attn_highres",
                  "--gt_root", root / "SegmentationClass", "--split_file", root / "val.txt",
                  "--pseudo_mask_save_path", masks, "--save_scores", scores, env=env)
    assert "mIoU" in stdout or "Mean IoU" in stdout
    # The pseudo masks are the evaluated predictions: scoring them as ground truth gives IoU 1
    # for every class they contain.
    self_scores = tmp_path / "self.json"
    _run("eval_cam.py", "--dataset", "voc2012", "--cam_out_dir", cams, "--gt_root", masks,
         "--split_file", root / "val.txt", "--save_scores", self_scores, env=env)
    assert json.loads(self_scores.read_text())["Mean IoU"] == pytest.approx(1.0)
    for (w, h), image_id in zip(SIZES, labels):
        png = Image.open(masks / f"{image_id}.png")
        assert png.mode == "P" and png.size == (w, h)
        assert set(np.unique(np.asarray(png)).tolist()) <= {0, *(c + 1 for c in labels[image_id])}

    crf_masks = tmp_path / "crf"
    crf_scores = tmp_path / "crf.json"
    _run("eval_cam_with_crf.py", "--dataset", "voc2012", "--cam_out_dir", cams, "--gt_root",
         root / "SegmentationClass", "--image_root", root / "JPEGImages", "--split_file", root / "val.txt",
         "--pseudo_mask_save_path", crf_masks, "--save_scores", crf_scores, "--jobs", "1", env=env)
    assert "Mean IoU" in json.loads(crf_scores.read_text())
    assert sorted(p.name for p in crf_masks.iterdir()) == sorted(f"{i}.png" for i in labels)
