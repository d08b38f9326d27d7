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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
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
from tagclip.registry import REL_THRESHOLD
from tagclip.tagger import DEFAULT_BATCH_SIZE, Tagger
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


def open_cam_config(names: Sequence[str], background: Sequence[str], depth: int,
                    affinity_layers: Optional[Sequence[int]] = None) -> CamConfig:
    """The CAM stage's settings for an open vocabulary (this module's docstring) and a vision
    tower of ``depth`` blocks; ValueError for an affinity block the tower does not have."""
    names = tuple(names)
    return CamConfig(names, tuple(background) or COCO_STUFF_CAM_BACKGROUND, COCO_AFFINITY_LAYERS,
                     COCO_CAM_BOX_THRESHOLD, len(names) + 1, names).for_depth(depth, affinity_layers)


@dataclass(frozen=True)
class SegmentResult:
    """One image through tags -> CAMs -> label map."""
    labels: list[int]            # TagCLIP's tags: indices into the class names
    keys: np.ndarray             # the CAM classes (the tags), as in the CAM files
    attn_highres: np.ndarray     # (K, H, W) refined CAMs at the image's (H, W)
    label_map: np.ndarray        # (H, W) uint8: 0 background, 1 + class index
    confidence: np.ndarray       # (H, W) the winning score of every pixel


class Segmenter:
    """TagCLIP's tags, then CLIP-ES's CAMs of them, then a label map: what ``tagclip segment``
    and ``tagclip app`` do with every image, over one vocabulary. Text features of both stages
    are encoded once, here.

    The open-vocabulary choices of this module's docstring apply: the CAM stage uses the
    class names as given, ``background`` or else the word ``background``, and the COCO
    affinity blocks and box threshold (:func:`open_cam_config`; ``cam_config`` replaces them).
    """

    def __init__(self, model, names: Sequence[str], background: Sequence[str] = (),
                 params: TagCLIPParams = TagCLIPParams(), label_threshold: float = REL_THRESHOLD,
                 refine_layers: Optional[Sequence[int]] = None, cam_config: Optional[CamConfig] = None,
                 use_text_cache: bool = True, batch_size: int = DEFAULT_BATCH_SIZE):
        """``cam_config``: the CAM stage's settings (default :func:`open_cam_config` for this
        model). ValueError for a bad vocabulary (:func:`tagclip.tagger.check_vocabulary`)."""
        self.model = model
        self.tagger = Tagger(model, names, background, params=method_params(params, refine_layers, model),
                             label_threshold=label_threshold, use_text_cache=use_text_cache,
                             batch_size=batch_size)
        names, background = self.tagger.class_names, self.tagger.background
        self.attention = AttentionSchedule.for_device(self.tagger.device)
        self.cam_config = cam_config or open_cam_config(names, background, model.visual.transformer.layers)
        self.eval_config = EvalConfig("custom", ("background", *names), True, tuple(range(1, len(names) + 1)))
        self.cam_text = encode_cam_text(model, self.cam_config)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.tagger.class_names

    def segment(self, image: torch.Tensor, size_hw: tuple[int, int], scores: torch.Tensor,
                crf_bgr: Optional[np.ndarray] = None) -> SegmentResult:
        """One image: its model input, the (H, W) of the maps, its row of :meth:`Tagger.scores`;
        ``crf_bgr``: the 8-bit BGR image at (H, W) to refine the label map with the dense CRF
        (None: the argmax with the background score)."""
        labels = self.tagger.labels(scores[None])[0]
        cams = compute_cams(self.model, image.to(self.tagger.device), labels, self.cam_text, self.cam_config,
                            size_hw, self.attention)
        if crf_bgr is not None:
            label_map, confidence = crf_predict(cams.keys, cams.attn_highres, crf_bgr, self.eval_config)
        else:
            label_map, confidence = predict(cams.keys, cams.attn_highres, self.eval_config)
        return SegmentResult(labels, cams.keys, cams.attn_highres, label_map, confidence)


def _segment_locked(args, names, background, files) -> int:
    """The run, with the output folder locked against another segment run into it."""
    model = load_model(args.model_path, args.device, args.precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    try:
        cam_config = open_cam_config(names, background, model.visual.transformer.layers, args.affinity_layers)
    except ValueError as err:
        raise InputError("--affinity_layers", str(err)) from None
    segmenter = Segmenter(model, names, background, refine_layers=args.refine_layers, cam_config=cam_config,
                          use_text_cache=not args.no_text_cache, batch_size=args.batch_size)
    tagger = segmenter.tagger
    out = Path(args.out)
    failures: list[InputError] = []
    tags: dict[str, dict[str, float]] = {}
    scored_ids, scored_rows = [], []

    def fail(err: InputError) -> None:
        if args.on_error == "stop":
            raise err
        failures.append(err)

    def segment_one(image_id: str, path: Path, tensor, size_hw, row) -> None:
        result = segmenter.segment(tensor, size_hw, row, read_bgr(path) if args.crf else None)
        tags[image_id] = {names[c]: round(float(row[c]), LEGEND_SCORE_DIGITS) for c in result.labels}
        save_cam(out / "cams" / f"{image_id}.npy", result.keys, result.attn_highres)
        write_label_png(out / "masks" / f"{image_id}.png", result.label_map,
                        result.confidence if args.confidence_threshold is not None else None,
                        args.confidence_threshold)
        mask_comparison(path, result.label_map, None, segmenter.eval_config.class_names,
                        out / "overlays" / f"{image_id}.png",
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
