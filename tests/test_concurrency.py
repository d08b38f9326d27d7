"""Two runs of one stage into one folder (issue 10, item 8): the second stops at once with one
line while the first holds the folder; a killed holder never blocks; concurrent runs never
leave torn or mixed outputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from clip_es.cli import generate_cams_main
from clip_es.eval_cli import eval_cam_main, eval_crf_main
from pipelines.command import main
from tagclip.cli import classify_main
from toolkit.resume import folder_lock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"a{i}.jpg")
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "gt" / f"a{i}.png")
    (tmp_path / "split.txt").write_text("".join(f"a{i} {i + 2}\n" for i in range(3)))
    return tmp_path


def _crf_lock_name(w: Path) -> str:
    """The CRF stage locks its journal's name, which carries the run's key."""
    from clip_es.eval_cli import _crf_journal, eval_crf_parser
    from clip_es.registry import get_eval_config
    from toolkit.sharding import SINGLE

    args = eval_crf_parser().parse_args(_crf_argv(w))
    return _crf_journal(args, get_eval_config("voc2012"), w / "crf", SINGLE).path.name.lstrip(".")[:-len(".journal")]


def _crf_argv(w: Path) -> list[str]:
    return ["--dataset", "voc2012", "--cam_out_dir", str(w / "cams"), "--gt_root", str(w / "gt"), "--image_root",
            str(w / "img"), "--split_file", str(w / "split.txt"), "--pseudo_mask_save_path", str(w / "crf"),
            "--jobs", "1"]


def _stages(w: Path) -> dict:
    """stage -> (output folder, lock name, command)."""
    model = str(helpers.TINY_CHECKPOINT)
    cams = w / "cams"
    return {
        "classify": (w / "out", "voc2007_val_tagclip.txt", lambda: classify_main(
            ["--img_root", str(w / "img"), "--split_file", str(w / "split.txt"), "--model_path", model,
             "--device", "cpu", "--output_dir", str(w / "out")])),
        "generate_cams": (cams, "generate_cams", lambda: generate_cams_main(
            ["--dataset", "voc2012", "--img_root", str(w / "img"), "--split_file", str(w / "split.txt"),
             "--model", model, "--device", "cpu", "--cam_out_dir", str(cams)])),
        "eval_cam": (w / "masks", "eval_cam", lambda: eval_cam_main(
            ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--gt_root", str(w / "gt"), "--split_file",
             str(w / "split.txt"), "--pseudo_mask_save_path", str(w / "masks")])),
        "eval_cam_with_crf": (w / "crf", _crf_lock_name(w), lambda: eval_crf_main(_crf_argv(w))),
        "segment": (w / "seg", "segment", lambda: main(
            ["segment", str(w / "img"), "--classes", "cat,dog", "--model_path", model, "--device", "cpu",
             "--out", str(w / "seg")])),
    }


def test_a_held_folder_stops_a_second_run_of_every_stage(work, capsys):
    stages = _stages(work)
    assert stages["generate_cams"][2]() == 0  # the CAMs the evaluations read
    capsys.readouterr()
    for stage, (folder, name, run) in stages.items():
        folder.mkdir(exist_ok=True)
        with folder_lock(folder, name):
            assert run() == 2, stage
            line = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()][-1]
            assert line == (f"error: {folder}: another run is writing into this folder (pid {os.getpid()}); "
                            "wait for it to finish, or give this run another output folder"), stage
        assert not list(folder.glob(".*.lock"))  # released and removed
        assert run() == 0, stage  # free again
        assert not list(folder.glob(".*.lock"))
        capsys.readouterr()


def test_a_killed_holder_never_blocks(work):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from toolkit.resume import folder_lock\n"
            "with folder_lock(sys.argv[2], 'voc2007_val_tagclip.txt'):\n"
            "    print('held', flush=True); time.sleep(600)")
    (work / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(work / "out")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    assert _stages(work)["classify"][2]() == 2  # held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (work / "out" / ".voc2007_val_tagclip.txt.lock").exists()  # left behind by the kill ...
    assert _stages(work)["classify"][2]() == 0  # ... and no obstacle


def test_simultaneous_runs_into_one_folder_finish_or_stop_cleanly(work):
    """Six classify.py processes at once into one folder: each exits 0 or 2 (the lock line),
    at least one finishes, and the label file is that of a lone run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "classify.py"), "--img_root", str(work / "img"), "--split_file",
           str(work / "split.txt"), "--model_path", str(helpers.TINY_CHECKPOINT), "--device", "cpu"]
    alone = subprocess.run([*cmd, "--output_dir", str(work / "alone")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr
    procs = [subprocess.Popen([*cmd, "--output_dir", str(work / "shared")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc in (0, 2) for rc, _ in results), results
    assert any(rc == 0 for rc, _ in results)
    for rc, err in results:
        if rc == 2:
            assert "another run is writing into this folder" in err.strip().splitlines()[-1]
        assert "Traceback" not in err
    name = "voc2007_val_tagclip.txt"
    assert (work / "shared" / name).read_bytes() == (work / "alone" / name).read_bytes()
    assert sorted(p.name for p in (work / "shared").iterdir()) == [name]  # no lock, journal or temporary file
