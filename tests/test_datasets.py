"""Split-file preparation from synthetic datasets in the official layouts (pipelines.datasets, ``tagclip prepare``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines import datasets
from pipelines.command import main as tagclip_main
from toolkit.errors import InputError
from toolkit.splits import read_split
from toolkit.vocab import COCO_CLASSES, COCO_STUFF_182_TO_171, VOC_CLASSES

REPO_ROOT = Path(__file__).resolve().parent.parent

# The official COCO instance categories: ids 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]

PERSON, DOG, CAR, TOOTHBRUSH = (COCO_CLASSES.index(n) for n in ("person", "dog", "car", "toothbrush"))


# ----------------------------------------------------------------------------- VOC fixtures

def _voc_xml(objects) -> str:
    parts = ["<annotation><folder>VOC</folder><size><width>10</width><height>10</height></size>"]
    for name, difficult in objects:
        diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(f"<object><name>{name}</name><pose>Left</pose>{diff}"
                     "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def make_voc(root: Path, year: str, annotations: dict, ids=None) -> Path:
    set_dir = root / "ImageSets" / ("Main" if year == "2007" else "Segmentation")
    set_dir.mkdir(parents=True)
    ids = list(annotations) if ids is None else ids
    (set_dir / ("test.txt" if year == "2007" else "val.txt")).write_text("\n".join(ids) + "\n")
    ann_dir = root / "Annotations"
    ann_dir.mkdir()
    for image_id, objects in annotations.items():
        (ann_dir / f"{image_id}.xml").write_text(_voc_xml(objects))
    return root


VOC_ANNOTATIONS = {
    # dog, person (difficult), dog again, cat: first appearance order, each class once
    "000001": [("dog", 0), ("person", 1), ("dog", 0), ("cat", None)],
    # difficult-only image
    "000004": [("tvmonitor", 1), ("tvmonitor", 1)],
    "000002": [("aeroplane", 0)],
}


def test_voc2007_lines_in_file_order_with_difficult(tmp_path):
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    out = tmp_path / "split.txt"
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out", str(out)]) == 0
    assert out.read_text() == "000001 11 14 7\n000004 19\n000002 0\n"
    entries = read_split(out, num_classes=20)
    assert [VOC_CLASSES[c] for c in entries[0].labels] == ["dog", "person", "cat"]


def test_voc_skip_difficult_leaves_id_only(tmp_path):
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    out = tmp_path / "split.txt"
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out", str(out),
                          "--skip_difficult"]) == 0
    assert out.read_text() == "000001 11 7\n000004\n000002 0\n"
    assert read_split(out, num_classes=20)[1].labels == ()


def test_voc2012_uses_segmentation_val(tmp_path):
    root = make_voc(tmp_path / "VOC2012", "2012", {"2007_000032": [("aeroplane", 0), ("person", 0)],
                                                   "2007_000039": [("tvmonitor", 0)]})
    rows = datasets.prepare_voc(root, "2012")
    assert rows == [("2007_000032", [0, 14]), ("2007_000039", [19])]


def test_voc_default_out_under_cwd(tmp_path, monkeypatch):
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    monkeypatch.chdir(tmp_path)
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root)]) == 0
    assert (tmp_path / "imageset" / "voc2007" / "test_cls.txt").read_text().startswith("000001 11 14 7\n")


def test_voc_unknown_class_names_the_xml(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2007", "2007", {"000001": [("dog", 0)], "000002": [("unicorn", 0)]})
    out = tmp_path / "split.txt"
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: ") and "000002.xml" in err and "unicorn" in err
    assert not out.exists()


def test_voc_missing_xml_and_missing_imageset(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2007", "2007", {"000001": [("dog", 0)]}, ids=["000001", "000009"])
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out",
                          str(tmp_path / "s.txt")]) == 2
    err = capsys.readouterr().err
    assert "000009.xml: file not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tagclip_main(["prepare", "--dataset", "voc2012", "--root", str(empty), "--out",
                          str(tmp_path / "s.txt")]) == 2
    assert "val.txt: file not found" in capsys.readouterr().err


def test_voc_malformed_xml(tmp_path):
    root = make_voc(tmp_path / "VOC2007", "2007", {"000001": [("dog", 0)]})
    (root / "Annotations" / "000001.xml").write_text("<annotation><object>")
    with pytest.raises(InputError, match="000001.xml: not valid XML"):
        datasets.prepare_voc(root, "2007")


def test_check_fails_on_small_data(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    out = tmp_path / "split.txt"
    assert tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out", str(out),
                          "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: check failed: voc2007 split has 3 images, the official release gives 4952")
    assert not out.exists()


# ----------------------------------------------------------------------------- COCO fixtures

def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _crowd_rle(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode("ascii"), "size": [h, w]}


def coco_instances(year="2017"):
    h, w = 20, 20
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i:012d}.jpg"} for i in (139, 5, 77, 3)]
    anns = [
        # image 139: small dog listed before the large person it lies on; a crowd person region
        # overlapping the dog's right part and background
        {"id": 10, "image_id": 139, "category_id": 18, "iscrowd": 0, "area": 16.0,
         "segmentation": _rect(6, 6, 10, 10), "bbox": [6, 6, 4, 4]},
        {"id": 11, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 100.0,
         "segmentation": _rect(2, 2, 12, 12), "bbox": [2, 2, 10, 10]},
        {"id": 12, "image_id": 139, "category_id": 1, "iscrowd": 1, "area": 40.0,
         "segmentation": _crowd_rle(h, w, 7, 9, 8, 18), "bbox": [8, 7, 10, 2]},
        # image 77: only a crowd car
        {"id": 13, "image_id": 77, "category_id": 3, "iscrowd": 1, "area": 25.0,
         "segmentation": _crowd_rle(h, w, 0, 5, 0, 5), "bbox": [0, 0, 5, 5]},
        # image 3: toothbrush and person, listed in that order
        {"id": 14, "image_id": 3, "category_id": 90, "iscrowd": 0, "area": 4.0,
         "segmentation": _rect(1, 1, 3, 3), "bbox": [1, 1, 2, 2]},
        {"id": 15, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 4.0,
         "segmentation": _rect(14, 14, 16, 16), "bbox": [14, 14, 2, 2]},
        {"id": 16, "image_id": 3, "category_id": 90, "iscrowd": 0, "area": 4.0,
         "segmentation": _rect(5, 1, 7, 3), "bbox": [5, 1, 2, 2]},
    ]
    # image 5 has no annotation at all
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}


def make_coco(root: Path, year="2017", data=None) -> Path:
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True)
    (ann_dir / f"instances_val{year}.json").write_text(json.dumps(data or coco_instances(year)))
    return root


def test_category_list_is_the_official_one():
    assert len(COCO_CATEGORIES) == 80
    assert sorted(set(range(1, 91)) - {i for i, _ in COCO_CATEGORIES}) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_coco2017_split_lines(tmp_path):
    root = make_coco(tmp_path / "coco")
    out = tmp_path / "val.txt"
    assert tagclip_main(["prepare", "--dataset", "coco2017", "--root", str(root), "--out", str(out)]) == 0
    assert out.read_text() == (
        f"000000000003 {PERSON} {TOOTHBRUSH}\n"      # ascending, each once
        f"000000000077 {CAR}\n"                      # crowd-only image is listed
        f"000000000139 {PERSON} {DOG}\n"             # image 5 (no annotation) is left out
    )
    assert read_split(out, num_classes=80)[0].labels == (0, 79)


def test_coco2014_ids_and_mapping(tmp_path):
    root = make_coco(tmp_path / "coco", "2014")
    rows, _, _ = datasets.prepare_coco(root, "2014")
    assert [(r[0], r[1]) for r in rows] == [("COCO_val2014_000000000003", [0, 79]),
                                            ("COCO_val2014_000000000077", [2]),
                                            ("COCO_val2014_000000000139", [0, 16])]


def test_coco_category_names_checked(tmp_path, capsys):
    data = coco_instances()
    data["categories"][3]["name"] = "scooter"
    root = make_coco(tmp_path / "coco", data=data)
    assert tagclip_main(["prepare", "--dataset", "coco2017", "--root", str(root), "--out",
                          str(tmp_path / "v.txt")]) == 2
    err = capsys.readouterr().err
    assert "instances_val2017.json: category 4 is \"scooter\", expected \"motorbike\"" in err
    data = coco_instances()
    del data["categories"][40]  # wine glass, unused by the annotations
    root = make_coco(tmp_path / "coco2", data=data)
    with pytest.raises(InputError, match="79 categories"):
        datasets.prepare_coco(root, "2017")


def test_coco_bad_json(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(InputError, match="instances_val2017.json: not valid JSON"):
        datasets.prepare_coco(root, "2017")
    with pytest.raises(InputError, match="instances_val2014.json: file not found"):
        datasets.prepare_coco(root, "2014")


def test_coco2017_masks(tmp_path):
    root = make_coco(tmp_path / "coco")
    masks = tmp_path / "masks"
    assert tagclip_main(["prepare", "--dataset", "coco2017", "--root", str(root), "--out",
                          str(tmp_path / "v.txt"), "--masks_out", str(masks)]) == 0
    assert sorted(p.name for p in masks.iterdir()) == ["000000000003.png", "000000000077.png", "000000000139.png"]
    with Image.open(masks / "000000000139.png") as img:
        assert img.mode == "L" and img.size == (20, 20)
        m = np.array(img)
    assert m[4, 4] == PERSON + 1          # large person
    assert m[7, 7] == DOG + 1             # smaller dog drawn on top although listed first
    assert m[7, 9] == DOG + 1             # crowd does not hide a labelled object
    assert m[8, 15] == 255                # crowd over background -> ignore
    assert m[16, 16] == 0 and m[0, 0] == 0
    assert set(np.unique(m).tolist()) == {0, PERSON + 1, DOG + 1, 255}
    m77 = np.array(Image.open(masks / "000000000077.png"))
    assert (m77[:5, :5] == 255).all() and (m77[5:, :] == 0).all() and (m77[:, 5:] == 0).all()
    m3 = np.array(Image.open(masks / "000000000003.png"))
    assert m3[2, 2] == TOOTHBRUSH + 1 and m3[2, 6] == TOOTHBRUSH + 1 and m3[15, 15] == PERSON + 1


def test_masks_existing_kept_unless_overwrite(tmp_path):
    root = make_coco(tmp_path / "coco")
    masks = tmp_path / "masks"
    masks.mkdir()
    mine = masks / "000000000139.png"
    Image.fromarray(np.full((20, 20), 7, dtype=np.uint8)).save(mine)
    datasets.prepare("coco2017", root, tmp_path / "v.txt", masks_out=masks)
    assert (np.array(Image.open(mine)) == 7).all()
    datasets.prepare("coco2017", root, tmp_path / "v.txt", masks_out=masks, overwrite=True)
    assert np.array(Image.open(mine))[7, 7] == DOG + 1


def test_masks_out_only_for_coco2017(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", "2014")
    with pytest.raises(SystemExit) as exc:
        tagclip_main(["prepare", "--dataset", "coco2014", "--root", str(root), "--masks_out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "--masks_out" in capsys.readouterr().err


def test_coco_check_fails(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", "2014")
    assert tagclip_main(["prepare", "--dataset", "coco2014", "--root", str(root), "--out",
                          str(tmp_path / "v.txt"), "--check"]) == 1
    assert "coco2014 split has 3 images, the official release gives 40137" in capsys.readouterr().err


# ----------------------------------------------------------------------------- COCO-Stuff

def make_stuff(root: Path, maps: dict) -> Path:
    folder = root / "val2017"
    folder.mkdir(parents=True)
    for name, arr in maps.items():
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not a map")
    return root


def test_cocostuff_split_reads_back_with_label_map(tmp_path):
    a = np.full((4, 4), 255)
    a[0, :] = 181
    a[1, :] = 0
    a[2, :2] = 92
    b = np.full((4, 4), 255)          # all unlabeled
    c = np.array([[156, 156], [3, 255]])
    root = make_stuff(tmp_path / "stuff", {"000000000285": a, "000000000139": c, "000000000632": b})
    out = tmp_path / "val.txt"
    assert tagclip_main(["prepare", "--dataset", "cocostuff", "--root", str(root), "--out", str(out),
                          "--all_images"]) == 0
    assert out.read_text() == "000000000139 3 156\n000000000285 0 92 181\n000000000632\n"
    entries = read_split(out, num_classes=171, label_map=COCO_STUFF_182_TO_171)
    assert entries[1].labels == (0, COCO_STUFF_182_TO_171[92], 170)


def test_cocostuff_bad_values(tmp_path):
    root = make_stuff(tmp_path / "s1", {"x": [[11, 0]]})
    with pytest.raises(InputError, match=r"x\.png: value 11 is an unused COCO-Stuff id"):
        datasets.prepare_cocostuff(root)
    root = make_stuff(tmp_path / "s2", {"y": [[200, 0]]})
    with pytest.raises(InputError, match=r"y\.png: value 200 is not a COCO-Stuff id"):
        datasets.prepare_cocostuff(root)
    (root / "val2017" / "z.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"y\.png|z\.png"):
        datasets.prepare_cocostuff(root)
    with pytest.raises(InputError, match="stuffthingmaps folder not found"):
        datasets.prepare_cocostuff(tmp_path)


def _module_env() -> dict:
    """``python -m pipelines prepare`` from a temporary folder: the repository on the path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def test_cocostuff_check_and_cli_module(tmp_path):
    root = make_stuff(tmp_path / "stuff", {"a": [[1]]})
    proc = subprocess.run([sys.executable, "-m", "pipelines", "prepare", "--dataset", "cocostuff",
                           "--root", str(root), "--out", str(tmp_path / "v.txt"), "--check", "--all_images"],
                          cwd=tmp_path, env=_module_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: check failed: cocostuff split has 1 images, the official release "
                                   "gives 5000; is --root the complete official dataset?")
    assert not (tmp_path / "v.txt").exists()


def test_cocostuff_default_reads_the_shipped_subset(tmp_path):
    # The real shipped subset starts with 000000000139; this folder has other maps only.
    root = make_stuff(tmp_path / "stuff", {"000000000285": [[1]]})
    proc = subprocess.run([sys.executable, "-m", "pipelines", "prepare", "--dataset", "cocostuff",
                           "--root", str(root), "--out", str(tmp_path / "v.txt")],
                          cwd=tmp_path, env=_module_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    png = root / "val2017" / "000000000139.png"
    subset = REPO_ROOT / "imageset" / "cocostuff" / "val.txt"
    assert proc.stderr == (f"error: {png}: file not found (image 000000000139 of the COCO-Stuff subset "
                           f"listed in {subset})\n")
    assert not (tmp_path / "v.txt").exists()


# A subset file in the shipped format: ids in a non-sorted order, labels that the PNGs contradict
# (prepare takes the ids and their order from it, and computes the labels from the PNGs).
SUBSET = "000000000632 5\n000000000139 1 2 3\n"


def make_subset(folder: Path, text: str = SUBSET) -> Path:
    (folder / "cocostuff").mkdir(parents=True)
    (folder / "cocostuff" / "val.txt").write_text(text)
    return folder


def stuff_three(tmp_path):
    a = np.full((4, 4), 255)
    a[0, :] = 181
    a[1, :] = 0
    c = np.array([[156, 156], [3, 255]])
    b = np.full((3, 3), 7)
    return make_stuff(tmp_path / "stuff", {"000000000285": a, "000000000139": c, "000000000632": b})


def test_cocostuff_subset_by_default(tmp_path):
    root = stuff_three(tmp_path)
    shipped = make_subset(tmp_path / "shipped")
    out = datasets.prepare("cocostuff", root, tmp_path / "v.txt", imageset_dir=shipped)
    assert out == tmp_path / "v.txt"
    assert out.read_text() == "000000000632 7\n000000000139 3 156\n"
    # --all_images: every PNG, sorted, whatever the subset file says
    datasets.prepare("cocostuff", root, tmp_path / "all.txt", imageset_dir=shipped, all_images=True)
    assert (tmp_path / "all.txt").read_text() == "000000000139 3 156\n000000000285 0 181\n000000000632 7\n"


def test_cocostuff_subset_cli_default_out(tmp_path, monkeypatch, capsys):
    root = stuff_three(tmp_path)
    shipped = make_subset(tmp_path / "shipped")
    monkeypatch.setattr(datasets, "IMAGESET_DIR", shipped)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert tagclip_main(["prepare", "--dataset", "cocostuff", "--root", str(root)]) == 0
    assert (work / "imageset" / "cocostuff" / "val.txt").read_text() == "000000000632 7\n000000000139 3 156\n"
    assert (shipped / "cocostuff" / "val.txt").read_text() == SUBSET
    assert "(2 images)" in capsys.readouterr().err


def test_cocostuff_subset_png_missing(tmp_path, capsys, monkeypatch):
    root = stuff_three(tmp_path)
    shipped = make_subset(tmp_path / "shipped", SUBSET + "000000000724 9\n")
    monkeypatch.setattr(datasets, "IMAGESET_DIR", shipped)
    out = tmp_path / "v.txt"
    assert tagclip_main(["prepare", "--dataset", "cocostuff", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    png = root / "val2017" / "000000000724.png"
    assert err == (f"error: {png}: file not found (image 000000000724 of the COCO-Stuff subset listed in "
                   f"{shipped / 'cocostuff' / 'val.txt'})\n")
    assert not out.exists()


def test_cocostuff_subset_file_missing(tmp_path, capsys, monkeypatch):
    root = stuff_three(tmp_path)
    empty = tmp_path / "no_imageset"
    monkeypatch.setattr(datasets, "IMAGESET_DIR", empty)
    out = tmp_path / "v.txt"
    assert tagclip_main(["prepare", "--dataset", "cocostuff", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {empty / 'cocostuff' / 'val.txt'}: COCO-Stuff subset file not found (the paper's "
                   "4172-image split); restore it, or pass --all_images to list every val2017 map\n")
    assert not out.exists()
    # the flag does not need the subset file
    assert tagclip_main(["prepare", "--dataset", "cocostuff", "--root", str(root), "--out", str(out),
                          "--all_images"]) == 0
    assert out.read_text().count("\n") == 3


def test_cocostuff_subset_check_counts_the_paper_subset(tmp_path, capsys):
    root = stuff_three(tmp_path)
    shipped = make_subset(tmp_path / "shipped")
    out = tmp_path / "v.txt"
    with pytest.raises(datasets.CheckError) as exc:
        datasets.prepare("cocostuff", root, out, check=True, imageset_dir=shipped)
    assert str(exc.value) == ("cocostuff split has 2 images, the paper's subset has 4172; "
                              "is the shipped subset file complete?")
    assert not out.exists()


def test_expected_sizes():
    assert datasets.EXPECTED_SIZES == {"voc2007": 4952, "voc2012": 1449, "coco2014": 40137, "coco2017": 4952,
                                       "cocostuff": 4172}
    assert datasets.EXPECTED_SIZES_ALL_IMAGES == {"cocostuff": 5000}


def test_all_images_only_for_cocostuff(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    with pytest.raises(SystemExit) as exc:
        tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--all_images"])
    assert exc.value.code == 2
    assert "--all_images applies to --dataset cocostuff only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --check against shipped files

def make_shipped_voc(folder: Path, text: str) -> Path:
    (folder / "voc2007").mkdir(parents=True)
    (folder / "voc2007" / "test_cls.txt").write_text(text)
    return folder


def _check_against_shipped(tmp_path, monkeypatch, shipped_text: str) -> tuple[int, Path, Path]:
    """``prepare --check`` of the 3-image VOC fixture against a shipped file holding
    ``shipped_text``: (exit status, shipped folder, output path)."""
    monkeypatch.setitem(datasets.EXPECTED_SIZES, "voc2007", 3)
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    shipped = make_shipped_voc(tmp_path / "shipped", shipped_text)
    monkeypatch.setattr(datasets, "IMAGESET_DIR", shipped)
    out = tmp_path / "split.txt"
    rc = tagclip_main(["prepare", "--dataset", "voc2007", "--root", str(root), "--out", str(out), "--check"])
    return rc, shipped, out


def test_check_passes_when_ids_match_the_shipped_file(tmp_path, monkeypatch, capsys):
    # same ids in the same order; labels in another convention are not compared
    rc, _, out = _check_against_shipped(tmp_path, monkeypatch, "000001 7 11\n000004\n000002 0\n")
    assert rc == 0
    assert out.read_text() == "000001 11 14 7\n000004 19\n000002 0\n"
    assert "wrote" in capsys.readouterr().err


def test_check_fails_on_a_different_id(tmp_path, monkeypatch, capsys):
    rc, shipped, out = _check_against_shipped(tmp_path, monkeypatch, "000001 11\n000002 0\n000004 19\n")
    assert rc == 1
    shipped_file = shipped / "voc2007" / "test_cls.txt"
    assert capsys.readouterr().err == (
        f"error: check failed: {shipped_file}: the shipped split has 3 images, this one 3; "
        'first different id at line 2: shipped "000002", here "000004"\n')
    assert not out.exists()


def test_check_fails_on_a_different_count(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.EXPECTED_SIZES, "voc2007", 3)
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    shipped = make_shipped_voc(tmp_path / "shipped", "000001\n000004\n000002\n000003\n")
    out = tmp_path / "split.txt"
    with pytest.raises(datasets.CheckError) as exc:
        datasets.prepare("voc2007", root, out, check=True, imageset_dir=shipped)
    assert str(exc.value) == (f"{shipped / 'voc2007' / 'test_cls.txt'}: the shipped split has 4 images, this one 3; "
                              'first different id at line 4: shipped "000003", here (end of file)')
    assert not out.exists()
    # without --check nothing is compared
    datasets.prepare("voc2007", root, out, imageset_dir=shipped)
    assert out.read_text().count("\n") == 3


def test_check_without_a_shipped_file_checks_the_count_only(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.EXPECTED_SIZES, "voc2007", 3)
    root = make_voc(tmp_path / "VOC2007", "2007", VOC_ANNOTATIONS)
    messages = []
    out = datasets.prepare("voc2007", root, tmp_path / "s.txt", check=True, imageset_dir=tmp_path / "none",
                           log=messages.append)
    assert out.read_text().startswith("000001 ")
    assert messages[0] == f"no shipped split {tmp_path / 'none' / 'voc2007' / 'test_cls.txt'}: ids not compared"


def test_check_uses_the_registry_file_names(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.EXPECTED_SIZES, "coco2014", 3)
    root = make_coco(tmp_path / "coco", "2014")
    shipped = tmp_path / "shipped"
    (shipped / "coco2014").mkdir(parents=True)
    (shipped / "coco2014" / "val_cls.txt").write_text("COCO_val2014_000000000003 0\n")
    with pytest.raises(datasets.CheckError, match=r"val_cls\.txt: the shipped split has 1 images, this one 3"):
        datasets.prepare("coco2014", root, tmp_path / "v.txt", check=True, imageset_dir=shipped)
    monkeypatch.chdir(tmp_path)
    assert tagclip_main(["prepare", "--dataset", "coco2014", "--root", str(root)]) == 0
    assert (tmp_path / "imageset" / "coco2014" / "val_cls.txt").read_text().startswith("COCO_val2014_000000000003 ")


def test_coco_malformed_entries(tmp_path):
    data = coco_instances()
    data["images"][0]["id"] = "139"
    root = make_coco(tmp_path / "coco", data=data)
    with pytest.raises(InputError, match='an entry of "images" has no integer "id"'):
        datasets.prepare_coco(root, "2017")
    data = coco_instances()
    data["annotations"][0]["image_id"] = 999
    root = make_coco(tmp_path / "coco2", data=data)
    with pytest.raises(InputError, match="annotation 10 refers to unknown image 999"):
        datasets.prepare_coco(root, "2017")
