"""Resume journal: exact round trip, torn lines, key changes, and resumed CLI runs."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tagclip.cli import classify_main
from toolkit.files import file_stamp
from toolkit.resume import ScoreJournal, run_key

FIXTURES = Path(__file__).parent / "fixtures" / "golden"
TINY = FIXTURES / "tiny_clip_fp16.npz"


def test_round_trip_is_exact_and_torn_tail_ignored(tmp_path):
    j = ScoreJournal(tmp_path / "j", "k1", 3)
    rows = np.array([[0.1, 1e-30, 0.3333333], [np.float32(2) / 3, 0.0, 1.0]], dtype=np.float32)
    j.start({})
    j.append(["a", "b"], ["1:2", "3:4"], rows)
    with open(j.path, "a") as f:
        f.write("c\t5:6\t0x1.0p+0 0x1")  # torn write: no newline
    done = j.load()
    assert list(done) == ["a", "b"]
    assert done["b"][0] == "3:4"
    assert np.array_equal(done["a"][1], rows[0]) and np.array_equal(done["b"][1], rows[1])
    assert ScoreJournal(j.path, "other-key", 3).load() == {}
    assert ScoreJournal(j.path, "k1", 4).load() == {}


def test_run_key_depends_on_settings():
    assert run_key(a=1, b=[1, 2]) == run_key(b=[1, 2], a=1)
    assert run_key(a=1) != run_key(a=2)


@pytest.fixture()
def voc_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    ids = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"im{i}.jpg")
        ids.append(f"im{i}")
    split = tmp_path / "split.txt"
    split.write_text("".join(f"{i} {k % 20}\n" for k, i in enumerate(ids)))
    out = tmp_path / "out"
    argv = ["--img_root", str(imgs), "--split_file", str(split), "--model_path", str(TINY),
            "--output_dir", str(out), "--scores_out", str(tmp_path / "s.npy"), "--device", "cpu",
            "--batch_size", "2"]
    return argv, out, imgs, tmp_path


def test_resumed_run_reuses_finished_rows_and_redoes_changed_images(voc_run, capsys):
    argv, out, imgs, tmp = voc_run
    argv = argv + ["--batch_size", "1"]  # one image per batch: each image is kept or redone on its own
    assert classify_main(argv) == 0
    full = np.load(tmp / "s.npy")
    journal = out / ".voc2007_val_tagclip.txt.journal"
    assert not journal.exists()  # a finished run leaves no journal

    # Leave the journal an interrupted run would leave, keyed by the CLI itself: a run with an
    # unreadable im3 keeps its journal (im0..im2) so that a rerun only retries im3.
    shutil.copy(imgs / "im3.jpg", tmp / "im3.bak")
    (imgs / "im3.jpg").write_bytes(b"not a jpeg")
    assert classify_main(argv + ["--on_error", "skip"]) == 1
    assert journal.exists()
    header, *lines = journal.read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["im0", "im1", "im2"]
    # Mark im0's and im1's journaled scores so reuse is visible, then change im1 on disk.
    for k in (0, 1):
        parts = lines[k].split("\t")
        parts[2] = " ".join(["0x1.0p-1"] * 20)
        lines[k] = "\t".join(parts)
    journal.write_text("\n".join([header, *lines]) + "\n")
    shutil.copy(tmp / "im3.bak", imgs / "im3.jpg")
    st = os.stat(imgs / "im1.jpg")
    os.utime(imgs / "im1.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert classify_main(argv) == 0
    resumed = np.load(tmp / "s.npy")
    assert np.all(resumed[0] == 0.5)                 # reused from the journal
    assert np.array_equal(resumed[1:], full[1:])     # im1 redone (stamp changed), im2 reused, im3 new
    assert not journal.exists()


def test_file_stamp(tmp_path):
    f = tmp_path / "x"
    assert file_stamp(f) == "missing"
    f.write_bytes(b"abc")
    assert file_stamp(f).startswith("3:")


def test_sigkilled_run_resumes_to_identical_outputs(tmp_path):
    """A real classify.py process killed with SIGKILL mid-run, restarted with the same command,
    ends with the label file and scores of an uninterrupted run (byte for byte)."""
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image
    root = Path(__file__).resolve().parents[1]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(imgs / f"k{i:02d}.jpg")
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, str(root / "classify.py"), "--img_root", str(imgs), "--model_path", str(TINY),
                "--output_dir", str(out), "--scores_out", str(out / "s.npy"), "--device", "cpu",
                "--batch_size", "1"]

    subprocess.run(command(tmp_path / "full"), env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    journal = out / ".voc2007_val_tagclip.txt.journal"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:  # header + 3 images
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(journal.read_text().splitlines()) - 1
    assert 3 <= done_before < 12, "the run must be killed midway"
    assert not (out / "voc2007_val_tagclip.txt").exists()
    resumed = subprocess.run(command(out), env=env, check=True, capture_output=True, text=True)
    assert f"{done_before}/12" in resumed.stderr  # the progress bar starts at the finished images
    for name in ("voc2007_val_tagclip.txt", "s.npy"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not journal.exists()


def test_decoding_workers_give_the_same_outputs(voc_run, capsys):
    argv, out, imgs, tmp = voc_run
    assert classify_main(argv) == 0
    base = np.load(tmp / "s.npy")
    (imgs / "im2.jpg").write_bytes(b"broken")  # errors must cross the worker boundary too
    assert classify_main(argv + ["--workers", "2", "--on_error", "skip"]) == 1
    err = capsys.readouterr().err
    assert "im2.jpg: cannot read image" in err
    with_workers = np.load(tmp / "s.npy")
    assert np.array_equal(with_workers, base[[0, 1, 3]])


def test_input_error_pickles():
    import pickle

    from toolkit.errors import InputError
    err = pickle.loads(pickle.dumps(InputError("/x/y.jpg", "cannot read image: truncated")))
    assert (err.path, err.problem, str(err)) == ("/x/y.jpg", "cannot read image: truncated",
                                                 "/x/y.jpg: cannot read image: truncated")


def test_a_resumed_chunk_is_run_with_its_original_batch(tmp_path, monkeypatch):
    """A journal holding part of a batch (here: one image of four failed, then was fixed) makes
    the rerun score the whole batch again, so the crops share the forwards they shared in an
    uninterrupted run and the outputs are byte-identical (scoring the fixed image alone moves
    scores by an ulp: the tiny model measures 1.5e-8 and 3e-8 on such a batch)."""
    import helpers
    from PIL import Image

    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    base = Image.open(helpers.golden_image_path("voc2007", helpers.golden_image_ids("voc2007")[1])).convert("RGB")
    variants = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
                base.point(lambda v: int(v * 0.9))]
    for k, im in enumerate(variants):  # one size, so all four share one batch
        im.save(imgs / f"v{k}.jpg")
    (tmp_path / "split.txt").write_text("".join(f"v{k} 1\n" for k in range(4)))

    def run(out, *extra):
        return classify_main([str(a) for a in ["--img_root", imgs, "--split_file", tmp_path / "split.txt",
                                               "--model_path", TINY, "--device", "cpu", "--batch_size", "4",
                                               "--output_dir", out, "--scores_out", out / "s.npy", *extra]])

    assert run(tmp_path / "full") == 0
    good = (imgs / "v2.jpg").read_bytes()
    (imgs / "v2.jpg").write_bytes(b"broken")
    assert run(tmp_path / "resumed", "--on_error", "skip") == 1  # rows of v0, v1, v3 journaled
    (imgs / "v2.jpg").write_bytes(good)
    assert run(tmp_path / "resumed") == 0
    for name in ("s.npy", "voc2007_val_tagclip.txt"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
