"""``torchrun --nproc_per_node=2 classify.py`` (gloo, CPU) gives the one-process outputs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.errors import InputError
from toolkit.sharding import Shard, init_from_env, owned_indices, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "golden" / "tiny_clip_fp16.npz"
# torchrun as the installed torch provides it (the module form needs no script on PATH).
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def test_owned_indices_deal_whole_batches():
    two = [owned_indices(11, 3, Shard(r, 2, r)) for r in range(2)]
    assert two == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert owned_indices(5, 2, Shard(0, 1, 0)) == [0, 1, 2, 3, 4]
    three = [owned_indices(7, 1, Shard(r, 3, r)) for r in range(3)]
    assert sorted(sum(three, [])) == list(range(7))


@pytest.mark.parametrize("device,local_rank,local_world,gpus,expected", [
    # CPU ranks, whatever GPUs exist, talk over gloo.
    ("cpu", 1, 2, 2, ("cpu", "gloo")),
    (None, 0, 2, 0, ("cpu", "gloo")),
    # One GPU per rank: rank r takes cuda:r, NCCL.
    (None, 1, 2, 2, ("cuda:1", "nccl")),
    ("cuda", 3, 4, 8, ("cuda:3", "nccl")),
    # More ranks than GPUs: they share (r mod G) over gloo, which NCCL would refuse.
    ("cuda", 1, 2, 1, ("cuda:0", "gloo")),
    ("cuda", 2, 3, 2, ("cuda:0", "gloo")),
    # An explicit index is kept for every rank, which then share it.
    ("cuda:1", 0, 2, 2, ("cuda:1", "gloo")),
    ("cuda:1", 0, 1, 2, ("cuda:1", "nccl")),
])
def test_device_and_backend_plan(device, local_rank, local_world, gpus, expected):
    got = plan(device, local_rank, local_world, gpus)
    assert (str(got.device), got.backend) == expected


def test_cuda_plan_without_gpus_is_an_input_error():
    with pytest.raises(InputError, match="no CUDA device"):
        plan("cuda", 0, 2, 0)


def test_world_size_without_rank_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InputError, match="RANK: is not set.*torchrun"):
        init_from_env("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="RANK: must be an integer"):
        init_from_env("cpu")


def test_init_sets_the_device_first_and_gathers_over_gloo(monkeypatch):
    """init_from_env under torchrun's environment, the process-group calls recorded: the CUDA
    device is made current before the process group starts, results get a gloo group of their
    own, and both groups wait GATHER_TIMEOUT (not torch's 30 minutes) at the final gather."""
    import toolkit.sharding as D

    calls = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, timeout: calls.append(("init", backend, timeout)))
    monkeypatch.setattr(D.dist, "new_group", lambda backend, timeout: calls.append(("group", backend, timeout)) or "g")
    monkeypatch.setattr(D.torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(D.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(D, "resolve_device", lambda device: torch.device(device))  # no GPU to check here
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    shard = init_from_env("cuda")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl", D.GATHER_TIMEOUT), ("group", "gloo", D.GATHER_TIMEOUT)]
    assert shard == Shard(1, 2, 1, torch.device("cuda", 1), "g")
    assert D.GATHER_TIMEOUT.total_seconds() >= 12 * 3600
    calls.clear()
    assert init_from_env("cpu").device == torch.device("cpu")
    assert calls == [("init", "gloo", D.GATHER_TIMEOUT), ("group", "gloo", D.GATHER_TIMEOUT)]


def test_one_process_shard_resolves_the_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    shard = init_from_env("cpu")
    assert shard.world == 1 and shard.is_main and shard.device == torch.device("cpu") and shard.group is None
    with pytest.raises(InputError, match="bogus"):
        init_from_env("bogus")


def test_torchrun_two_processes_match_one(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(5)
    sizes = [(64, 48), (48, 64), (64, 48), (32, 32), (64, 48), (80, 32), (64, 48)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"d{i}.jpg")
    split = tmp_path / "split.txt"
    split.write_text("".join(f"d{i} {i % 20} {(3 * i) % 20}\n" for i in range(len(sizes))))
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def args(out):
        return ["--img_root", imgs, "--split_file", split, "--model_path", TINY, "--output_dir", out,
                "--scores_out", out / "s.npy", "--device", "cpu", "--batch_size", "2"]

    one = subprocess.run([sys.executable, ROOT / "classify.py", *args(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", ROOT / "classify.py",
                          *args(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("voc2007_val_tagclip.txt", "s.npy"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    metrics = [ln for ln in one.stdout.splitlines() if ln.startswith(("mAP", "F1"))]
    assert metrics and all(ln in two.stdout for ln in metrics)
    assert two.stdout.count("mAP:") == 1  # only rank 0 reports
    assert not list((tmp_path / "two").glob(".*journal"))


def test_torchrun_generate_cams_writes_the_same_files(tmp_path):
    from clip_es.cam_files import load_cam
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(6)
    ids = [f"c{i}" for i in range(5)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(imgs / f"{i}.jpg")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i} {k % 20} {(k + 7) % 20}\n" for k, i in enumerate(ids)))
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def args(out):
        return ["--dataset", "voc2012", "--img_root", imgs, "--split_file", labels, "--model", TINY,
                "--cam_out_dir", out, "--device", "cpu"]

    one = subprocess.run([sys.executable, ROOT / "generate_cams.py", *args(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", ROOT / "generate_cams.py",
                          *args(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for i in ids:
        k1, m1 = load_cam(tmp_path / "one" / f"{i}.npy")
        k2, m2 = load_cam(tmp_path / "two" / f"{i}.npy")
        assert np.array_equal(k1, k2) and np.array_equal(m1, m2)
    journals = sorted(p.name for p in (tmp_path / "two").glob(".generate_cams*.journal"))
    assert journals == [".generate_cams.rank0of2.journal", ".generate_cams.rank1of2.journal"]
    # One process afterwards keeps what both ranks wrote and folds their journals into its own.
    again = subprocess.run([sys.executable, ROOT / "generate_cams.py", *args(tmp_path / "two")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming: {len(ids)} CAM file(s)" in again.stdout
    assert [p.name for p in (tmp_path / "two").glob(".generate_cams*.journal")] == [".generate_cams.journal"]


def test_torchrun_crf_evaluation_sums_confusion_matrices(tmp_path):
    import json

    import eval_helpers
    cams = eval_helpers.write_cam_dir("voc2012", tmp_path / "cams")
    voc = eval_helpers.folder("voc2012")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def args(name):
        return ["--dataset", "voc2012", "--cam_out_dir", cams, "--gt_root", voc / "SegmentationClass",
                "--image_root", voc / "JPEGImages", "--split_file", voc / "split.txt", "--eval_only",
                "--jobs", "1", "--save_scores", tmp_path / f"{name}.json"]

    one = subprocess.run([sys.executable, ROOT / "eval_cam_with_crf.py", *args("one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", ROOT / "eval_cam_with_crf.py",
                          *args("two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert two.stdout.count("Mean IoU") == one.stdout.count("Mean IoU") >= 1


def test_sigkilled_generate_cams_resumes_to_identical_files(tmp_path):
    """CAM files are written atomically one per image: a SIGKILLed run restarted with the same
    command redoes only the missing images and ends with the files of an uninterrupted run."""
    import signal
    import time

    from clip_es.cam_files import load_cam
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(8)
    ids = [f"s{i:02d}" for i in range(10)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(imgs / f"{i}.jpg")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i} {k % 20}\n" for k, i in enumerate(ids)))
    env = dict(os.environ, TAGCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, str(ROOT / "generate_cams.py"), "--dataset", "voc2012", "--img_root", str(imgs),
                "--split_file", str(labels), "--model", str(TINY), "--cam_out_dir", str(out), "--device", "cpu"]

    subprocess.run(command(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.npy"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list(out.glob("*.npy")))
    assert 3 <= before < len(ids), "the run must be killed midway"
    resumed = subprocess.run(command(out), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert f"resuming: {before} CAM file(s)" in resumed.stdout
    for i in ids:
        k1, m1 = load_cam(tmp_path / "full" / f"{i}.npy")
        k2, m2 = load_cam(out / f"{i}.npy")
        assert np.array_equal(k1, k2) and np.array_equal(m1, m2)


def test_crf_evaluation_resumes_from_its_journal(tmp_path, monkeypatch, capsys):
    """An interrupted CRF run keeps per-image confusion matrices in the cache's resume folder
    (never in the working directory); the rerun evaluates only the rest and reports the scores
    of an uninterrupted run."""
    import json

    import eval_helpers

    from clip_es.eval_cli import eval_crf_main
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    resume = tmp_path / "cache" / "resume"
    cams = eval_helpers.write_cam_dir("voc2012", tmp_path / "cams")
    voc = eval_helpers.folder("voc2012")

    def argv(name):
        return ["--dataset", "voc2012", "--cam_out_dir", str(cams), "--gt_root", str(voc / "SegmentationClass"),
                "--image_root", str(voc / "JPEGImages"), "--split_file", str(voc / "split.txt"), "--eval_only",
                "--jobs", "1", "--save_scores", str(tmp_path / f"{name}.json"), "--on_error", "skip"]

    assert eval_crf_main(argv("full")) == 0
    assert not list(resume.glob(".eval_cam_with_crf.*journal"))
    # Interrupt: one CAM file unreadable -> that image fails, the journal keeps the others.
    victim = sorted(cams.glob("*.npy"))[3]
    good = victim.read_bytes()
    victim.write_bytes(b"broken")
    assert eval_crf_main(argv("partial")) == 1
    journals = list(resume.glob(".eval_cam_with_crf.*journal"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == 1 + 7
    victim.write_bytes(good)
    capsys.readouterr()
    assert eval_crf_main(argv("resumed")) == 0
    assert "resuming: 7 image(s) already evaluated" in capsys.readouterr().out
    full = json.loads((tmp_path / "full.json").read_text())
    assert json.loads((tmp_path / "resumed.json").read_text()) == full
    assert not list(resume.glob(".eval_cam_with_crf.*journal"))
    assert not list(work.iterdir())  # nothing in the working directory
