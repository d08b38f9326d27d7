"""Tests for toolkit.splits and tagclip.labels: split files, label files and score files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tagclip.labels import label_file_lines, label_file_name, labels_to_onehot, write_scores
from toolkit.errors import InputError
from toolkit.files import write_text_atomic
from toolkit.splits import SplitEntry, read_split

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "reference"


def write_bytes(tmp_path, data, name="split.txt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- split files


def test_read_split_basic(tmp_path):
    path = write_bytes(
        tmp_path,
        b"2007_000001 0 14\r\n"  # CRLF
        b"2007_000002 3   \n"  # trailing spaces
        b"\n"  # blank line skipped
        b"   \n"  # whitespace-only line skipped
        b"2007_000003\n"  # id only
        b"img.jpg 19",  # no final newline; id kept verbatim
    )
    entries = read_split(path, num_classes=20)
    assert entries == [
        SplitEntry("2007_000001", (0, 14)),
        SplitEntry("2007_000002", (3,)),
        SplitEntry("2007_000003", ()),
        SplitEntry("img.jpg", (19,)),
    ]
    assert entries[0].id == "2007_000001" and entries[0].labels == (0, 14)


def test_read_split_label_map(tmp_path):
    # 182-index ids mapped to a smaller vocabulary (as for COCO-Stuff).
    path = write_bytes(tmp_path, b"a 0 12\nb 13\n")
    label_map = {0: 0, 12: 11, 13: 12}
    assert read_split(path, num_classes=13, label_map=label_map) == [
        SplitEntry("a", (0, 11)),
        SplitEntry("b", (12,)),
    ]


def test_read_split_label_map_missing_id(tmp_path):
    path = write_bytes(tmp_path, b"a 0\nb 11\n")
    with pytest.raises(InputError) as err:
        read_split(path, num_classes=13, label_map={0: 0, 12: 11})
    assert str(err.value).startswith(f"{path}: line 2: label 11 ")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a 1\nb 2\nc x\n", 'line 3: label "x" is not an integer'),
        (b"a 1\nb 2\nc 1.5\n", 'line 3: label "1.5" is not an integer'),
        (b"a 1\nb 2\nc 25\n", "line 3: label 25 is outside the vocabulary of 20 classes"),
        (b"a 1\nb 2\nc 20\n", "line 3: label 20 is outside the vocabulary of 20 classes"),
        (b"a 1\n\nb -1\n", "line 3: label -1 is negative (class ids are 0-based)"),
        (
            b"2007_000123 1\nb\nc\nd\ne\nf\n2007_000123 2\n",
            "line 7: duplicate image id 2007_000123",
        ),
        (b"", "no images listed"),
        (b"\n  \n\r\n", "no images listed"),
    ],
)
def test_read_split_errors(tmp_path, content, message):
    path = write_bytes(tmp_path, content)
    with pytest.raises(InputError) as err:
        read_split(path, num_classes=20)
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_read_split_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError) as err:
        read_split(path)
    assert str(err.value).startswith(f"{path}: ")


def test_read_split_not_utf8(tmp_path):
    path = write_bytes(tmp_path, b"a 1\nb\xff 2\n")
    with pytest.raises(InputError) as err:
        read_split(path)
    assert str(err.value).startswith(f"{path}: line 2: ")


def test_read_split_without_num_classes_accepts_large_ids(tmp_path):
    path = write_bytes(tmp_path, b"a 500\n")
    assert read_split(path) == [SplitEntry("a", (500,))]


def test_labels_to_onehot():
    entries = [SplitEntry("a", (0, 2)), SplitEntry("b", ()), SplitEntry("c", (1,))]
    onehot = labels_to_onehot(entries, 3)
    assert onehot.dtype == torch.float64
    assert onehot.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError):
        labels_to_onehot([SplitEntry("a", (3,))], 3)


# --------------------------------------------------------------------------- label files


def test_label_file_lines_threshold_and_fallback():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.8],  # thr = 0.1 + 0.5 * 0.8 = 0.5 -> 1, 3
            [0.0, 0.5, 1.0, 0.0],  # thr = 0.5 exactly; 0.5 is not above it -> 2 only
            [0.3, 0.3, 0.3, 0.3],  # nothing passes -> argmax = first max = 0
            [0.0, 0.0, 0.7, 0.7],  # thr = 0.35 -> 2, 3
        ],
        dtype=torch.float32,
    )
    lines = label_file_lines(["a", "b", "c", "d"], scores, 0.5)
    assert lines == ["a 1 3", "b 2", "c 0", "d 2 3"]
    assert all(not line.endswith(" ") for line in lines)


def test_label_file_lines_rel_and_all_zero():
    scores = torch.tensor([[0.0, 0.15, 1.0, 0.05], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    # rel 0.1: thr = 0.1 -> classes 1 and 2; the all-zero row falls back to index 0
    assert label_file_lines(["x", "y"], scores, 0.1) == ["x 1 2", "y 0"]
    assert label_file_lines(["x", "y"], scores, 0.5) == ["x 2", "y 0"]


def test_label_file_threshold_is_float32():
    # [0.2, 0.9, 0.55] at rel 0.5, float32 steps: 0.9f - 0.2f = 0.69999997317790985 -> f32
    # 0.69999998807907104; * 0.5 = 0.34999999403953552; + 0.2f (0.20000000298023224) =
    # 0.54999999701976776 -> f32 0.55000001192092896 = f32(0.55), the third score itself, which
    # is therefore not above it. (float64 on the same inputs: 0.5499999895691872, below it.)
    scores = torch.tensor([[0.2, 0.9, 0.55]], dtype=torch.float32)
    assert label_file_lines(["x"], scores, 0.5) == ["x 1"]


def test_label_file_name():
    assert label_file_name("voc2012") == "voc2012_val_tagclip.txt"
    assert label_file_name("cocostuff") == "cocostuff_val_tagclip.txt"


# Lines the reference wrote for the same scores (golden manifest, classify.voc2012 / coco2017,
# which reuse the voc2007 / coco2014 fixture images). '2007_000135 0' is the argmax fallback.
REFERENCE_LINES = {
    "voc2007": [
        "2007_000100 1",
        "2007_000107 18",
        "2007_000114 12",
        "2007_000121 18 19",
        "2007_000128 12 15",
        "2007_000135 0",
        "2008_000986 6 15",
        "2008_000901 8 10",
    ],
    "coco2014": [
        "000000001000 6 10 56 60 62 77",
        "000000001013 6 41 56",
        "000000001026 6 38 40 50 53",
        "000000900078 32 34",
        "000000900011 36 38 67",
    ],
}


@pytest.mark.parametrize("name", ["voc2007", "coco2014"])
def test_label_file_lines_reference(name):
    scores = torch.from_numpy(np.load(GOLDEN / f"classify_{name}.npz")["predictions"])
    order = json.loads((GOLDEN / f"classify_{name}.json").read_text())["order"]
    assert label_file_lines(order, scores, 0.5) == REFERENCE_LINES[name]


def test_label_file_lines_reference_cocostuff():
    scores = torch.from_numpy(np.load(GOLDEN / "classify_cocostuff.npz")["predictions"])
    record = json.loads((GOLDEN / "classify_cocostuff.json").read_text())
    text = "".join(line + "\n" for line in label_file_lines(record["order"], scores, 0.1))
    assert text == record["label_file"]


# --------------------------------------------------------------------------- writers


def test_write_text_atomic_creates_parent_and_replaces(tmp_path):
    target = tmp_path / "out" / "sub" / "labels.txt"
    write_text_atomic(target, "a 1\n")
    write_text_atomic(target, "b 2\r\nc 3\n")
    assert target.read_bytes() == b"b 2\r\nc 3\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["labels.txt"]


def test_write_text_atomic_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "labels.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(AttributeError):
        write_text_atomic(target, 12345)  # not a str: fails while writing
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


def test_write_scores_npy_round_trip(tmp_path):
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "s" / "scores.npy"
    write_scores(path, ["a", "b", "c"], ["w", "x", "y", "z"], scores)
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, scores.numpy())
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.npy"]


def test_write_scores_csv_round_trip(tmp_path):
    scores = torch.tensor(
        [[0.1, 1e-8, 0.333333343], [1.0, 0.0, 123456.789]], dtype=torch.float32
    )
    names = ["person", "traffic light", "wall,brick"]
    path = tmp_path / "scores.csv"
    write_scores(path, ["img1", "img2"], names, scores)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", *names]
    assert [row[0] for row in rows[1:]] == ["img1", "img2"]
    parsed = np.array([[float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float32)
    np.testing.assert_array_equal(parsed, scores.numpy())  # exact float32 round trip
    assert '"wall,brick"' in path.read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_write_scores_bad_extension(tmp_path):
    path = tmp_path / "scores.txt"
    with pytest.raises(InputError) as err:
        write_scores(path, ["a"], ["c"], torch.zeros(1, 1))
    assert str(err.value) == f"{path}: unsupported scores file extension '.txt' (use .npy, .csv or .json)"
    assert not path.exists()


def test_write_scores_json_round_trip(tmp_path):
    import json
    names = ["cat", "wall,brick"]
    scores = torch.tensor([[0.1, 1 / 3], [2e-8, 0.75]], dtype=torch.float32)
    path = tmp_path / "scores.json"
    write_scores(path, ["img1", "img2"], names, scores)
    table = json.loads(path.read_text(encoding="utf-8"))
    assert list(table) == ["img1", "img2"] and list(table["img1"]) == names
    parsed = np.array([[table[i][n] for n in names] for i in ("img1", "img2")], dtype=np.float32)
    np.testing.assert_array_equal(parsed, scores.numpy())  # exact float32 round trip


def test_write_scores_shape_mismatch_writes_nothing(tmp_path):
    path = tmp_path / "scores.npy"
    with pytest.raises(ValueError):
        write_scores(path, ["a", "b"], ["c"], torch.zeros(1, 1))
    assert list(tmp_path.iterdir()) == []


def test_read_split_bom_and_non_utf8_offset(tmp_path):
    path = write_bytes(tmp_path, b"\xef\xbb\xbfa 1\nb 2\n")
    assert read_split(path)[0] == SplitEntry("a", (1,))
    path = write_bytes(tmp_path, b"\xef\xbb\xbfa 1\nb\xff\n", name="bad.txt")
    with pytest.raises(InputError) as err:
        read_split(path)
    assert str(err.value) == f"{path}: line 2: not UTF-8 text (byte 0xff at offset 8)"


def test_written_files_are_not_private(tmp_path):
    target = tmp_path / "labels.txt"
    write_text_atomic(target, "a 1\n")
    assert target.stat().st_mode & 0o044 == 0o044  # readable by group/others, not 0600
