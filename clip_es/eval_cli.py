"""Command line of ``eval_cam.py`` and ``eval_cam_with_crf.py`` (SPEC §6).

Both take the reference's flags plus ``--dataset`` (required: the class count is never
guessed from a folder name, quirk Q9). Bad input ends the run with one
``error: <file>: <problem>`` line and exit status 2; with ``--on_error skip`` the failing
images are left out of the evaluation, listed at the end, and the exit status is 1.
Pseudo masks (``--pseudo_mask_save_path``) are palette PNGs written atomically.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from clip_es.cam_files import cam_path
from clip_es.masks import write_label_png
from toolkit import sharding
from toolkit.cli import (
    HelpFormatter,
    add_on_error_argument,
    add_vis_argument,
    finite_float,
    guarded,
    positive_int,
    report_failures,
)
from toolkit.errors import InputError, Interrupted
from toolkit.files import cache_dir, file_stamp, writable_dir, write_text_atomic
from toolkit.resume import RESUME_DIR, HistJournal, folder_lock, run_key
from toolkit.splits import image_path, read_split
from toolkit.vis import bar_chart, mask_comparison

from .evaluation import (
    CAM_TYPE,
    DEFAULT_CAM_EVAL_THRES,
    FALLBACK_THRES,
    Scores,
    SegEvaluator,
    check_dir,
    check_same_size,
    format_scores,
    gt_path,
    predict,
    read_bgr,
    read_cam,
    read_gt,
    select_threshold,
    threshold_candidates,
)
from .registry import EVAL_CONFIGS, EvalConfig, get_eval_config

MASK_EXT = ".png"
# prctl option: the signal the kernel sends a process when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
# How often a CRF pool worker checks that the run that started it still exists.
PARENT_POLL_S = 1.0
# Exit status of a pool worker that outlived its run.
EXIT_ORPHANED_WORKER = 3
JOURNAL_SUFFIX = ".journal"


# ----------------------------------------------------------------------------- arguments

def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=list(EVAL_CONFIGS),
                   help="class set of the CAMs and GT masks (voc2012: 21, coco2017: 81, cocostuff: 27 "
                        "coarse classes); never guessed from a folder name")
    p.add_argument("--cam_out_dir", required=True, help="folder of {id}.npy CAM files")
    p.add_argument("--split_file", required=True, help="split file: one 'id [labels...]' line per image")
    p.add_argument("--pseudo_mask_save_path", default=None,
                   help="write one palette PNG label map per image into this folder")
    p.add_argument("--confidence_threshold", type=finite_float, default=None,
                   help="in the saved pseudo masks, pixels whose winning score (CRF: max of Q) is below this "
                        "become 255 (off by default; the evaluation always uses every pixel)")
    p.add_argument("--save_scores", default=None,
                   help="also write the scores as JSON to this file (NaN as null)")
    add_on_error_argument(p, "a bad image (CAM, GT or image file)")
    add_vis_argument(p, "{id}.png (prediction beside the GT, with a colour legend) and iou_per_class.png")


def eval_cam_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_cam.py", formatter_class=HelpFormatter,
        description="Evaluate CLIP-ES CAMs (argmax with background) against GT masks.")
    _common_arguments(p)
    p.add_argument("--cam_type", default=CAM_TYPE, choices=(CAM_TYPE,), help="CAM array to evaluate")
    p.add_argument("--cam_eval_thres", type=finite_float, default=DEFAULT_CAM_EVAL_THRES,
                   help="reference background rule: >= 1 (default 2) uses (1 - max)^1; < 1 searches "
                        "constant background scores 0.05..0.6 and keeps the best")
    p.add_argument("--gt_root", required=True, help="folder of {id}.png GT masks")
    p.add_argument("--img_root", "--image_root", dest="image_root", default=None,
                   help="folder of {id}.jpg images, only for the --vis_dir pictures (without it they "
                        "show prediction and GT only)")
    return p


def eval_crf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_cam_with_crf.py", formatter_class=HelpFormatter,
        description="Dense-CRF post-processing of CLIP-ES CAMs: pseudo masks and/or evaluation.")
    _common_arguments(p)
    p.add_argument("--gt_root", default=None,
                   help="folder of {id}.png GT masks (needed with --eval_only; evaluated whenever given)")
    p.add_argument("--img_root", "--image_root", dest="image_root", required=True,
                   help="folder of {id}.jpg images (--image_root: the authors' spelling)")
    p.add_argument("--eval_only", action="store_true",
                   help="evaluate only; write no pseudo masks")
    p.add_argument("--cam_eval_thres", type=finite_float, default=DEFAULT_CAM_EVAL_THRES,
                   help="accepted for compatibility and ignored: the CRF always uses (1 - max)^1")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="worker processes (default: the number of CPUs)")
    return p


# ----------------------------------------------------------------------------- helpers

class Failure(NamedTuple):
    image_id: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _read_ids(split_file) -> list[str]:
    return [entry.id for entry in read_split(split_file)]


def _mask_path(mask_dir, image_id: str) -> Path:
    return Path(mask_dir) / f"{image_id}{MASK_EXT}"


def _check_outputs(args, mask_dir) -> Optional[Path]:
    """The pseudo-mask folder (if any), --vis_dir and --save_scores' folder, checked writable
    before any image is read; returns the mask folder."""
    if args.save_scores:
        writable_dir(Path(args.save_scores).parent, "scores folder")
    if getattr(args, "vis_dir", None):
        writable_dir(args.vis_dir, "picture folder")
    return writable_dir(mask_dir, "pseudo-mask folder") if mask_dir else None


def _scores_json(config: EvalConfig, scores: Scores, images: int, extra: dict) -> str:
    def num(v: float):
        return None if math.isnan(v) else float(v)

    out = {"dataset": config.name, "num_classes": config.num_classes, "images": images, **extra,
           "class_names": list(config.class_names)}
    ref = scores.as_dict()
    for key in ("Pixel Accuracy", "Mean Accuracy", "Frequency Weighted IoU", "Mean IoU"):
        out[key] = num(ref[key])
    out["Class IoU"] = {str(i): num(v) for i, v in ref["Class IoU"].items()}
    out["present"] = [bool(x) for x in scores.present]
    return json.dumps(out, indent=1) + "\n"


def _report(config: EvalConfig, evaluator: SegEvaluator, args, thres: Optional[float],
            failures: Sequence[Failure], extra: dict) -> int:
    scores = evaluator.scores()
    print(format_scores(scores, config.class_names, thres), end="")
    if evaluator.unexpected_gt_pixels:
        print(f"warning: {evaluator.unexpected_gt_pixels} GT pixels hold values outside 0..{config.num_classes - 1} "
              f"and 255 and were ignored; is --dataset {config.name} right?", file=sys.stderr)
    if args.save_scores:
        write_text_atomic(args.save_scores, _scores_json(config, scores, evaluator.images, extra))
    _summary(args, evaluator.images, failures, scores.miou)
    return report_failures(failures)


def _summary(args, images: int, failures: Sequence[Failure], miou: Optional[float] = None) -> None:
    """The run's last stdout line: what was done, what was skipped, where the outputs are."""
    masks = None if getattr(args, "eval_only", False) else args.pseudo_mask_save_path
    outputs = [f"{what} {where}" for what, where in (("pseudo masks", masks), ("scores", args.save_scores),
                                                     ("pictures", args.vis_dir)) if where]
    done = f"evaluated {images} image(s)" if miou is not None else f"processed {images} image(s)"
    print(done + f" ({len(failures)} skipped)" + (f": mIoU {miou:.4f}" if miou is not None else "")
          + ("; " + ", ".join(outputs) if outputs else ""))


def _draw_comparison(args, config: EvalConfig, image_id: str, labels, gt, thres) -> None:
    """``--vis_dir`` picture of one image: image (if ``--image_root``) | prediction | GT."""
    image = None
    if args.image_root:
        try:
            bgr = read_bgr(image_path(args.image_root, image_id))
            check_same_size(image_path(args.image_root, image_id), bgr.shape[:2], labels.shape, "image")
            image = bgr[..., ::-1]
        except InputError as err:  # a picture problem never changes the evaluation
            print(f"warning: {err} (picture without the image)", file=sys.stderr)
    mask_comparison(image, labels, gt, config.class_names, _vis_file(args, image_id),
                    title=f"{image_id} (CAM, thres {thres})" if config.has_background else f"{image_id} (CAM)")


def _vis_file(args, image_id: str) -> Optional[str]:
    vis_dir = getattr(args, "vis_dir", None)
    return str(Path(vis_dir) / f"{image_id}.png") if vis_dir else None


def _iou_chart(args, config: EvalConfig, evaluator: SegEvaluator, title: str) -> None:
    """``--vis_dir``: per-class IoU bars (classes never seen in GT or prediction as n/a)."""
    if not getattr(args, "vis_dir", None):
        return
    scores = evaluator.scores()
    bar_chart(config.class_names, scores.class_iou.tolist(),
              f"{title}: IoU per class (mIoU {scores.miou:.4f} over the classes in the GT, {evaluator.images} images)",
              Path(args.vis_dir) / "iou_per_class.png", xlabel="IoU", counted=scores.present.tolist())
    print(f">>>pictures written to {args.vis_dir}")


def _fail(failures: list, image_id: str, err: InputError, on_error: str) -> None:
    if on_error == "stop":
        raise err
    failures.append(Failure(image_id, err.path, err.problem))


# ----------------------------------------------------------------------------- eval_cam.py

def _load_cam_and_gt(args, config: EvalConfig, image_id: str):
    keys, cams = read_cam(cam_path(args.cam_out_dir, image_id), config, args.cam_type)
    gt_file = gt_path(args.gt_root, image_id)
    gt = read_gt(gt_file, config)
    check_same_size(gt_file, gt.shape, cams.shape[1:], "GT mask")
    return keys, cams, gt


def run_eval_cam(args) -> int:
    config = get_eval_config(args.dataset)
    ids = _read_ids(args.split_file)
    check_dir(args.cam_out_dir, "CAM folder")
    check_dir(args.gt_root, "GT folder")
    mask_dir = _check_outputs(args, args.pseudo_mask_save_path)
    if mask_dir is None:
        return _eval_cam(args, config, ids, mask_dir)
    with folder_lock(mask_dir, "eval_cam"):
        return _eval_cam(args, config, ids, mask_dir)


def _eval_cam(args, config: EvalConfig, ids: Sequence[str], mask_dir: Optional[Path]) -> int:
    """eval_cam.py once its inputs and outputs are checked (and its mask folder locked)."""
    print(f"{len(ids)} images to eval")

    # COCO-Stuff has no background channel, so there is no threshold to choose.
    candidates = threshold_candidates(args.cam_eval_thres) if config.has_background else (1,)
    tried = list(candidates) + ([FALLBACK_THRES] if config.has_background else [])
    evaluators = {t: SegEvaluator(config.num_classes) for t in tried}
    write_now = mask_dir is not None and len(candidates) == 1
    failures: list[Failure] = []
    for image_id in tqdm(ids, unit="img", desc="eval", file=sys.stderr):
        try:
            keys, cams, gt = _load_cam_and_gt(args, config, image_id)
        except InputError as err:
            _fail(failures, image_id, err, args.on_error)
            continue
        for t in tried:
            labels, confidence = predict(keys, cams, config, t)
            evaluators[t].update(labels, gt)
            if write_now and t == candidates[0]:
                write_label_png(_mask_path(mask_dir, image_id), labels, confidence, args.confidence_threshold)

    if config.has_background:
        mious = [(t, evaluators[t].scores().miou) for t in candidates]
        for t, miou in mious:
            print(f"thres:{t}, mIoU:{miou}")
        final = select_threshold(mious)
    else:
        final = candidates[0]

    write_masks = mask_dir is not None and not (write_now and final == candidates[0])
    draw = bool(getattr(args, "vis_dir", None))
    if write_masks or draw:  # one more pass at the chosen threshold: each CAM read once
        failed = {f.image_id for f in failures}
        for image_id in tqdm(ids, unit="img", desc="masks" if write_masks else "pictures", file=sys.stderr):
            if image_id in failed:
                continue
            keys, cams, gt = _load_cam_and_gt(args, config, image_id)
            labels, confidence = predict(keys, cams, config, final)
            if write_masks:
                write_label_png(_mask_path(mask_dir, image_id), labels, confidence, args.confidence_threshold)
            if draw:
                _draw_comparison(args, config, image_id, labels, gt, final)
    if mask_dir is not None:
        print(f">>>pseudo masks written to {mask_dir}")
    if draw:
        _iou_chart(args, config, evaluators[final], "CAM")
    extra = {"thres": final} if config.has_background else {}
    return _report(config, evaluators[final], args, final if config.has_background else None, failures, extra)


# ----------------------------------------------------------------------------- eval_cam_with_crf.py

class CrfTask(NamedTuple):
    image_id: str
    dataset: str
    cam_file: str
    image_file: str
    gt_file: Optional[str]
    mask_file: Optional[str]
    confidence_threshold: Optional[float]
    vis_file: Optional[str] = None      # --vis_dir: comparison picture of this image


class CrfResult(NamedTuple):
    image_id: str
    hist: Optional[np.ndarray]           # confusion matrix of this image (None without GT)
    unexpected_gt_pixels: int
    error: Optional[tuple]               # (path, problem) of an InputError


def crf_worker(task: CrfTask) -> CrfResult:
    """One image: CRF labels, optional pseudo mask, confusion matrix (runs in a worker process).

    Bad input comes back as ``(path, problem)`` rather than as an exception object.
    """
    from .crf import crf_predict

    config = get_eval_config(task.dataset)
    try:
        keys, cams = read_cam(task.cam_file, config)
        bgr = read_bgr(task.image_file)
        check_same_size(task.image_file, bgr.shape[:2], cams.shape[1:], "image")
        gt = None
        if task.gt_file is not None:
            gt = read_gt(task.gt_file, config)
            check_same_size(task.gt_file, gt.shape, cams.shape[1:], "GT mask")
        labels, confidence = crf_predict(keys, cams, bgr, config)
        if task.mask_file is not None:
            write_label_png(task.mask_file, labels, confidence, task.confidence_threshold)
        if task.vis_file is not None:
                    mask_comparison(bgr[..., ::-1], labels, gt, config.class_names, task.vis_file,
                            title=f"{task.image_id} (CRF)")
    except InputError as err:
        return CrfResult(task.image_id, None, 0, (err.path, err.problem))
    if gt is None:
        return CrfResult(task.image_id, None, 0, None)
    evaluator = SegEvaluator(config.num_classes).update(labels, gt)
    return CrfResult(task.image_id, evaluator.hist, evaluator.unexpected_gt_pixels, None)


def _exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: the worker ends when the run that started it ends, even by
    SIGKILL (which gives the run no chance to stop its pool). On Linux the kernel kills the
    worker at once (PR_SET_PDEATHSIG); everywhere a watcher thread ends it within
    PARENT_POLL_S once it has been handed to another parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    first_parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != first_parent or not _alive(parent):
                os._exit(EXIT_ORPHANED_WORKER)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (a recycled pid)
        return True
    return True


def _run_tasks(tasks: Sequence[CrfTask], jobs: int):
    """Yield the results in task order (a process pool when ``jobs > 1``, whose workers end
    with this process however it ends)."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield crf_worker(task)
        return
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), initializer=_exit_with_parent,
                               initargs=(os.getpid(),))
    try:
        futures = [pool.submit(crf_worker, task) for task in tasks]
        for i in range(len(futures)):
            result = futures[i].result()
            futures[i] = None  # drop the finished result
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_eval_crf(args) -> int:
    return sharding.sharded(_run_eval_crf, args, "cpu")  # the CRF runs on CPUs: gloo


def _crf_journal(args, config: EvalConfig, mask_dir, shard: sharding.Shard) -> HistJournal:
    """Per-image confusion matrices of this run (resume after an interruption). It lives in the
    pseudo-mask folder, or for --eval_only runs (no output folder) in the cache's resume folder."""
    key = run_key(dataset=config.name, cams=str(Path(args.cam_out_dir).resolve()),
                  gt=args.gt_root and str(Path(args.gt_root).resolve()),
                  images=str(Path(args.image_root).resolve()), split=str(Path(args.split_file).resolve()),
                  masks=mask_dir and str(Path(mask_dir).resolve()), threshold=args.confidence_threshold)
    folder = Path(mask_dir) if mask_dir is not None else cache_dir() / RESUME_DIR
    return HistJournal(folder / f".eval_cam_with_crf.{key[:12]}{shard.tag}{JOURNAL_SUFFIX}", key, config.num_classes)


def _evaluate_share(args, config: EvalConfig, ids: Sequence[str], mask_dir: Optional[Path],
                    journal: HistJournal) -> tuple[SegEvaluator, list[Failure]]:
    """This process's images: resume from ``journal``, CRF the rest (a ``--jobs`` pool),
    journal each confusion matrix as it arrives; the journal goes once the share is complete."""
    stamps = {i: file_stamp(cam_path(args.cam_out_dir, i)) for i in ids}
    done = journal.valid(stamps, keep=lambda i, _: mask_dir is None or _mask_path(mask_dir, i).exists())
    journal.start(done)
    if done:
        print(f"resuming: {len(done)} image(s) already evaluated")
    ids = [i for i in ids if i not in done]

    tasks = [CrfTask(image_id, config.name, str(cam_path(args.cam_out_dir, image_id)),
                     str(image_path(args.image_root, image_id)),
                     str(gt_path(args.gt_root, image_id)) if args.gt_root else None,
                     str(_mask_path(mask_dir, image_id)) if mask_dir is not None else None,
                     args.confidence_threshold, _vis_file(args, image_id))
             for image_id in ids]
    evaluator = SegEvaluator(config.num_classes)
    failures: list[Failure] = []
    try:
        with closing(_run_tasks(tasks, args.jobs)) as results, \
                tqdm(total=len(stamps), initial=len(done), unit="img", desc="crf", file=sys.stderr) as bar:
            for result in results:
                bar.update(1)
                if result.error is not None:
                    _fail(failures, result.image_id, InputError(*result.error), args.on_error)
                else:
                    if result.hist is not None:
                        evaluator.add_hist(result.hist, 1, result.unexpected_gt_pixels)
                    hist = result.hist if result.hist is not None else np.zeros_like(evaluator.hist)
                    journal.append([result.image_id], [stamps[result.image_id]],
                                   [(hist, result.unexpected_gt_pixels)])
    except KeyboardInterrupt:
        raise Interrupted(f"{len(journal.load())} of {len(stamps)} image(s) are evaluated and kept in {journal.path}; "
                          "the same command resumes from there") from None
    if args.gt_root:
        for _, (hist, unexpected) in done.values():
            evaluator.add_hist(hist, 1, unexpected)
    if not failures:
        journal.remove()  # this rank's share is complete
    return evaluator, failures


def _run_eval_crf(args, shard: sharding.Shard) -> int:
    """Under torchrun every rank takes images j ≡ rank (mod K) (with its own ``--jobs`` pool),
    writes their masks and pictures, and rank 0 sums the confusion matrices and reports."""
    config = get_eval_config(args.dataset)
    if args.eval_only and not args.gt_root:
        raise InputError("--gt_root", "required with --eval_only")
    if not args.eval_only and not args.pseudo_mask_save_path:
        raise InputError("--pseudo_mask_save_path", "required unless --eval_only is given")
    ids = _read_ids(args.split_file)
    check_dir(args.cam_out_dir, "CAM folder")
    check_dir(args.image_root, "image folder")
    if args.gt_root:
        check_dir(args.gt_root, "GT folder")
    mask_dir = _check_outputs(args, None if args.eval_only else args.pseudo_mask_save_path)
    if shard.is_main:
        print(f"{len(ids)} images to eval")
        print(f"# jobs: {args.jobs}" + (f" in each of {shard.world} processes" if shard.world > 1 else ""))
    n_images = len(ids)
    ids = [ids[i] for i in sharding.owned_indices(len(ids), 1, shard)]
    journal = _crf_journal(args, config, mask_dir, shard)
    folder = writable_dir(journal.path.parent, "resume folder")
    with folder_lock(folder, journal.path.name.lstrip(".").removesuffix(JOURNAL_SUFFIX)):
        evaluator, failures = _evaluate_share(args, config, ids, mask_dir, journal)
    gathered = sharding.gather((evaluator, failures), shard)
    if not shard.is_main:
        return 0
    evaluator, failures = SegEvaluator(config.num_classes), []
    for part, part_failures in gathered:
        evaluator.merge(part)
        failures.extend(part_failures)
    if mask_dir is not None:
        print(f">>>pseudo masks written to {mask_dir}")
    if args.gt_root:
        _iou_chart(args, config, evaluator, "CRF")
    elif getattr(args, "vis_dir", None):
        print(f">>>pictures written to {args.vis_dir}")
    if not args.gt_root:
        _summary(args, n_images - len(failures), failures)
        return report_failures(failures)
    return _report(config, evaluator, args, None, failures, {"crf": True})


# ----------------------------------------------------------------------------- entry points

def eval_cam_main(argv: Optional[Sequence[str]] = None) -> int:
    return guarded(run_eval_cam, eval_cam_parser().parse_args(argv))


def eval_crf_main(argv: Optional[Sequence[str]] = None) -> int:
    return guarded(run_eval_crf, eval_crf_parser().parse_args(argv))
