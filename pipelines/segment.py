"""``tagclip segment DIR --classes ...``: from a folder of images and a class list to masks.

The same library code as the paper scripts, in one run: TagCLIP tags every image
(:class:`tagclip.Tagger`, ``--batch_size`` images per forward), CLIP-ES turns each image's tags
into refined CAMs (:func:`clip_es.cams.compute_cams`), the argmax with the background score of
SPEC §6 (or the dense CRF with ``--crf``) gives the label map, written as a palette PNG (value =
1 + index of the class in ``--classes``, 0 = background, 255 = below ``--confidence_threshold``),
with a picture of the image beside its mask and a colour legend.

Choices for an open vocabulary (the paper fixes them per dataset): the CAM stage uses the
class names as given (no synonyms), the ``--background`` words or else the single word
``background`` (as COCO-Stuff does), and the COCO settings for affinity blocks and box
threshold (``clip_es.registry.COCO_AFFINITY_LAYERS``, ``COCO_CAM_BOX_THRESHOLD``).

Every flag it accepts changes what it does (a test holds it to that); flags of ``tagclip tag``
that have no meaning here (``--output_dir``, ``--vis_dir``, ``--workers``, ``--exif_transpose``)
are not accepted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from clip.kernels import AttentionSchedule
from clip.loading import load_model
from clip.preprocess import load_model_input
from clip_es.cam_files import save_cam
from clip_es.cams import compute_cams, encode_cam_text
from clip_es.crf import crf_predict
from clip_es.evaluation import predict, read_bgr
from clip_es.masks import write_label_png
from clip_es.registry import (
    COCO_AFFINITY_LAYERS,
    COCO_CAM_BOX_THRESHOLD,
    COCO_STUFF_CAM_BACKGROUND,
    CamConfig,
    EvalConfig,
)
from tagclip.cli import add_tagging_arguments, method_params, user_vocabulary
from tagclip.labels import check_scores_path, write_scores
from tagclip.method import TagCLIPParams
from tagclip.tagger import Tagger
from toolkit.cli import check_outputs, layers_value, report_failures, settle_precision
from toolkit.errors import InputError, Interrupted
from toolkit.files import write_text_atomic
from toolkit.images import file_size_hw, iter_image_files
from toolkit.palette import IGNORE_LABEL
from toolkit.resume import folder_lock
from toolkit.vis import mask_comparison

DEFAULT_OUT = "./segment_out"
LEGEND_FILE = "classes.json"
# Digits of the tag scores written to the legend file.
LEGEND_SCORE_DIGITS = 6


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("img_root", help="image folder (every image in it is segmented)")
    p.add_argument("--classes", default=None, help="your class names: a file with one per line, or 'cat,dog,sofa'")
    p.add_argument("--background", default=None,
                   help="background words (file or comma list): compete in both softmaxes, never reported "
                        "(default: none for tagging, the word 'background' for the CAMs)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output folder: masks/, overlays/, cams/ and classes.json (default %(default)s); "
                        "masks are written at each file's own size")
    p.add_argument("--crf", action="store_true", help="refine the masks with the dense CRF")
    p.add_argument("--confidence_threshold", type=float, default=None,
                   help="pixels whose winning score is below this become 255 (ignored by trainers)")
    p.add_argument("--scores_out", default=None,
                   help="also write every image's tag scores: .npy, .csv (header of class names) or .json")
    add_tagging_arguments(p)
    p.add_argument("--affinity_layers", type=layers_value, default=None,
                   help="blocks whose maps make the CAMs' affinity (default: the COCO setting, 4-11 of 12 blocks, "
                        "carried to other depths as the README's 'Other CLIP models' says)")


def run_segment(args) -> int:
    if not args.classes:
        raise InputError("--classes", "tagclip segment needs your class names (--classes 'cat,dog' or a file)")
    names, background = user_vocabulary(args.classes, args.background)
    files = iter_image_files(args.img_root)
    settle_precision(args)  # before anything is written
    check_outputs(args.out)
    if args.scores_out:
        check_scores_path(args.scores_out)
    with folder_lock(args.out, "segment"):
        return _segment_locked(args, names, background, files)


def _segment_locked(args, names, background, files) -> int:
    """The run, with the output folder locked against another segment run into it."""
    model = load_model(args.model_path, args.device, args.precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    tagger = Tagger(model, names, background, params=method_params(TagCLIPParams(), args.refine_layers, model),
                    use_text_cache=not args.no_text_cache, batch_size=args.batch_size)
    attention = AttentionSchedule.for_device(tagger.device)
    cam_cfg = CamConfig(names, background or COCO_STUFF_CAM_BACKGROUND,
                        COCO_AFFINITY_LAYERS, COCO_CAM_BOX_THRESHOLD, len(names) + 1, names)
    try:
        cam_cfg = cam_cfg.for_depth(model.visual.transformer.layers, args.affinity_layers)
    except ValueError as err:
        raise InputError("--affinity_layers", str(err)) from None
    eval_cfg = EvalConfig("custom", ("background", *names), True, tuple(range(1, len(names) + 1)))
    cam_text = encode_cam_text(model, cam_cfg)
    out = Path(args.out)
    failures: list[InputError] = []
    tags: dict[str, dict[str, float]] = {}
    scored_ids, scored_rows = [], []

    def fail(err: InputError) -> None:
        if args.on_error == "stop":
            raise err
        failures.append(err)

    def segment_one(image_id: str, path: Path, tensor, size_hw, row) -> None:
        labels = tagger.labels(row[None])[0]
        tags[image_id] = {names[c]: round(float(row[c]), LEGEND_SCORE_DIGITS) for c in labels}
        result = compute_cams(model, tensor.to(tagger.device), labels, cam_text, cam_cfg, size_hw, attention)
        if args.crf:
            label_map, confidence = crf_predict(result.keys, result.attn_highres, read_bgr(path), eval_cfg)
        else:
            label_map, confidence = predict(result.keys, result.attn_highres, eval_cfg)
        save_cam(out / "cams" / f"{image_id}.npy", result.keys, result.attn_highres)
        write_label_png(out / "masks" / f"{image_id}.png", label_map,
                        confidence if args.confidence_threshold is not None else None,
                        args.confidence_threshold)
        mask_comparison(path, label_map, None, eval_cfg.class_names, out / "overlays" / f"{image_id}.png",
                        title=f"{image_id} ({'CRF' if args.crf else 'no CRF'}): " + ", ".join(tags[image_id]))

    try:
        with tqdm(total=len(files), unit="img", desc="segment", file=sys.stderr) as bar:
            for start in range(0, len(files), args.batch_size):
                chunk = []  # (id, path, model input, file (H, W)) of the readable images
                for image_id, name in files[start:start + args.batch_size]:
                    path = Path(args.img_root) / name
                    try:
                        tensor, loaded_hw = load_model_input(path, max_side=args.max_side, patch_size=tagger.patch_size)
                        chunk.append((image_id, path, tensor, file_size_hw(path, loaded_hw, args.max_side)))
                    except InputError as err:
                        fail(err)
                rows = tagger.scores([tensor for _, _, tensor, _ in chunk]) if chunk else []
                for (image_id, path, tensor, size_hw), row in zip(chunk, rows):
                    try:
                        segment_one(image_id, path, tensor, size_hw, row)
                    except InputError as err:  # e.g. a file PIL reads but OpenCV (the CRF image) cannot
                        tags.pop(image_id, None)
                        fail(err)
                        continue
                    scored_ids.append(image_id)
                    scored_rows.append(row)
                bar.update(len(files[start:start + args.batch_size]))
    except KeyboardInterrupt:
        raise Interrupted(f"the outputs of {len(scored_ids)} of {len(files)} image(s) are in {out}; tagclip segment "
                          "does not resume: a rerun redoes every image") from None
    legend = {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}
    write_text_atomic(out / LEGEND_FILE, json.dumps({
        "labels": legend,                                              # mask value -> name
        "class_index": {n: i for i, n in enumerate(names)},            # 0-based, as label and score files
        "mask_value": {n: i + 1 for i, n in enumerate(names)},         # 1-based, as the masks (0: background)
        "ignore_value": IGNORE_LABEL,                                  # below --confidence_threshold
        "crf": bool(args.crf),
        "tags": tags}, indent=1) + "\n")
    if args.scores_out and scored_rows:
        write_scores(args.scores_out, scored_ids, names, torch.stack(scored_rows))
    print(f"segmented {len(scored_ids)} of {len(files)} image(s): masks {out / 'masks'}, pictures "
          f"{out / 'overlays'}, CAMs {out / 'cams'}, legend and tags {out / LEGEND_FILE}"
          + (f", scores {args.scores_out}" if args.scores_out and scored_rows else ""))
    return report_failures(failures)
