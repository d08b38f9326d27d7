"""Write (or check) the split files of ``imageset/`` from the official dataset releases.

Usage::

    tagclip prepare --dataset {voc2007,voc2012,coco2014,coco2017,cocostuff}
        --root DIR [--out FILE] [--skip_difficult] [--all_images] [--check] [--masks_out DIR] [--overwrite]

Every split line is ``id l1 l2 ...`` with 0-based class ids; ``--out`` defaults to the
registry's ``default_split`` (e.g. ``imageset/voc2007/test_cls.txt``) under the current
directory, the same names as the split files shipped in the repository's ``imageset/``
folder (:data:`IMAGESET_DIR`, the authors' files the paper's tables were computed on).
Outputs are written atomically. A missing or malformed input file is reported as one
``error: <file>: <problem>`` line with exit status 2; a failed ``--check`` exits 1 and writes
nothing.

``--check`` compares the image count with the official one (:data:`EXPECTED_SIZES`) and,
when the shipped split file of the dataset exists, the ids (in order) and the line count with
it. Labels are not compared: they may legitimately differ in convention (e.g. the order of a
VOC image's classes, or difficult objects).

Sources and choices
-------------------
* ``voc2007`` (test, 4952 images) / ``voc2012`` (segmentation val, 1449 images): ``--root`` is
  the year folder (``VOC2007/`` resp. ``VOC2012/``). Ids come from
  ``ImageSets/Main/test.txt`` resp. ``ImageSets/Segmentation/val.txt`` in file order; labels
  from ``Annotations/{id}.xml``: each class once, in order of first appearance in the XML.
  Difficult objects count unless ``--skip_difficult`` (a missing ``<difficult>`` tag means 0);
  an image left with no object gives a line with the id only. A class name outside the 20
  VOC names is an error naming the XML file.
* ``coco2014`` (val, 40137 images) / ``coco2017`` (val, 4952 images): ``--root`` holds
  ``annotations/instances_val2014.json`` resp. ``instances_val2017.json``, indexed with
  pycocotools. An image is listed when it has at least one annotation of any kind, crowd
  annotations included: that is the definition that gives the paper's 40137 (COCO2014) and
  4952 (COCO2017) images, and a crowd-only image contributes its crowd categories as labels.
  Ids are ``COCO_val2014_%012d`` resp. ``%012d``, sorted by image id; labels are ascending
  in the 80-class order, obtained by mapping the JSON's sorted category ids (1..90 minus the
  10 unused ones) to 0..79. The mapped names are checked against ``COCO_CLASSES`` (the
  official names, up to the paper's spellings motorbike, aeroplane, sofa, pottedplant,
  diningtable, tvmonitor).
* ``cocostuff`` (val): ``--root`` holds the official stuffthingmaps PNGs ``val2017/*.png``
  (values 0..181, 255 unlabeled). By default the split is the paper's 4172-image subset of
  the 5000 val2017 images: ids, and their order, are those of the shipped
  ``imageset/cocostuff/val.txt``; each id's labels are computed from ``val2017/{id}.png`` (a
  missing PNG is an error naming it). ``--all_images`` lists every PNG found instead (5000
  images), sorted by name. The labels are the values present except 255, ascending, in the
  182-index space (the classifier maps them to the 171 classes). A value above 181 (other
  than 255) or one of the 11 unused ids is an error naming the PNG.

81-class COCO masks (``--masks_out``, coco2017 only)
----------------------------------------------------
For every image of the split, ``{masks_out}/{id}.png`` is an 8-bit grayscale (mode ``L``)
PNG of the image's size: 0 background, ``1 + class id`` (1..80) for objects, 255 ignore.

* Non-crowd objects are drawn in decreasing order of their annotated ``area`` (ties: lower
  annotation id first), each over the previous ones, so a smaller object lying on a larger
  one stays visible.
* Crowd regions (``iscrowd=1``) become 255 (ignore), the common convention, but only on the
  pixels no non-crowd object covers: a labelled object is never hidden by a crowd region.
* An existing ``{id}.png`` is left as it is (masks the user already has in this layout are
  used as they are) unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from tagclip.registry import DATASETS
from toolkit.cli import HelpFormatter
from toolkit.errors import InputError
from toolkit.files import read_bytes, write_bytes_atomic, write_text_atomic
from toolkit.images import read_image_file
from toolkit.palette import IGNORE_LABEL
from toolkit.splits import read_split
from toolkit.vocab import COCO_CLASSES, COCO_STUFF_182, COCO_STUFF_UNUSED, VOC_CLASSES

DATASET_NAMES = ("voc2007", "voc2012", "coco2014", "coco2017", "cocostuff")

# The split files shipped with the repository (the authors' files; see imageset/README.md).
# Every default location of a shipped file is derived from this one path.
IMAGESET_DIR = Path(__file__).resolve().parents[1] / "imageset"

# Image counts of the splits ``prepare`` writes by default (as in the paper); ``--check``
# asserts them. COCO-Stuff's default is the paper's subset of val2017.
EXPECTED_SIZES = {
    "voc2007": 4952,
    "voc2012": 1449,
    "coco2014": 40137,
    "coco2017": 4952,
    "cocostuff": 4172,
}
# Image counts with ``--all_images`` (COCO-Stuff only): every official val2017 map.
EXPECTED_SIZES_ALL_IMAGES = {
    "cocostuff": 5000,
}


# Official COCO names that the paper spells the VOC way (COCO_CLASSES uses the paper's names).
COCO_PAPER_SPELLINGS = {
    "motorcycle": "motorbike",
    "airplane": "aeroplane",
    "couch": "sofa",
    "potted plant": "pottedplant",
    "dining table": "diningtable",
    "tv": "tvmonitor",
}

_VOC_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
_STUFF_UNUSED = frozenset(COCO_STUFF_UNUSED)


class CheckError(Exception):
    """``--check`` found a split that differs from the official size or the shipped file."""


# ----------------------------------------------------------------------------- helpers

def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(path, f"{what} not found")
    if not path.is_dir():
        raise InputError(path, f"{what} is not a directory")


def format_split(rows: Iterable[tuple[str, Sequence[int]]]) -> str:
    """Split-file text: one ``id l1 l2 ...`` line per row, newline-terminated."""
    return "".join(" ".join([image_id, *map(str, labels)]) + "\n" for image_id, labels in rows)


# ----------------------------------------------------------------------------- VOC

def _voc_ids(path: Path) -> list[str]:
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    ids = []
    seen = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        # ImageSets/Main/<class>_test.txt style lines ('id  1') keep only the id.
        image_id = tokens[0]
        if image_id in seen:
            raise InputError(path, f"line {lineno}: duplicate image id {image_id}")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise InputError(path, "no image ids listed")
    return ids


def voc_labels(xml_path: Path, skip_difficult: bool = False) -> list[int]:
    """Class ids of one VOC annotation, each once, in order of first appearance."""
    data = read_bytes(xml_path)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise InputError(xml_path, f"not valid XML ({exc})") from None
    labels: list[int] = []
    for obj in root.iter("object"):
        name_el = obj.find("name")
        if name_el is None or not (name_el.text or "").strip():
            raise InputError(xml_path, "an <object> has no <name>")
        name = name_el.text.strip()
        if name not in _VOC_INDEX:
            raise InputError(xml_path, f'unknown class name "{name}" (not one of the 20 VOC classes)')
        difficult_el = obj.find("difficult")
        difficult_text = (difficult_el.text or "").strip() if difficult_el is not None else ""
        if difficult_text not in ("", "0", "1"):
            raise InputError(xml_path, f'<difficult> is "{difficult_text}", expected 0 or 1')
        if skip_difficult and difficult_text == "1":
            continue
        label = _VOC_INDEX[name]
        if label not in labels:
            labels.append(label)
    return labels


def prepare_voc(root, year: str, skip_difficult: bool = False) -> list[tuple[str, list[int]]]:
    """Rows of the VOC2007 test (``year='2007'``) or VOC2012 segmentation val split."""
    root = Path(root)
    _require_dir(root, "VOC root folder")
    if year == "2007":
        id_file = root / "ImageSets" / "Main" / "test.txt"
    elif year == "2012":
        id_file = root / "ImageSets" / "Segmentation" / "val.txt"
    else:
        raise ValueError(f"unknown VOC year {year!r}")
    ids = _voc_ids(id_file)
    annotations = root / "Annotations"
    return [(image_id, voc_labels(annotations / f"{image_id}.xml", skip_difficult)) for image_id in ids]


# ----------------------------------------------------------------------------- COCO instances

def load_coco(json_path):
    """A pycocotools ``COCO`` index of an instances JSON; problems -> InputError."""
    from pycocotools.coco import COCO

    json_path = Path(json_path)
    data = read_bytes(json_path)
    try:
        dataset = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(json_path, f"not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise InputError(json_path, "not valid JSON (arrays or objects nested too deeply to parse)") from None
    if not isinstance(dataset, dict):
        raise InputError(json_path, "not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise InputError(json_path, f'not a COCO instances file (no "{key}" list)')
    required = (("images", ("id", "height", "width")), ("annotations", ("id", "image_id", "category_id")),
                ("categories", ("id",)))
    for key, fields in required:
        for entry in dataset[key]:
            if not isinstance(entry, dict):
                raise InputError(json_path, f'an entry of "{key}" is not an object')
            for name in fields:
                value = entry.get(name)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InputError(json_path, f'an entry of "{key}" has no integer "{name}" ({entry.get(name)!r})')
    for cat in dataset["categories"]:
        if not isinstance(cat.get("name"), str):
            raise InputError(json_path, f"category {cat['id']} has no name")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    image_ids = set(coco.imgs)
    for ann in dataset["annotations"]:
        if ann["image_id"] not in image_ids:
            raise InputError(json_path, f"annotation {ann['id']} refers to unknown image {ann['image_id']}")
        if ann["category_id"] not in coco.cats:
            raise InputError(json_path, f"annotation {ann['id']} has unknown category {ann['category_id']}")
    return coco


def coco_category_map(coco, json_path) -> dict[int, int]:
    """COCO category id -> 0..79 (sorted category ids), names checked against COCO_CLASSES."""
    cat_ids = sorted(coco.cats)
    if len(cat_ids) != len(COCO_CLASSES):
        raise InputError(json_path, f"has {len(cat_ids)} categories, expected the {len(COCO_CLASSES)} COCO classes")
    mapping = {}
    for index, cat_id in enumerate(cat_ids):
        name = str(coco.cats[cat_id]["name"]).strip()
        paper_name = COCO_PAPER_SPELLINGS.get(name, name)
        if paper_name != COCO_CLASSES[index]:
            raise InputError(
                json_path, f'category {cat_id} is "{name}", expected "{COCO_CLASSES[index]}" at class index {index}'
            )
        mapping[cat_id] = index
    return mapping


def coco_id_format(year: str) -> str:
    if year == "2014":
        return "COCO_val2014_%012d"
    if year == "2017":
        return "%012d"
    raise ValueError(f"unknown COCO year {year!r}")


def coco_rows(coco, json_path, year: str) -> list[tuple[str, list[int], int]]:
    """``(id, labels, coco image id)`` of every image with at least one annotation (crowd too)."""
    cat_map = coco_category_map(coco, json_path)
    id_format = coco_id_format(year)
    rows = []
    for img_id in sorted(coco.imgs):
        anns = coco.imgToAnns.get(img_id, [])
        if not anns:
            continue
        labels = sorted({cat_map[ann["category_id"]] for ann in anns})
        rows.append((id_format % img_id, labels, img_id))
    return rows


def coco_json_path(root, year: str) -> Path:
    return Path(root) / "annotations" / f"instances_val{year}.json"


def prepare_coco(root, year: str):
    """``(rows, coco, json_path)`` of the COCO2014 / COCO2017 val split."""
    root = Path(root)
    _require_dir(root, "COCO root folder")
    json_path = coco_json_path(root, year)
    coco = load_coco(json_path)
    return coco_rows(coco, json_path, year), coco, json_path


def render_coco_mask(coco, img_id: int, cat_map: dict[int, int]) -> np.ndarray:
    """81-class mask (uint8 H x W) of one image; rules in the module docstring."""
    img = coco.imgs[img_id]
    height, width = int(img["height"]), int(img["width"])
    mask = np.zeros((height, width), dtype=np.uint8)
    anns = coco.imgToAnns.get(img_id, [])
    objects = sorted((a for a in anns if not a.get("iscrowd", 0)),
                     key=lambda a: (-float(a.get("area", 0.0)), int(a["id"])))
    covered = np.zeros((height, width), dtype=bool)
    with warnings.catch_warnings():
        # pycocotools' decoder trips numpy 2's __array__(copy=...) deprecation; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        for ann in objects:
            region = coco.annToMask(ann).astype(bool)
            mask[region] = cat_map[ann["category_id"]] + 1
            covered |= region
        for ann in anns:
            if ann.get("iscrowd", 0):
                region = coco.annToMask(ann).astype(bool)
                mask[region & ~covered] = IGNORE_LABEL
    return mask


def encode_l_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_coco_masks(coco, json_path, rows, masks_out, overwrite: bool = False) -> tuple[int, int]:
    """Render the masks of ``rows`` into ``masks_out``; returns ``(written, skipped)``."""

    cat_map = coco_category_map(coco, json_path)
    masks_out = Path(masks_out)
    if masks_out.exists() and not masks_out.is_dir():
        raise InputError(masks_out, "mask output folder is not a directory")
    written = skipped = 0
    for image_id, _labels, img_id in rows:
        target = masks_out / f"{image_id}.png"
        if target.exists() and not overwrite:
            skipped += 1
            continue
        try:
            mask = render_coco_mask(coco, img_id, cat_map)
        except Exception as exc:  # malformed segmentation of this image
            raise InputError(json_path, f"cannot render the mask of image {img_id} ({exc})") from None
        write_bytes_atomic(target, encode_l_png(mask))
        written += 1
    return written, skipped


# ----------------------------------------------------------------------------- COCO-Stuff

def stuff_labels(png_path: Path) -> list[int]:
    """182-index ids present in one stuffthingmaps PNG (255 excluded), ascending.

    Opened by :func:`toolkit.images.read_image_file`: a map over the pixel limit, or in another
    mode than L / P, is an InputError before it is decoded."""
    def pixels(img) -> np.ndarray:
        if img.mode not in ("L", "P"):
            raise InputError(png_path, f"expected an 8-bit single-channel PNG, got mode {img.mode}")
        return np.asarray(img)

    values = np.unique(read_image_file(png_path, "COCO-Stuff map", pixels))
    labels = []
    for value in values.tolist():
        if value == IGNORE_LABEL:
            continue
        if value >= len(COCO_STUFF_182):
            raise InputError(png_path, f"value {value} is not a COCO-Stuff id (0..181, 255 unlabeled)")
        if value in _STUFF_UNUSED:
            raise InputError(png_path, f"value {value} is an unused COCO-Stuff id")
        labels.append(int(value))
    return labels


def shipped_split(dataset: str, imageset_dir=None) -> Path:
    """Path of the split file of ``dataset`` shipped in ``imageset_dir`` (default :data:`IMAGESET_DIR`)."""

    folder = Path(IMAGESET_DIR if imageset_dir is None else imageset_dir)
    return folder / Path(DATASETS[dataset].default_split).relative_to("imageset")


def cocostuff_subset_ids(subset_file) -> list[str]:
    """Image ids, in file order, of the shipped COCO-Stuff subset file (labels are ignored)."""
    subset_file = Path(subset_file)
    if not subset_file.is_file():
        raise InputError(subset_file, "COCO-Stuff subset file not found (the paper's 4172-image split); "
                                      "restore it, or pass --all_images to list every val2017 map")
    return [entry.id for entry in read_split(subset_file)]


def prepare_cocostuff(root, ids: Optional[Sequence[str]] = None,
                      subset_file=None) -> list[tuple[str, list[int]]]:
    """Rows of the COCO-Stuff val split from ``{root}/val2017/*.png``.

    ``ids`` (in order) selects the images, e.g. the paper's subset; ``None`` lists every PNG
    found, sorted by name. ``subset_file`` only names the source of ``ids`` in errors.
    """
    folder = Path(root) / "val2017"
    _require_dir(Path(root), "COCO-Stuff root folder")
    _require_dir(folder, "stuffthingmaps folder")
    if ids is None:
        pngs = sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.is_file())
        if not pngs:
            raise InputError(folder, "no .png files found")
        return [(p.stem, stuff_labels(p)) for p in pngs]
    rows = []
    source = f" listed in {subset_file}" if subset_file is not None else ""
    for image_id in ids:
        png = folder / f"{image_id}.png"
        if not png.is_file():
            raise InputError(png, f"file not found (image {image_id} of the COCO-Stuff subset{source})")
        rows.append((image_id, stuff_labels(png)))
    return rows


# ----------------------------------------------------------------------------- driver

def check_size(dataset: str, count: int, all_images: bool = False) -> None:
    """:class:`CheckError` unless ``count`` is the expected image count of the split."""
    if all_images:
        expected = EXPECTED_SIZES_ALL_IMAGES[dataset]
    else:
        expected = EXPECTED_SIZES[dataset]
    if count == expected:
        return
    if dataset == "cocostuff" and not all_images:
        raise CheckError(
            f"cocostuff split has {count} images, the paper's subset has {expected}; "
            "is the shipped subset file complete?"
        )
    raise CheckError(
        f"{dataset} split has {count} images, the official release gives {expected}; "
        "is --root the complete official dataset?"
    )


def _quoted(row: Optional[str]) -> str:
    return "(end of file)" if row is None else f'"{row}"'


def check_against_shipped(ids: Sequence[str], shipped) -> None:
    """:class:`CheckError` unless ``ids`` are the ids of the ``shipped`` split file, in order.

    The message names the shipped file, both counts and the first line that differs.
    """
    shipped = Path(shipped)
    expected = [entry.id for entry in read_split(shipped)]
    if list(ids) == expected:
        return
    line = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
    here = ids[line] if line < len(ids) else None
    there = expected[line] if line < len(expected) else None
    raise CheckError(
        f"{shipped}: the shipped split has {len(expected)} images, this one {len(ids)}; "
        f"first different id at line {line + 1}: shipped {_quoted(there)}, here {_quoted(here)}"
    )


def default_out(dataset: str) -> Path:

    return Path(DATASETS[dataset].default_split)


def prepare(dataset: str, root, out=None, skip_difficult: bool = False, check: bool = False,
            masks_out=None, overwrite: bool = False, log=None, all_images: bool = False,
            imageset_dir=None) -> Path:
    """Write the split file of ``dataset`` (and the COCO2017 masks); returns the split path.

    ``imageset_dir`` is the folder of the shipped split files (default :data:`IMAGESET_DIR`):
    the COCO-Stuff subset is read from it, and ``check`` compares with its files. With
    ``check``, the image count is compared with the expected one and the ids with the
    shipped file (when present) before anything is written (:class:`CheckError` on a
    difference). ``all_images`` (COCO-Stuff only) lists every val2017 map instead of the
    paper's subset.
    """
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASET_NAMES)}")
    if masks_out is not None and dataset != "coco2017":
        raise ValueError("--masks_out renders COCO2017 masks; use it with --dataset coco2017")
    if skip_difficult and not dataset.startswith("voc"):
        raise ValueError("--skip_difficult applies to the VOC datasets only")
    if all_images and dataset != "cocostuff":
        raise ValueError("--all_images applies to --dataset cocostuff only")
    out = Path(out) if out is not None else default_out(dataset)
    shipped = shipped_split(dataset, imageset_dir)
    coco = json_path = None
    if dataset in ("voc2007", "voc2012"):
        rows = prepare_voc(root, dataset[3:], skip_difficult)
    elif dataset in ("coco2014", "coco2017"):
        coco_rows_, coco, json_path = prepare_coco(root, dataset[4:])
        rows = [(image_id, labels) for image_id, labels, _ in coco_rows_]
    elif all_images:
        rows = prepare_cocostuff(root)
    else:
        rows = prepare_cocostuff(root, cocostuff_subset_ids(shipped), subset_file=shipped)
    if check:
        check_size(dataset, len(rows), all_images)
        if all_images:
            pass  # the shipped file is the subset: there is nothing to compare all images with
        elif shipped.is_file():
            check_against_shipped([image_id for image_id, _ in rows], shipped)
        elif log:
            log(f"no shipped split {shipped}: ids not compared")

    write_text_atomic(out, format_split(rows))
    if log:
        log(f"wrote {out} ({len(rows)} images)")
    if masks_out is not None:
        written, skipped = write_coco_masks(coco, json_path, coco_rows_, masks_out, overwrite)
        if log:
            log(f"masks in {masks_out}: {written} written, {skipped} existing kept")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tagclip prepare", formatter_class=HelpFormatter,
        description="Write (or check) one dataset's split file of imageset/ from its official release, and "
                    "optionally COCO2017 masks.")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", required=True,
                   help="VOC year folder; COCO folder holding annotations/; COCO-Stuff folder holding val2017/")
    p.add_argument("--out", default=None,
                   help="split file to write (default: the dataset's file name under imageset/ of the current "
                        "directory, e.g. imageset/voc2007/test_cls.txt; from the repository root this replaces "
                        "the shipped file)")
    p.add_argument("--skip_difficult", action="store_true", help="VOC: ignore objects marked difficult")
    p.add_argument("--all_images", action="store_true",
                   help="cocostuff: list every map of val2017/ (5000 images) instead of the paper's "
                        "4172-image subset, whose ids are read from the shipped imageset/cocostuff/val.txt")
    p.add_argument("--check", action="store_true",
                   help="fail (exit 1, nothing written) unless the image count is the expected one and the "
                        "image ids (in order) are those of the shipped split file of the dataset, when "
                        "present (labels are not compared; cocostuff with --all_images: the count only)")
    p.add_argument("--masks_out", default=None, help="coco2017: render 81-class masks {id}.png into this folder")
    p.add_argument("--overwrite", action="store_true", help="with --masks_out: re-render existing mask files")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepare(args.dataset, args.root, args.out, skip_difficult=args.skip_difficult, check=args.check,
                masks_out=args.masks_out, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr),
                all_images=args.all_images)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckError as exc:
        print(f"error: check failed: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        parser.error(str(exc))  # usage error, exit 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
