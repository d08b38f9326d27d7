"""Ctrl-C (issue 10, item 7): exit status 130 and one line saying what was kept for resuming;
the same command then finishes with the outputs of an uninterrupted run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from clip_es.cam_files import load_cam

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 12


@pytest.fixture
def images(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(4)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(imgs / f"k{i:02d}.jpg")
    (tmp_path / "labels.txt").write_text("".join(f"k{i:02d} {i % 20}\n" for i in range(N_IMAGES)))
    return imgs


def _interrupt_midway(command, env, progress, minimum: int) -> subprocess.CompletedProcess:
    """Start ``command``, send SIGINT once ``progress()`` reaches ``minimum``, return the result."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and progress() < minimum:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_ctrl_c_in_classify_keeps_the_journal_and_says_so(images, tmp_path):
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, str(ROOT / "classify.py"), "--img_root", str(images), "--model_path",
                str(helpers.TINY_CHECKPOINT), "--output_dir", str(out), "--scores_out", str(out / "s.npy"),
                "--device", "cpu", "--batch_size", "1"]

    subprocess.run(command(tmp_path / "full"), env=env, check=True, capture_output=True)
    out = tmp_path / "stopped"
    journal = out / ".voc2007_val_tagclip.txt.journal"
    res = _interrupt_midway(command(out), env,
                            lambda: len(journal.read_text().splitlines()) - 1 if journal.exists() else 0, 3)
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    line = _last_line(res.stderr)
    match = re.fullmatch(rf"interrupted: (\d+) of {N_IMAGES} image\(s\) are scored and kept in (.+); "
                         r"the same command resumes from there", line)
    assert match, line
    assert Path(match.group(2)) == journal and int(match.group(1)) == len(journal.read_text().splitlines()) - 1
    assert 3 <= int(match.group(1)) < N_IMAGES
    assert not (out / "voc2007_val_tagclip.txt").exists()
    subprocess.run(command(out), env=env, check=True, capture_output=True)
    for name in ("voc2007_val_tagclip.txt", "s.npy"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_ctrl_c_in_generate_cams_keeps_the_written_files(images, tmp_path):
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, str(ROOT / "generate_cams.py"), "--dataset", "voc2012", "--img_root", str(images),
                "--split_file", str(tmp_path / "labels.txt"), "--model", str(helpers.TINY_CHECKPOINT),
                "--cam_out_dir", str(out), "--device", "cpu"]

    subprocess.run(command(tmp_path / "full"), env=env, check=True, capture_output=True)
    out = tmp_path / "stopped"
    res = _interrupt_midway(command(out), env, lambda: len(list(out.glob("*.npy"))), 3)
    assert res.returncode == 130, res.stderr[-2000:]
    line = _last_line(res.stderr)
    match = re.fullmatch(rf"interrupted: (\d+) of {N_IMAGES} CAM file\(s\) are written and kept in (.+); "
                         r"the same command resumes from there", line)
    assert match and Path(match.group(2)) == out, line
    kept = int(match.group(1))
    assert kept == len(list(out.glob("*.npy"))) and 3 <= kept < N_IMAGES
    resumed = subprocess.run(command(out), env=env, check=True, capture_output=True, text=True)
    assert f"resuming: {kept} CAM file(s)" in resumed.stdout
    for i in range(N_IMAGES):
        k1, m1 = load_cam(tmp_path / "full" / f"k{i:02d}.npy")
        k2, m2 = load_cam(out / f"k{i:02d}.npy")
        assert np.array_equal(k1, k2) and np.array_equal(m1, m2)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigkill_of_the_crf_run_ends_its_pool_workers(tmp_path):
    """eval_cam_with_crf.py --jobs 2 SIGKILLed mid-run: its workers end too (they used to keep
    running, about 470 MB each)."""
    command, _ = _crf_run(tmp_path, copies=12)  # enough CRF work to outlast the start of the pool
    proc = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(_children(proc.pid)) >= 2 and any((tmp_path / "masks").glob("*.png"))):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2 and proc.poll() is None, "the pool must be working when the run is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _running(w)]


def _crf_run(tmp_path, copies: int = 6):
    """eval_cam_with_crf.py --jobs 2 on enough images to outlast the start of the pool."""
    import shutil

    import eval_helpers as eh

    cams = eh.write_cam_dir("voc2012", tmp_path / "cams0")
    voc = eh.folder("voc2012")
    for kind in ("cams", "img", "gt"):
        (tmp_path / kind).mkdir()
    ids = []
    for copy in range(copies):
        for image_id in eh.variant_ids("voc2012"):
            new = f"{image_id}_{copy}"
            shutil.copy(cams / f"{image_id}.npy", tmp_path / "cams" / f"{new}.npy")
            shutil.copy(voc / "JPEGImages" / f"{image_id}.jpg", tmp_path / "img" / f"{new}.jpg")
            shutil.copy(voc / "SegmentationClass" / f"{image_id}.png", tmp_path / "gt" / f"{new}.png")
            ids.append(new)
    (tmp_path / "split.txt").write_text("".join(f"{i}\n" for i in ids))
    command = [sys.executable, str(ROOT / "eval_cam_with_crf.py"), "--dataset", "voc2012",
               "--cam_out_dir", str(tmp_path / "cams"), "--gt_root", str(tmp_path / "gt"),
               "--image_root", str(tmp_path / "img"), "--split_file", str(tmp_path / "split.txt"),
               "--pseudo_mask_save_path", str(tmp_path / "masks"), "--jobs", "2"]
    return command, ids


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_crf_main_process_alone_stops_the_run_cleanly(tmp_path, sig, status):
    """``kill -INT`` (or ``kill -TERM``) sent to eval_cam_with_crf.py's main process only, not
    its process group: the run stops within seconds with one ``interrupted:`` line naming the
    journal, its pool workers end, and the same command then finishes the rest."""
    command, ids = _crf_run(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def journaled() -> int:  # records beyond the journal's header line
        return sum(max(0, len(p.read_text().splitlines()) - 1) for p in (tmp_path / "masks").glob(".*.journal"))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(_children(proc.pid)) >= 2 and journaled() >= 2):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2 and proc.poll() is None, "the pool must be working when the signal comes"
    os.kill(proc.pid, sig)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == status, err
    last = _last_line(err)
    assert last.startswith("interrupted: ") and "journal" in last and "resumes" in last, last
    assert not [w for w in workers if _running(w)]
    done = len(list((tmp_path / "masks").glob("*.png")))
    assert 0 < done < len(ids)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stdout
    assert len(list((tmp_path / "masks").glob("*.png"))) == len(ids)
