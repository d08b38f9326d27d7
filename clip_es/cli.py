"""Command line of the CLIP-ES stage: ``generate_cams.py`` (SPEC §5).

One script for the three segmentation datasets (``--dataset``; the reference had one script
per dataset and guessed nothing else, quirk Q9). It takes the reference's flags and writes
the reference's CAM files, so the reference's evaluation reads them unchanged.

Bad input ends the run with one ``error: <file>: <problem>`` line and exit status 2; with
``--on_error skip`` unreadable images are listed at the end and the exit status is 1.

Resume: the CAM folder keeps a journal (``.generate_cams*.journal``) keyed by everything that
changes a CAM (checkpoint SHA256, precision, the dataset's CAM settings, ``--max_side``, the
device type, the image folder). A rerun keeps an image's CAM file only if the journal of the
same key lists it for the same labels, the image file is unchanged and the CAM file is still
the one written; every other image is redone (``--overwrite`` redoes all). So a run in
another precision, or with another checkpoint, into the same folder rewrites the CAMs.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from clip.kernels import AttentionSchedule
from clip.loading import checkpoint_identity, load_model
from clip.preprocess import load_model_input
from clip_es.cam_files import MAX_CAM_CLASSES, cam_path, load_cam, save_cam
from clip_es.cams import CAM_TEMPLATE, compute_cams, encode_cam_text
from toolkit import sharding
from toolkit.cli import (
    HelpFormatter,
    add_max_side_argument,
    add_model_arguments,
    add_on_error_argument,
    add_vis_argument,
    check_outputs,
    guarded,
    layers_value,
    report_failures,
    settle_precision,
)
from toolkit.errors import InputError, Interrupted
from toolkit.files import file_stamp
from toolkit.images import file_size_hw
from toolkit.prefetch import prefetched
from toolkit.resume import CamJournal, folder_lock, run_key
from toolkit.splits import SplitEntry, image_path, read_split

from .registry import CAM_CONFIGS, GT_SPLIT_LABEL_MAPS, get_cam_config

CAM_DATASETS = tuple(CAM_CONFIGS)


def generate_cams_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_cams.py", formatter_class=HelpFormatter,
        description="CLIP-ES CAMs from a label file: one {cam_out_dir}/{id}.npy per image, "
                    "a dict {'keys': class ids, 'attn_highres': float16 K x H x W} at the image's own size "
                    "(an id without labels gets K = 0). The model runs in float32 on every device "
                    "(--precision changes that).")
    p.add_argument("--dataset", required=True, choices=CAM_DATASETS,
                   help="vocabulary (CAM-stage class names), background words, affinity blocks and box "
                        "threshold of a paper dataset")
    p.add_argument("--img_root", required=True, help="image folder ({img_root}/{id}.jpg)")
    p.add_argument("--split_file", required=True,
                   help="'id l1 l2 ...' per line: a TagCLIP label file (output/<dataset>_val_tagclip.txt) or a "
                        "ground-truth split. Class ids index the dataset's vocabulary (for cocostuff the 171 "
                        "classes) unless --gt_split says they are the dataset's own ids")
    p.add_argument("--gt_split", action="store_true",
                   help="--split_file is a ground-truth split in the dataset's own class ids (for cocostuff the "
                        "182-index ids of imageset/cocostuff/val.txt and `tagclip prepare`), mapped to the CAM "
                        "vocabulary; for voc2012 and coco2017 the two are the same")
    p.add_argument("--cam_out_dir", required=True, help="output folder of the CAM files")
    add_model_arguments(p, names=("--model_path", "--model"))  # --model: the authors' spelling
    add_on_error_argument(p)
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every image (default: keep the CAM files an earlier run with the same "
                        "settings wrote for the same labels)")
    add_max_side_argument(p)
    p.add_argument("--affinity_layers", type=layers_value, default=None,
                   help="blocks whose maps make the affinity, e.g. 4-10 (default: the dataset's blocks for 12-block "
                        "models, 4-10 for voc2012 and 4-11 for coco2017 and cocostuff, carried to other depths as "
                        "the README's 'Other CLIP models' says; the paper gives none for them)")
    add_vis_argument(p, "one heat-map overlay per labelled class, {id}_{classname}.png")
    return p


def read_label_file(path, dataset: str, num_classes: int, gt_split: bool = False) -> list[SplitEntry]:
    """Label-file lines, ids checked against the vocabulary; COCO-Stuff errors say which ids.
    ``gt_split``: the file holds the dataset's own class ids (a ground-truth split), mapped to
    the CAM vocabulary through :data:`~clip_es.registry.GT_SPLIT_LABEL_MAPS` (COCO-Stuff:
    182-index -> 171 classes). A line with more labels than a CAM file may hold
    (MAX_CAM_CLASSES) is refused here, before a CAM file no reader would accept is written."""
    label_map = GT_SPLIT_LABEL_MAPS.get(dataset) if gt_split else None
    try:
        entries = read_split(path, num_classes=num_classes, label_map=label_map)
    except InputError as err:
        if dataset in GT_SPLIT_LABEL_MAPS and not gt_split and "outside the vocabulary" in err.problem:
            raise InputError(err.path, f"{err.problem} (a label file holds the {num_classes} class indices; "
                                       "for a ground-truth split in the dataset's own ids, such as "
                                       "imageset/cocostuff/val.txt, add --gt_split)") from None
        raise
    for entry in entries:
        if len(entry.labels) > MAX_CAM_CLASSES:
            raise InputError(path, f"image {entry.id} lists {len(entry.labels)} labels, more than a CAM file "
                                   f"holds (MAX_CAM_CLASSES = {MAX_CAM_CLASSES})")
    return entries


def _load(path: Path, max_side: Optional[int], patch_size: int):
    """(model input, original (H, W)), or the InputError of an unreadable image."""
    try:
        x, hw = load_model_input(path, max_side=max_side, patch_size=patch_size)
        return x, file_size_hw(path, hw, max_side)
    except InputError as err:
        return err


def draw_overlays(vis_dir, entries: Sequence[SplitEntry], img_root: Path, cam_dir: Path,
                  class_names: Sequence[str]) -> None:
    """``--vis_dir``: heat-map overlays of every labelled class, read back from the CAM files
    (so images kept from an earlier run get pictures too)."""
    from toolkit import vis  # deferred: matplotlib only when pictures are asked for

    for entry in tqdm(entries, unit="img", desc="pictures", file=sys.stderr):
        keys, maps = load_cam(cam_path(cam_dir, entry.id))
        if len(keys):
            vis.cam_overlays(image_path(img_root, entry.id), keys.tolist(),
                             maps.astype("float32"), class_names, vis_dir, entry.id)
    print(f">>>pictures written to {vis_dir}")


def run_generate_cams(args) -> int:
    return sharding.sharded(_run_generate_cams, args, args.device)


JOURNAL_STEM = ".generate_cams"
JOURNAL_SUFFIX = ".journal"


def _cam_journal(out_dir: Path, key: str, shard: sharding.Shard) -> tuple[CamJournal, dict]:
    """This rank's journal and the records of every journal of the same key in the folder
    (so a run keeps what runs with another number of processes wrote)."""
    journal = CamJournal(out_dir / f"{JOURNAL_STEM}{shard.tag}{JOURNAL_SUFFIX}", key)
    done: dict = {}
    for path in sorted(out_dir.glob(f"{JOURNAL_STEM}*{JOURNAL_SUFFIX}")):
        done.update(journal.load(path))
    return journal, done


def _run_generate_cams(args, shard: sharding.Shard) -> int:
    """Under torchrun every rank writes the CAM files of its share of the images (image j
    goes to rank j mod K); a rank's failures are reported by that rank."""
    settle_precision(args, shard.device, shard.is_main)  # before the CAM run key holds it
    cfg = get_cam_config(args.dataset)
    entries = read_label_file(args.split_file, args.dataset, len(cfg.class_names), args.gt_split)
    entries = [entries[i] for i in sharding.owned_indices(len(entries), 1, shard)]
    out_dir = Path(args.cam_out_dir)
    check_outputs(out_dir, vis_dir=args.vis_dir)
    with folder_lock(out_dir, JOURNAL_STEM.lstrip(".") + shard.tag):
        return _generate_locked(args, shard, cfg, entries, out_dir)


def _generate_locked(args, shard: sharding.Shard, cfg, entries: Sequence[SplitEntry], out_dir: Path) -> int:
    """The run, with the CAM folder locked against another run writing the same files."""
    device = shard.device
    print(device)
    print(f">>>>generating {args.split_file}")
    print("image cnt:", len(entries))

    root = Path(args.img_root)
    sha, arch = checkpoint_identity(args.model_path, args.model_cache, args.arch)
    key = run_key(checkpoint=sha, arch=arch.key(), precision=args.precision, cam=cfg, template=CAM_TEMPLATE,
                  affinity_layers=args.affinity_layers,
                  max_side=args.max_side, device=device.type, root=str(root.resolve()))
    journal, done = _cam_journal(out_dir, key, shard)
    paths = {e.id: image_path(root, e.id) for e in entries}
    labels = {e.id: tuple(e.labels) for e in entries}
    kept = {} if args.overwrite else journal.valid(
        {i: file_stamp(p) for i, p in paths.items()},
        keep=lambda i, value: value == (file_stamp(cam_path(out_dir, i)), labels[i]), done=done)
    journal.start(kept)
    if shard.world == 1:  # one process: this journal now holds every record worth keeping
        for other in out_dir.glob(f"{JOURNAL_STEM}.rank*{JOURNAL_SUFFIX}"):
            other.unlink(missing_ok=True)
    todo = [e for e in entries if e.id not in kept]
    if kept:
        print(f"resuming: {len(kept)} CAM file(s) already in {out_dir}")
    failures: list[InputError] = []
    written: set[str] = set()
    try:
        if todo:
            _write_cams(args, device, cfg, todo, paths, out_dir, journal, len(entries), failures, written)
    except KeyboardInterrupt:
        raise Interrupted(f"{len(kept) + len(written)} of {len(entries)} CAM file(s) are written and kept in "
                          f"{out_dir}; the same command resumes from there") from None
    if args.vis_dir:
        # failed images have no CAM file of this run and get no picture
        finished = [e for e in entries if e.id in kept or e.id in written]
        draw_overlays(args.vis_dir, finished, root, out_dir, cfg.display_names)
    who = "" if shard.world == 1 else f" (process {shard.rank + 1} of {shard.world})"
    print(f"CAMs of {len(kept) + len(written)} of {len(entries)} image(s){who} in {out_dir}: {len(written)} written, "
          f"{len(kept)} kept from an earlier run, {len(failures)} skipped"
          + (f"; pictures in {args.vis_dir}" if args.vis_dir else ""))
    return report_failures(failures)


def _write_cams(args, device, cfg, todo: Sequence[SplitEntry], paths: dict, out_dir: Path, journal: CamJournal,
                total: int, failures: list, written: set) -> None:
    """Compute and write the CAM files of ``todo`` (journaled one by one; ids into ``written``,
    unreadable images into ``failures``); the next image decodes while one is computed."""
    model = load_model(args.model_path, device, args.precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    try:
        cfg = cfg.for_depth(model.visual.transformer.layers, args.affinity_layers)
    except ValueError as err:
        raise InputError("--affinity_layers", str(err)) from None
    text = encode_cam_text(model, cfg)
    attention = AttentionSchedule.for_device(device)
    load = functools.partial(_load, max_side=args.max_side, patch_size=model.visual.patch_size)
    with tqdm(total=total, initial=total - len(todo), unit="img", desc="cams", file=sys.stderr) as bar:
        for entry, loaded in zip(todo, prefetched([paths[e.id] for e in todo], load)):
            if isinstance(loaded, InputError):
                if args.on_error == "stop":
                    raise loaded
                failures.append(loaded)
            else:
                image, size_hw = loaded
                result = compute_cams(model, image, entry.labels, text, cfg, size_hw, attention)
                target = cam_path(out_dir, entry.id)
                save_cam(target, result.keys, result.attn_highres)
                journal.append([entry.id], [file_stamp(paths[entry.id])],
                               [(file_stamp(target), tuple(entry.labels))])
                written.add(entry.id)
            bar.update(1)


def generate_cams_main(argv: Optional[Sequence[str]] = None) -> int:
    return guarded(run_generate_cams, generate_cams_parser().parse_args(argv))


__all__ = ["generate_cams_main", "generate_cams_parser", "run_generate_cams", "CAM_DATASETS"]

if __name__ == "__main__":
    sys.exit(generate_cams_main())
