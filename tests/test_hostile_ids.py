"""Ids cannot escape their folders: every id is checked where split and label files are read,
so no stage reads or writes outside its folders (issue 10, item 2). Each test builds the
hostile split file and asserts one error line naming the file and line, exit status 2, and no
file anywhere outside the output folder (nor in it)."""
from __future__ import annotations

from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from clip_es.cli import generate_cams_main
from clip_es.eval_cli import eval_cam_main, eval_crf_main
from tagclip.cli import classify_main
from toolkit.errors import InputError
from toolkit.splits import read_split


def _bad_ids(tmp_path: Path) -> dict[str, str]:
    """case -> hostile id; each would name a file outside the folder it is joined to."""
    return {
        "parent": "../escaped",
        "deep_parent": "a/../../escaped",
        "absolute": str(tmp_path / "absolute_target"),
        "subfolder": "sub/inside",
        "backslash": "..\\escaped",
        "dot_dot": "..",
        "nul": "x\x00y",
        "drive": "C:escaped",
    }


@pytest.mark.parametrize("case", ["parent", "deep_parent", "absolute", "subfolder", "backslash", "dot_dot", "nul",
                                  "drive"])
def test_read_split_names_the_line_of_a_bad_id(case, tmp_path):
    bad = _bad_ids(tmp_path)[case]
    split = tmp_path / "split.txt"
    split.write_bytes(f"good1 3\n{bad} 4\ngood2\n".encode("utf-8"))
    with pytest.raises(InputError) as info:
        read_split(split, num_classes=20)
    assert info.value.path == str(split)
    assert info.value.problem.startswith(f"line 2: image id {bad!r} ")


def _world(tmp_path: Path) -> tuple[Path, Path]:
    """A work folder (where escapes would land) holding one good image, its GT and a CAM folder."""
    work = tmp_path / "work"
    (work / "img").mkdir(parents=True)
    (work / "gt").mkdir()
    Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(work / "img" / "good.jpg")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(work / "gt" / "good.png")
    return work, work / "split.txt"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


ESCAPES = ["parent", "absolute", "backslash"]


@pytest.mark.parametrize("case", ESCAPES)
@pytest.mark.parametrize("script", ["classify", "generate_cams", "eval_cam", "eval_cam_with_crf"])
def test_no_script_reads_or_writes_outside_its_folders(script, case, tmp_path, capsys):
    work, split = _world(tmp_path)
    bad = _bad_ids(tmp_path)[case]
    split.write_text(f"good 3\n{bad} 4\n", encoding="utf-8")
    out = work / "out"
    before = _files(tmp_path)
    argv = {
        "classify": (classify_main, ["--img_root", work / "img", "--split_file", split, "--model_path",
                                     helpers.TINY_CHECKPOINT, "--device", "cpu", "--output_dir", out,
                                     "--vis_dir", out / "vis", "--dataset", "voc2007"]),
        "generate_cams": (generate_cams_main, ["--dataset", "voc2012", "--img_root", work / "img", "--split_file",
                                               split, "--model", helpers.TINY_CHECKPOINT, "--device", "cpu",
                                               "--cam_out_dir", out, "--vis_dir", out / "vis"]),
        "eval_cam": (eval_cam_main, ["--dataset", "voc2012", "--cam_out_dir", work / "img", "--gt_root", work / "gt",
                                     "--split_file", split, "--pseudo_mask_save_path", out, "--vis_dir", out / "vis"]),
        "eval_cam_with_crf": (eval_crf_main, ["--dataset", "voc2012", "--cam_out_dir", work / "img", "--gt_root",
                                              work / "gt", "--image_root", work / "img", "--split_file", split,
                                              "--pseudo_mask_save_path", out, "--vis_dir", out / "vis", "--jobs", "1"]),
    }[script]
    main, args = argv
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {split}: line 2: image id {bad!r} ")
    assert "Traceback" not in err
    created = _files(tmp_path) - before
    assert not created - ({out} if out.exists() else set()), sorted(map(str, created))
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("odd", ["with space", "with\ttab", "with\nnewline", "nbsp\u00a0inside"])
def test_folder_names_a_label_file_cannot_hold_are_refused(odd, tmp_path, capsys):
    """Folder mode: a name with whitespace cannot be an id of a label file line, so it is
    refused (one line; with --on_error skip it is listed and the rest is tagged), and the label
    file stays readable by generate_cams.py."""
    img = tmp_path / "img"
    img.mkdir()
    for name in ("good", odd):
        Image.fromarray(np.full((32, 48, 3), 60, np.uint8)).save(img / f"{name}.jpg")
    argv = ["--img_root", str(img), "--model_path", str(helpers.TINY_CHECKPOINT), "--device", "cpu",
            "--classes", "cat,dog", "--output_dir", str(tmp_path / "out")]
    assert classify_main(argv) == 2
    err = capsys.readouterr().err
    shown = str(img / f"{odd}.jpg") if odd.isprintable() else repr(str(img / f"{odd}.jpg"))  # one line always
    assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith(
        f"error: {shown}: the file name holds whitespace")
    assert classify_main(argv + ["--on_error", "skip"]) == 1
    assert shown in capsys.readouterr().err
    label_file = tmp_path / "out" / "custom_val_tagclip.txt"
    assert [e.id for e in read_split(label_file)] == ["good"]
