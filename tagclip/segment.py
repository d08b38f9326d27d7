"""``tagclip segment DIR --classes ...``: from a folder of images and a class list to masks.

The same library code as the paper scripts, in one run: TagCLIP tags every image
(:class:`tagclip.Tagger`), CLIP-ES turns each image's tags into refined CAMs
(:func:`clip_es.cams.compute_cams`), the argmax with the background score of SPEC §6 (or the
dense CRF with ``--crf``) gives the label map, written as a palette PNG (value = 1 + index of the
class in ``--classes``, 0 = background, 255 = below ``--confidence_threshold``), with a picture
of the image beside its mask and a colour legend.

Choices for an open vocabulary (the paper fixes them per dataset): the CAM stage uses the
class names as given (no synonyms), the ``--background`` words or else the single word
``background`` (as COCO-Stuff does), and the COCO settings for affinity blocks and box
threshold (``tagclip.registry.COCO_AFFINITY_LAYERS``, ``COCO_CAM_BOX_THRESHOLD``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import InputError
from .images import iter_image_files, load_model_input
from .labels import write_text_atomic
from .registry import COCO_AFFINITY_LAYERS, COCO_CAM_BOX_THRESHOLD, CamConfig, EvalConfig
from .vocab import COCO_STUFF_CAM_BACKGROUND

DEFAULT_OUT = "./segment_out"
LEGEND_FILE = "classes.json"


def add_segment_arguments(p) -> None:
    from .cli import add_run_arguments
    p.add_argument("img_root", help="image folder (every image in it is segmented)")
    add_run_arguments(p)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--crf", action="store_true", help="refine the masks with the dense CRF (SPEC §6)")
    p.add_argument("--confidence_threshold", type=float, default=None,
                   help="pixels whose winning score is below this become 255 (ignored by trainers)")


def run_segment(args) -> int:
    import clip
    from clip_es.cams import compute_cams, encode_cam_text, save_cam
    from clip_es.cli import file_size_hw
    from clip_es.crf import crf_predict
    from clip_es.evaluation import predict, read_bgr
    from clip_es.masks import write_label_png

    from .cli import default_device, parse_word_list, report_failures
    from .vis import mask_comparison
    from .tagger import Tagger

    names = parse_word_list(args.classes)
    if not names:
        raise InputError("--classes", "tagclip segment needs your class names (--classes 'cat,dog' or a file)")
    background = parse_word_list(args.background)
    if args.exif_transpose:
        raise InputError("--exif_transpose", "not supported by tagclip segment: masks follow the stored "
                                             "pixel layout, as the datasets' masks do")
    files = iter_image_files(args.img_root)
    device = args.device or default_device()
    model = clip.load(args.model_path, device=device, cache_dir=args.model_cache,
                      dtype=clip.precision_dtype(getattr(args, "precision", None) or "fp32"))
    tagger = Tagger(model, names, background, use_text_cache=not args.no_text_cache, batch_size=1)
    cam_cfg = CamConfig(tuple(names), tuple(background) or COCO_STUFF_CAM_BACKGROUND,
                        COCO_AFFINITY_LAYERS, COCO_CAM_BOX_THRESHOLD, len(names) + 1)
    eval_cfg = EvalConfig("custom", ("background", *names), True, tuple(range(1, len(names) + 1)))
    cam_text = encode_cam_text(model, cam_cfg)
    out = Path(args.out)
    failures = []
    tags = {}
    for image_id, name in tqdm(files, unit="img", desc="segment", file=sys.stderr):
        path = Path(args.img_root) / name
        try:
            tensor, loaded_hw = load_model_input(path, max_side=args.max_side)
            size_hw = file_size_hw(path, loaded_hw, args.max_side)  # masks at the file's own size
        except InputError as err:
            if args.on_error == "stop":
                raise
            failures.append(err)
            continue
        row = tagger.scores([tensor])
        labels = tagger.labels(row)[0]
        tags[image_id] = {names[c]: round(float(row[0, c]), 6) for c in labels}
        result = compute_cams(model, tensor.to(tagger.device), labels, cam_text, cam_cfg, size_hw)
        save_cam(out / "cams" / f"{image_id}.npy", result.keys, result.attn_highres)
        if args.crf:
            label_map, confidence = crf_predict(result.keys, result.attn_highres, read_bgr(path), eval_cfg)
        else:
            label_map, confidence = predict(result.keys, result.attn_highres, eval_cfg)
        write_label_png(out / "masks" / f"{image_id}.png", label_map,
                        confidence if args.confidence_threshold is not None else None,
                        args.confidence_threshold)
        mask_comparison(path, label_map, None, eval_cfg.class_names, out / "overlays" / f"{image_id}.png",
                        title=f"{image_id}: " + ", ".join(tags[image_id]))
    legend = {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}
    write_text_atomic(out / LEGEND_FILE, json.dumps({"labels": legend, "tags": tags}, indent=1) + "\n")
    print(f"masks: {out / 'masks'}  pictures: {out / 'overlays'}  CAMs: {out / 'cams'}  "
          f"legend and tags: {out / LEGEND_FILE}")
    return report_failures(failures)
