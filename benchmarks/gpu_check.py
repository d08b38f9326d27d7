"""Correctness on an accelerator: one ``PASS`` or ``FAIL`` line per check (the first part of
``benchmarks/gpu_check.sh``).

It runs only what a CPU cannot: the golden fixtures (tiny random CLIP, the authors' outputs)
through the real entry points on the device in float32, held to the parity tolerances of the
CPU test suite; the GPU schedules against the CPU schedules on the device; and
``torchrun --nproc_per_node=2`` against one process (two ranks share one GPU over gloo; with
two or more GPUs every rank has its own, over NCCL).

    python benchmarks/gpu_check.py [--device cuda] [--skip_torchrun] [--only TEXT]

``--device cpu`` runs the same checks on the CPU (how the script itself is tested). Exit
status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import eval_helpers as eh  # noqa: E402
import helpers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from test_cams import HIGHRES_ATOL, VARIANTS, write_label_file  # noqa: E402

from clip.kernels import ALL_AT_ONCE, CPU_ATTENTION  # noqa: E402
from clip.preprocess import load_model_input  # noqa: E402
from clip_es.cam_files import load_cam
from clip_es.cams import compute_cams, encode_cam_text
from clip_es.cli import generate_cams_main  # noqa: E402
from clip_es.eval_cli import eval_cam_main, eval_crf_main  # noqa: E402
from clip_es.registry import get_cam_config
from tagclip import tagger as tagger_module  # noqa: E402
from tagclip.cli import classify_main  # noqa: E402
from tagclip.tagger import Schedule, Tagger, stage_batch  # noqa: E402
from toolkit.sharding import plan  # noqa: E402

# Schedules on one device: different batch shapes in the products (the CPU suite's bound).
SCHEDULE_ATOL = 1e-6
LABEL_FILE = "{}_val_tagclip.txt"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
SUBPROCESS_TIMEOUT_S = 240


class Check(Exception):
    """A failed comparison (the FAIL line's text)."""


def quiet(fn, argv) -> int:
    """Run an entry point with its stdout/stderr kept (returned on failure)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn([str(a) for a in argv])
    if rc != 0:
        raise Check(f"exit status {rc}: {err.getvalue().strip().splitlines()[-1:]}")
    return out.getvalue()


def check_classify(dataset: str, device: str, work: Path) -> str:
    out = work / f"classify_{dataset}"
    stdout = quiet(classify_main, [
        "--dataset", dataset, "--img_root", helpers.golden_image_path(dataset, "x").parent,
        "--split_file", helpers.golden_split_path(dataset), "--model_path", helpers.TINY_CHECKPOINT,
        "--device", device, "--output_dir", out, "--scores_out", out / "scores.npy"])
    z = helpers.golden_npz(dataset)
    scores = np.load(out / "scores.npy")
    try:
        helpers.assert_close_abs_or_rel(scores, z["predictions"], f"{dataset} scores")
    except AssertionError as err:
        raise Check(str(err)) from None
    lines = (out / LABEL_FILE.format(dataset)).read_text().splitlines()
    if lines != helpers.golden_label_lines()["label_file_lines"][dataset]:
        raise Check("label file differs from the reference's")
    printed = [ln for ln in helpers.golden_json(dataset)["stdout"].splitlines() if ln.startswith(("mAP", "F1"))]
    missing = [ln for ln in printed if ln not in stdout.splitlines()]
    if missing:
        raise Check(f"printed metrics differ: expected {missing}")
    return f"max |score diff| {np.abs(scores - z['predictions']).max():.1e}, label file and {' / '.join(printed)} equal"


def check_cams(variant: str, device: str, work: Path) -> str:
    dataset, folder, _ = VARIANTS[variant]
    out = work / f"cams_{variant}"
    label_file = write_label_file(variant, work)
    quiet(generate_cams_main, [
        "--dataset", dataset, "--img_root", helpers.GOLDEN_INPUTS / folder / "JPEGImages", "--split_file",
        label_file, "--model", helpers.TINY_CHECKPOINT, "--cam_out_dir", out, "--device", device])
    worst = 0.0
    for image_id, (keys, maps) in eh.golden_cams(variant).items():
        got_keys, got = load_cam(out / f"{image_id}.npy")
        if got_keys.tolist() != keys.tolist():
            raise Check(f"{image_id}: keys {got_keys.tolist()} != {keys.tolist()}")
        worst = max(worst, float(np.abs(got.astype(np.float32) - maps.astype(np.float32)).max()))
    if worst > HIGHRES_ATOL:
        raise Check(f"attn_highres max |diff| {worst:.2e} > {HIGHRES_ATOL}")
    return f"keys equal, attn_highres max |diff| {worst:.1e} (<= {HIGHRES_ATOL})"


def check_miou(variant: str, crf: bool, work: Path) -> str:
    """mIoU of the CAMs this device made, against the reference's mIoU of its own CAMs."""
    f = eh.folder(variant)
    scores = work / f"scores_{variant}_{'crf' if crf else 'cam'}.json"
    common = ["--dataset", eh.dataset_of(variant), "--cam_out_dir", work / f"cams_{variant}", "--gt_root",
              f / "SegmentationClass", "--split_file", f / "split.txt", "--save_scores", scores]
    if crf:
        quiet(eval_crf_main, [*common, "--image_root", f / "JPEGImages", "--eval_only", "--jobs", "2"])
    else:
        quiet(eval_cam_main, [*common, "--cam_type", "attn_highres"])
    got = json.loads(scores.read_text())
    want = eh.expected_score(variant, "eval_crf" if crf else "eval_cam")
    try:
        eh.compare_scores(got, want, get_cam_config(eh.dataset_of(variant)).eval_num_classes)
    except AssertionError as err:
        raise Check(str(err)) from None
    return f"mIoU {got['Mean IoU']:.4f} vs reference {eh.as_float(want['Mean IoU']):.4f} (tolerance {eh.IOU_TOL})"


def check_schedules(device: str) -> str:
    model = helpers.tiny_model().to(device)
    worst = 0.0
    for dataset in helpers.GOLDEN_DATASETS:
        images = [load_model_input(helpers.golden_image_path(dataset, i))[0]
                  for i in helpers.golden_image_ids(dataset)]
        # The GPU schedule, pinned staging only where there is CUDA to pin for.
        gpu = dataclasses.replace(Schedule.for_device("cuda"), pin_memory=torch.device(device).type == "cuda")
        runs = [Tagger.for_dataset(model, dataset, schedule=s).scores(images)
                for s in (Schedule.for_device("cpu"), gpu)]
        worst = max(worst, float((runs[0] - runs[1]).abs().max()))
    cfg = get_cam_config("voc2012")
    x, size_hw = load_model_input(helpers.golden_image_path("voc2007", helpers.golden_image_ids("voc2007")[0]))
    text = encode_cam_text(model, cfg)
    cams = [compute_cams(model, x, (0, 14, 2), text, cfg, size_hw, a).attn_highres for a in (CPU_ATTENTION, ALL_AT_ONCE)]
    cam_diff = float(np.abs(cams[0].astype(np.float32) - cams[1].astype(np.float32)).max())
    if worst > SCHEDULE_ATOL or cam_diff > SCHEDULE_ATOL:
        raise Check(f"scores max |diff| {worst:.1e}, CAMs {cam_diff:.1e} (> {SCHEDULE_ATOL})")
    return f"scores max |diff| {worst:.1e}, CAMs {cam_diff:.1e} (<= {SCHEDULE_ATOL})"


def check_pinned(device: str) -> str:
    if torch.device(device).type != "cuda":
        return "not applicable off CUDA"
    images = [torch.rand(3, 32, 48) for _ in range(3)]
    if not tagger_module._empty_host((3, 3, 32, 48), torch.float32, True).is_pinned():
        raise Check("the staging buffer is not page-locked")
    batch = stage_batch(images, torch.device(device), pin_memory=True)
    if not torch.equal(batch.cpu(), torch.stack(images)):
        raise Check("the asynchronously copied batch differs from the images")
    return "staging buffer page-locked, asynchronous copy exact"


def _run(cmd, env) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    if res.returncode != 0:
        script = next(Path(str(c)).name for c in cmd if str(c).endswith(".py"))
        raise Check(f"{script} exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    return res


def check_torchrun(device: str, work: Path) -> str:
    gpus = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    backend = plan(device, 0, 2, gpus).backend
    env = dict(os.environ, TAGCLIP_CACHE=str(work / "cache_torchrun"))
    dataset = "voc2007"
    common = ["--dataset", dataset, "--img_root", helpers.golden_image_path(dataset, "x").parent, "--split_file",
              helpers.golden_split_path(dataset), "--model_path", helpers.TINY_CHECKPOINT, "--device", device,
              "--batch_size", "2"]
    outs = {}
    for name, launcher in (("one", (sys.executable,)), ("two", TORCHRUN)):
        out = work / f"torchrun_{name}"
        _run([*launcher, ROOT / "classify.py", *common, "--output_dir", out, "--scores_out", out / "s.npy"], env)
        _run([*launcher, ROOT / "generate_cams.py", "--dataset", "voc2012", "--img_root",
              helpers.golden_image_path(dataset, "x").parent, "--split_file", out / LABEL_FILE.format(dataset),
              "--model", helpers.TINY_CHECKPOINT, "--device", device, "--cam_out_dir", out / "cams"], env)
        outs[name] = out
    one, two = outs["one"], outs["two"]
    if (one / LABEL_FILE.format(dataset)).read_bytes() != (two / LABEL_FILE.format(dataset)).read_bytes():
        raise Check("label files differ")
    score_diff = float(np.abs(np.load(one / "s.npy") - np.load(two / "s.npy")).max())
    cam_diff = 0.0
    for path in sorted((one / "cams").glob("*.npy")):
        k1, m1 = load_cam(path)
        k2, m2 = load_cam(two / "cams" / path.name)
        if k1.tolist() != k2.tolist():
            raise Check(f"{path.name}: CAM keys differ")
        cam_diff = max(cam_diff, float(np.abs(m1.astype(np.float32) - m2.astype(np.float32)).max()))
    if score_diff > SCHEDULE_ATOL or cam_diff > SCHEDULE_ATOL:
        raise Check(f"scores max |diff| {score_diff:.1e}, CAMs {cam_diff:.1e}")
    same = "identical" if score_diff == cam_diff == 0.0 else f"within {SCHEDULE_ATOL}"
    return f"{backend} ({gpus} GPU(s)): label file identical, scores and CAM files {same}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip_torchrun", action="store_true")
    p.add_argument("--only", default=None, help="run the checks whose name contains this text")
    p.add_argument("--work", default=None, help="folder for the outputs (default: a new temporary folder)")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ["TAGCLIP_CACHE"] = str(work / "cache")
    checks = [(f"classify parity {ds}", lambda ds=ds: check_classify(ds, args.device, work))
              for ds in helpers.GOLDEN_DATASETS]
    checks += [(f"CAM parity {v}", lambda v=v: check_cams(v, args.device, work)) for v in VARIANTS]
    checks += [(f"mIoU {'with' if crf else 'without'} CRF {v}", lambda v=v, crf=crf: check_miou(v, crf, work))
               for v in VARIANTS for crf in (False, True)]
    checks += [("GPU schedule = CPU schedule", lambda: check_schedules(args.device)),
               ("pinned staging", lambda: check_pinned(args.device))]
    if not args.skip_torchrun:
        checks.append(("torchrun 2 processes = 1 process", lambda: check_torchrun(args.device, work)))
    if args.only:
        checks = [(name, fn) for name, fn in checks if args.only in name]
    print(f"# correctness on {args.device}: torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.device(args.device).type == "cuda" else ""), flush=True)
    failed = 0
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            status, detail = "PASS", fn()
        except Check as err:
            status, detail = "FAIL", str(err)
        except Exception as err:  # noqa: BLE001 - a crash is a failed check; the report goes on
            status, detail = "FAIL", f"{type(err).__name__}: {err}"
            traceback.print_exc(file=sys.stderr)
        failed += status == "FAIL"
        print(f"{status} {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"# {len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
