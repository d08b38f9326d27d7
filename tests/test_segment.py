"""``tagclip segment``: a folder and a class list to palette masks, CAM files and a legend."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_es.cams import load_cam
from tagclip.cli import main

TINY = Path(__file__).parent / "fixtures" / "golden" / "tiny_clip_fp16.npz"
SIZES = {"wide": (96, 48), "tall": (48, 80), "tiny": (10, 7)}


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    pics = tmp_path / "pics"
    pics.mkdir()
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(pics / f"{name}.jpg")
    return pics


@pytest.mark.parametrize("extra", [[], ["--crf"], ["--confidence_threshold", "1.5"]])
def test_segment_folder(folder, tmp_path, extra):
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--classes", "cat,dog,sofa", "--background", "floor,wall",
                 "--model_path", str(TINY), "--device", "cpu", "--out", str(out), *extra]) == 0
    legend = json.loads((out / "classes.json").read_text())
    assert legend["labels"] == {"0": "background", "1": "cat", "2": "dog", "3": "sofa"}
    assert sorted(legend["tags"]) == sorted(SIZES)
    for name, (w, h) in SIZES.items():
        tagged = [["cat", "dog", "sofa"].index(t) for t in legend["tags"][name]]
        assert tagged, "every image gets at least its best class"
        keys, maps = load_cam(out / "cams" / f"{name}.npy")
        assert keys.tolist() == tagged and maps.shape == (len(tagged), h, w)
        assert Image.open(out / "overlays" / f"{name}.png").size[1] > 0
        mask = Image.open(out / "masks" / f"{name}.png")
        assert mask.mode == "P" and mask.size == (w, h)
        values = set(np.unique(np.asarray(mask)).tolist())
        allowed = {0, *(c + 1 for c in tagged)} | ({255} if "--confidence_threshold" in extra else set())
        assert values <= allowed
    if "--confidence_threshold" in extra:  # scores are at most 1: every pixel is uncertain
        assert all(set(np.unique(np.asarray(Image.open(out / "masks" / f"{n}.png"))).tolist()) == {255}
                   for n in SIZES)


def test_segment_needs_classes(folder, tmp_path, capsys):
    assert main(["segment", str(folder), "--model_path", str(TINY), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --classes")
