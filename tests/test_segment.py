"""``tagclip segment``: a folder and a class list to palette masks, CAM files and a legend."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_es.cam_files import load_cam
from pipelines.command import main

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
    # both index bases: label and score files count from 0, mask values from 1 (0: background)
    assert legend["class_index"] == {"cat": 0, "dog": 1, "sofa": 2}
    assert legend["mask_value"] == {"cat": 1, "dog": 2, "sofa": 3}
    assert legend["ignore_value"] == 255 and legend["crf"] == ("--crf" in extra)
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


# ----------------------------------------------------------------------------- every flag counts

def _outputs(out: Path) -> dict:
    """What a segment run leaves: legend and tags, mask pixels, CAM arrays."""
    masks = {p.stem: np.asarray(Image.open(p)).copy() for p in sorted((out / "masks").glob("*.png"))}
    cams = {p.stem: load_cam(p) for p in sorted((out / "cams").glob("*.npy"))}
    return {"legend": json.loads((out / "classes.json").read_text()), "masks": masks, "cams": cams}


def _differs(a: dict, b: dict) -> bool:
    if a["legend"] != b["legend"] or a["masks"].keys() != b["masks"].keys():
        return True
    if any(not np.array_equal(a["masks"][k], b["masks"][k]) for k in a["masks"]):
        return True
    return any(not (np.array_equal(a["cams"][k][0], b["cams"][k][0]) and np.array_equal(a["cams"][k][1], b["cams"][k][1]))
               for k in a["cams"])


def _flag_cases(tmp_path: Path, folder: Path):
    """flag -> (extra argv, check(baseline outputs, rc, outputs, stderr, calls)), one per accepted option."""
    other_ckpt = tmp_path / "other.pt"
    import helpers
    import torch
    torch.save(helpers.random_state_dict(seed=11), other_ckpt)
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(big / "b.jpg")
    code_target = tmp_path / "written-by-archive-code"
    code_ckpt = _code_archive(tmp_path / "tiny_with_code.pt", code_target)
    assert _load_runs(code_ckpt, tmp_path) and not code_target.exists()  # as data: same weights, no code run
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("wide", "tall"):
        (broken / f"{name}.jpg").write_bytes((folder / f"{name}.jpg").read_bytes())
    (broken / "zzz.jpg").write_bytes(b"not a jpeg at all")
    return {
        "--classes": (["--classes", "cat,dog"], lambda base, rc, got, err, calls: got["legend"] != base["legend"]),
        "--background": (["--background", "floor,wall"],
                         lambda base, rc, got, err, calls: _differs(base, got)),
        "--out": (["--out", str(tmp_path / "elsewhere")],
                  lambda base, rc, got, err, calls: (tmp_path / "elsewhere" / "classes.json").is_file()),
        "--crf": (["--crf"], lambda base, rc, got, err, calls: _differs(base, got)),
        "--confidence_threshold": (["--confidence_threshold", "1.5"],
                                   lambda base, rc, got, err, calls: all((m == 255).all() for m in got["masks"].values())),
        "--scores_out": (["--scores_out", str(tmp_path / "s.json")],
                         lambda base, rc, got, err, calls: sorted(json.loads((tmp_path / "s.json").read_text()))
                         == sorted(SIZES)),
        "--model_path": (["--model_path", str(other_ckpt)], lambda base, rc, got, err, calls: _differs(base, got)),
        "--device": (["--device", "bogus"], lambda base, rc, got, err, calls: rc == 2 and "bogus" in err),
        # on a CPU without native bf16 (the test stubs the flag reader to one): refused, one line ...
        "--precision": (["--precision", "bf16"],
                        lambda base, rc, got, err, calls: rc == 2 and err.count("\n") == 1 and "slower" in err),
        # ... run when confirmed, with a warning, in bf16
        "--allow_slow_precision": (["--precision", "bf16", "--allow_slow_precision"],
                                   lambda base, rc, got, err, calls: rc == 0 and "warning: --precision bf16" in err
                                   and _differs(base, got)),
        "--batch_size": (["--batch_size", "1"],
                         lambda base, rc, got, err, calls: calls == [1, 1, 1] and not _differs(base, got)),
        "--on_error": (["--on_error", "skip", str(broken)],
                       lambda base, rc, got, err, calls: rc == 1 and "zzz.jpg" in err and sorted(got["masks"]) == ["tall", "wide"]),
        "--max_side": (["--max_side", "32", str(big)],
                       lambda base, rc, got, err, calls: got["cams"]["b"][1].shape[1:] == (96, 160)
                       and not np.array_equal(got["cams"]["b"][1], _baseline_of(big, tmp_path)["cams"]["b"][1])),
        "--model_cache": (["--model_cache", str(tmp_path / "mc")],
                          lambda base, rc, got, err, calls: (tmp_path / "mc" / "sha256-memo.json").is_file()),
        "--no_text_cache": (["--no_text_cache"],
                            lambda base, rc, got, err, calls: not any((tmp_path / "nc" / "text").glob("*"))),
        # The archive's code runs only with the flag (it writes a file); without it the same
        # weights load as data (the baseline run below, same outputs, no file).
        # GELU instead of the assumed QuickGELU (the tiny checkpoint has no config beside it)
        "--arch": (["--arch", "ViT-B-16"], lambda base, rc, got, err, calls: _differs(base, got)),
        "--refine_layers": (["--refine_layers", "2-5"], lambda base, rc, got, err, calls: _differs(base, got)),
        "--affinity_layers": (["--affinity_layers", "0,1"], lambda base, rc, got, err, calls: _differs(base, got)),
        "--allow_checkpoint_code": (["--allow_checkpoint_code", "--model_path", str(code_ckpt)],
                                    lambda base, rc, got, err, calls: code_target.exists() and not _differs(base, got)),
    }


def _code_archive(path: Path, target: Path) -> Path:
    """The tiny golden weights in a TorchScript archive whose code writes ``target`` on loading."""
    import numpy as np_
    import torch
    from test_checkpoint_safety import FileWriter, _save_scripted, _tree

    with np_.load(TINY) as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    return _save_scripted(_tree(state, FileWriter(str(target))), path)


def _load_runs(ckpt: Path, tmp_path: Path) -> bool:
    import clip
    return clip.load_clip(str(ckpt), cache_dir=tmp_path / "mc_probe") is not None


def _argv(folder: Path, out: Path, extra) -> list[str]:
    positional = [a for a in extra if not a.startswith("-") and Path(a).is_dir()]
    extra = [a for a in extra if a not in positional]
    return ["segment", str(positional[0] if positional else folder), "--classes", "cat,dog,sofa",
            "--model_path", str(TINY), "--device", "cpu", "--out", str(out), *extra]


def _baseline_of(folder: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"baseline_{folder.name}"
    if not out.exists():
        assert main(_argv(folder, out, [])) == 0
    return _outputs(out)


def test_every_accepted_segment_flag_changes_something(folder, tmp_path, monkeypatch, capsys):
    import argparse

    from pipelines.segment import add_segment_arguments
    from tagclip.tagger import Tagger
    from toolkit import precision

    parser = argparse.ArgumentParser()
    add_segment_arguments(parser)
    accepted = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    cases = _flag_cases(tmp_path, folder)
    assert accepted == set(cases), "a flag without a case here, or a case for a flag it no longer takes"
    for refused in ("--output_dir", "--vis_dir", "--workers", "--exif_transpose"):
        assert refused not in accepted

    calls: list[int] = []
    scores = Tagger.scores

    def counting(self, images):
        calls.append(len(images))
        return scores(self, images)

    monkeypatch.setattr(Tagger, "scores", counting)
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    base = _baseline_of(folder, tmp_path)
    for flag, (extra, check) in cases.items():
        calls.clear()
        out = tmp_path / f"run{flag}"
        if flag == "--no_text_cache":
            monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "nc"))
        capsys.readouterr()
        rc = main(_argv(folder, out, extra))
        err = capsys.readouterr().err
        got = _outputs(tmp_path / "elsewhere" if flag == "--out" else out) if rc in (0, 1) else None
        assert check(base, rc, got, err, list(calls)), (flag, rc, err[-500:])


def test_every_per_image_step_is_inside_the_error_handling(folder, tmp_path, capsys):
    """An image PIL reads but the CRF's OpenCV reader refuses (a float TIFF), with --crf and
    --on_error skip: that image is listed, every other one is segmented, classes.json is written."""
    Image.fromarray(np.linspace(0, 1, 48 * 32, dtype=np.float32).reshape(32, 48), mode="F").save(folder / "float.tif")
    out = tmp_path / "out"
    rc = main(["segment", str(folder), "--classes", "cat,dog", "--model_path", str(TINY), "--device", "cpu",
               "--out", str(out), "--crf", "--on_error", "skip"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "1 image(s) failed" in err and str(folder / "float.tif") in err and "Traceback" not in err
    legend = json.loads((out / "classes.json").read_text())
    assert sorted(legend["tags"]) == sorted(SIZES)
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(SIZES)
