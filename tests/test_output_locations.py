"""Output locations and devices are checked before any work (issue 10, item 6): a folder under a
regular file, an unwritable folder, a full disk, a bad --scores_out, an absent device, each is
one line naming the path or the device, exit status 2. "Before the model loads" is shown by
giving a checkpoint that does not exist: the output problem must be the one reported."""
from __future__ import annotations

import os
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

from clip_es.cli import generate_cams_main
from clip_es.eval_cli import eval_cam_main, eval_crf_main
from pipelines.command import main
from tagclip.cli import classify_main

# A folder no process can create, root included (procfs refuses new entries).
UNWRITABLE = Path("/proc/tagclip-test-output")
NO_MODEL = "/nonexistent/ViT-B-16.pt"


@pytest.fixture
def work(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "gt" / "a.png")
    np.save(tmp_path / "img" / "a.npy", {"keys": np.array([3]), "attn_highres": np.zeros((1, 32, 48), np.float16)})
    (tmp_path / "split.txt").write_text("a 3\n")
    (tmp_path / "a_file").write_text("in the way\n")
    return tmp_path


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


def _classify(w: Path, *extra, model=NO_MODEL):
    return classify_main([str(a) for a in ["--img_root", w / "img", "--split_file", w / "split.txt", "--model_path",
                                           model, "--device", "cpu", *extra]])


@pytest.mark.parametrize("flag,where,named", [
    ("--output_dir", lambda w: w / "a_file" / "out", lambda w: w / "a_file" / "out"),
    ("--output_dir", lambda w: w / "a_file", lambda w: w / "a_file"),
    ("--output_dir", lambda w: UNWRITABLE, lambda w: UNWRITABLE),
    ("--scores_out", lambda w: w / "s.txt", lambda w: w / "s.txt"),
    ("--scores_out", lambda w: w / "a_file" / "s.npy", lambda w: w / "a_file"),
    ("--scores_out", lambda w: UNWRITABLE / "s.npy", lambda w: UNWRITABLE),
    ("--vis_dir", lambda w: w / "a_file", lambda w: w / "a_file"),
])
def test_classify_checks_its_outputs_before_the_model(flag, where, named, work, capsys):
    extra = [flag, where(work)] + (["--output_dir", work / "out"] if flag != "--output_dir" else [])
    assert _classify(work, *extra) == 2
    assert _error_line(capsys).startswith(f"error: {named(work)}: ")


def test_a_full_disk_during_a_run_is_one_line(work, capsys, monkeypatch):
    """The resume journal on a full disk (/dev/full answers every write with ENOSPC)."""
    from toolkit.resume import ScoreJournal
    out = work / "out"
    out.mkdir()
    journal = out / ".voc2007_val_tagclip.txt.journal"
    journal.symlink_to("/dev/full")
    monkeypatch.setattr(ScoreJournal, "start", lambda self, done: None)  # keep the link in place
    assert _classify(work, "--output_dir", out, model=helpers.TINY_CHECKPOINT) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {journal}: cannot write the resume journal (")
    assert "No space left on device" in line


@pytest.mark.parametrize("case", ["cam_out_dir", "vis_dir"])
def test_generate_cams_checks_its_outputs_before_the_model(case, work, capsys):
    out = work / "a_file" if case == "cam_out_dir" else work / "cams"
    argv = ["--dataset", "voc2012", "--img_root", work / "img", "--split_file", work / "split.txt", "--model",
            NO_MODEL, "--device", "cpu", "--cam_out_dir", out]
    if case == "vis_dir":
        argv += ["--vis_dir", UNWRITABLE]
    assert generate_cams_main([str(a) for a in argv]) == 2
    assert _error_line(capsys).startswith(f"error: {work / 'a_file' if case == 'cam_out_dir' else UNWRITABLE}: ")


@pytest.mark.parametrize("script", ["eval_cam", "eval_cam_with_crf"])
@pytest.mark.parametrize("flag", ["--pseudo_mask_save_path", "--vis_dir", "--save_scores"])
def test_evaluation_checks_its_outputs_before_reading_images(script, flag, work, capsys):
    value = UNWRITABLE / "s.json" if flag == "--save_scores" else UNWRITABLE
    argv = ["--dataset", "voc2012", "--cam_out_dir", work / "img", "--gt_root", work / "gt", "--split_file",
            work / "split.txt", flag, value]
    if script == "eval_cam_with_crf":
        argv += ["--image_root", work / "img", "--jobs", "1"]
        argv += ["--eval_only"] if flag != "--pseudo_mask_save_path" else []
    fn = eval_cam_main if script == "eval_cam" else eval_crf_main
    assert fn([str(a) for a in argv]) == 2
    assert _error_line(capsys).startswith(f"error: {UNWRITABLE}: ")


@pytest.mark.parametrize("device,named", [("cuda", "cuda"), ("cuda:3", "cuda:3"), ("bogus", "bogus")])
@pytest.mark.parametrize("command", ["segment", "demo", "generate_cams", "classify"])
def test_an_absent_device_is_one_line(command, device, named, work, capsys):
    assert not torch.cuda.is_available()  # the CPU machines the suite runs on
    if command == "segment":
        rc = main(["segment", str(work / "img"), "--classes", "cat,dog", "--model_path", NO_MODEL, "--device", device,
                   "--out", str(work / "seg")])
    elif command == "demo":
        rc = main(["demo", "--model_path", NO_MODEL, "--device", device])
    elif command == "generate_cams":
        rc = generate_cams_main([str(a) for a in ["--dataset", "voc2012", "--img_root", work / "img", "--split_file",
                                                  work / "split.txt", "--model", NO_MODEL, "--device", device,
                                                  "--cam_out_dir", work / "cams"]])
    else:
        rc = _classify(work, "--output_dir", work / "out", "--device", device)
    assert rc == 2
    assert _error_line(capsys).startswith(f"error: {named}: ")
    assert not os.path.exists(work / "seg" / "masks") and not os.path.exists(work / "cams" / "a.npy")


@pytest.mark.parametrize("command", ["demo", "classify", "segment"])
def test_a_cache_folder_under_a_file_is_one_line(command, work, capsys, monkeypatch):
    """TAGCLIP_CACHE names a folder the run cannot create: one line naming it, status 2. (The
    default cache is optional: a run goes on without it, with a warning.)"""
    cache = work / "a_file" / "cache"
    monkeypatch.setenv("TAGCLIP_CACHE", str(cache))
    model = str(helpers.TINY_CHECKPOINT)
    if command == "demo":
        rc = main(["demo", "--model_path", model, "--device", "cpu"])
    elif command == "classify":
        rc = _classify(work, "--output_dir", work / "out", model=model)
    else:
        rc = main(["segment", str(work / "img"), "--classes", "cat,dog", "--model_path", model, "--device", "cpu",
                   "--out", str(work / "seg")])
    assert rc == 2
    assert _error_line(capsys) == f"error: {cache}: cannot write into this cache folder (TAGCLIP_CACHE) (Not a directory)"
