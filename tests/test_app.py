"""``tagclip app``'s engine (no web framework): the page's numbers are the library's numbers.

The scores of a request are held to ``tagclip tag``'s scores file and to :class:`Tagger`, its
masks to ``tagclip segment``'s, its thresholds and bars to hand computations; bad requests
give the page's messages; unreadable files are reported and never stop the request. The
server and the page in a real browser are tested in ``test_app_server.py``.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

import pipelines.segment as segment_module
from clip_es.cam_files import load_cam
from pipelines import app as A
from pipelines.command import main
from tagclip.registry import REL_THRESHOLD_COCOSTUFF, REL_THRESHOLD_DEFAULT
from tagclip.tagger import Tagger
from toolkit.images import DEFAULT_MAX_SIDE

TINY = helpers.TINY_CHECKPOINT
CLASSES = "cat, dog, cup, sofa"
NAMES = ["cat", "dog", "cup", "sofa"]
BACKGROUND = "floor, wall"
SCORE_ATOL = 1e-6  # one image per forward on both sides: the same operations, float32 rounding at most
PICTURES = {"cat": (60, 80), "coffee": (72, 48), "rocket": (48, 64)}  # small (H, W): the tiny model is fast on them


@pytest.fixture(scope="module")
def model():
    return helpers.tiny_model()


def _picture(seed: int, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 with spatial structure."""
    x = helpers.smooth_random_image(seed, h, w).permute(1, 2, 0).numpy()
    return np.clip(127.5 + 60.0 * x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    """Small smooth random pictures (JPEG and PNG), by id."""
    folder = tmp_path_factory.mktemp("pics")
    made = {}
    for seed, (name, (h, w)) in enumerate(PICTURES.items()):
        made[name] = folder / f"{name}{'.png' if seed % 2 else '.jpg'}"
        Image.fromarray(_picture(seed, h, w)).save(made[name])
    return made


@pytest.fixture()
def engine(model, tmp_path):
    return A.AppEngine(model, tmp_path / "work", DEFAULT_MAX_SIDE, model_name="tiny")


def test_scores_equal_tagclip_tag_and_tagger(engine, model, tmp_path, capsys, pics):
    files = [pics["cat"], pics["coffee"]]
    result = engine.run([str(f) for f in files], CLASSES, BACKGROUND)
    assert [r.image_id for r in result.images] == ["cat", "coffee"] and result.errors == []

    folder = tmp_path / "pics"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    scores_file = tmp_path / "scores.json"
    assert main(["tag", str(folder), "--classes", "cat,dog,cup,sofa", "--background", "floor,wall",
                 "--model_path", str(TINY), "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                 "--scores_out", str(scores_file), "--quiet"]) == 0
    command = json.loads(scores_file.read_text())
    tagger = Tagger(model, NAMES, ["floor", "wall"])
    for image, f in zip(result.images, files):
        assert list(image.scores) == NAMES
        page = np.array(list(image.scores.values()))
        np.testing.assert_allclose(page, np.array(list(command[image.image_id].values())), rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(page, np.array(list(tagger.tag(f).values())), rtol=0, atol=SCORE_ATOL)
        # the label rule by hand: min + 0.5 (max - min), tags strictly above it, best first
        threshold = page.min() + REL_THRESHOLD_DEFAULT * (page.max() - page.min())
        assert image.threshold == pytest.approx(threshold, abs=1e-6)
        above = [NAMES[i] for i in np.argsort(-page, kind="stable") if page[i] > threshold]
        assert image.tags == above
        assert [tag for tag, _ in image.cam_pictures] == image.tags
        assert result.summary["images"][image.image_id]["scores"] == image.scores


def test_masks_equal_tagclip_segment(engine, tmp_path, pics):
    image = pics["rocket"]
    result = engine.run([str(image)], CLASSES, BACKGROUND)
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "seg"
    assert main(["segment", str(folder), "--classes", "cat,dog,cup,sofa", "--background", "floor,wall",
                 "--model_path", str(TINY), "--device", "cpu", "--out", str(out)]) == 0
    with zipfile.ZipFile(result.archive) as archive:
        page_mask = np.array(Image.open(io.BytesIO(archive.read("masks/rocket.png"))))
        page_cam = np.load(io.BytesIO(archive.read("cams/rocket.npy")), allow_pickle=True).item()
    np.testing.assert_array_equal(page_mask, np.array(Image.open(out / "masks" / "rocket.png")))
    keys, maps = load_cam(out / "cams" / "rocket.npy")
    np.testing.assert_array_equal(page_cam["keys"], keys)
    np.testing.assert_array_equal(page_cam["attn_highres"], maps)
    tags = json.loads((out / "classes.json").read_text())["tags"]["rocket"]
    assert sorted(result.images[0].tags) == sorted(tags)


def test_archive_holds_palette_masks_cam_files_and_json(engine, pics):
    result = engine.run([str(pics["cat"])], CLASSES, BACKGROUND, settings="cocostuff")
    with zipfile.ZipFile(result.archive) as archive:
        assert sorted(archive.namelist()) == ["cams/cat.npy", "masks/cat.png", "results.json"]
        mask = Image.open(io.BytesIO(archive.read("masks/cat.png")))
        summary = json.loads(archive.read("results.json"))
        cam = np.load(io.BytesIO(archive.read("cams/cat.npy")), allow_pickle=True).item()
    assert mask.mode == "P" and mask.size == Image.open(pics["cat"]).size
    values = set(np.unique(np.array(mask)).tolist())
    tagged = {NAMES.index(t) + 1 for t in result.images[0].tags}
    assert values <= tagged | {0}
    assert summary["settings"] == "cocostuff" and summary["relative_threshold"] == REL_THRESHOLD_COCOSTUFF
    assert summary["mask_values"] == {"background": 0, "cat": 1, "dog": 2, "cup": 3, "sofa": 4}
    assert summary["images"]["cat"]["tags"] == result.images[0].tags
    assert sorted(cam["keys"].tolist()) == sorted(NAMES.index(t) for t in result.images[0].tags)
    assert cam["attn_highres"].shape[1:] == (mask.size[1], mask.size[0])


@pytest.mark.parametrize("classes, background, settings, message", [
    ("", "", "voc2007", "no class names given"),
    (" , ,\n", "", "voc2007", "no class names given"),
    ("cat, dog, cat", "", "voc2007", "class names: class name 'cat' is listed twice"),
    ("cat, dog", "wall, wall", "voc2007", "background words: background word 'wall' is listed twice"),
    ("cat, dog", "floor, dog", "voc2007", "background word 'dog' is also a class name"),
    ("cat, dog", "", "imagenet", "unknown settings 'imagenet'"),
])
def test_bad_vocabularies_are_refused_with_a_message(engine, classes, background, settings, message, pics):
    with pytest.raises(ValueError, match=message):
        engine.run([str(pics["cat"])], classes, background, settings)
    assert not list(engine.workdir.glob("request-*"))  # refused before any work


def test_words_are_split_on_commas_and_lines():
    assert A.split_words("cat, dog\n potted plant ,\n\n tv") == ["cat", "dog", "potted plant", "tv"]
    assert A.page_vocabulary("cat,dog", "sky\nwall") == (("cat", "dog"), ("sky", "wall"))


def test_no_files_is_refused(engine):
    with pytest.raises(ValueError, match="no image given"):
        engine.run([], CLASSES)


def test_unreadable_files_are_reported_and_the_rest_runs(engine, tmp_path, pics):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    notes = tmp_path / "notes.txt"
    notes.write_text("cat, dog\n")
    truncated = tmp_path / "half.png"
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(png, "PNG")
    truncated.write_bytes(png.getvalue()[:60])
    result = engine.run([str(broken), str(pics["cat"]), str(notes), str(truncated)], CLASSES)
    assert [r.image_id for r in result.images] == ["cat"]
    assert [e.split(":")[0] for e in result.errors] == ["broken.jpg", "notes.txt", "half.png"]
    assert all(len(e.splitlines()) == 1 and len(e) > len("broken.jpg: ") for e in result.errors)
    assert result.summary["errors"] == result.errors
    status = A.status_markdown(result)
    assert "1 image(s)" in status and "3 file(s) could not be read" in status and "- broken.jpg: " in status
    # the next request on the same engine works
    again = engine.run([str(pics["coffee"])], CLASSES)
    assert [r.image_id for r in again.images] == ["coffee"] and again.errors == []


def test_large_images_are_downscaled_like_max_side(model, tmp_path):
    side = 96
    big = tmp_path / "big.png"
    Image.fromarray(_picture(5, 150, 200)).save(big)
    result = A.AppEngine(model, tmp_path / "work", side).run([str(big)], CLASSES)
    (image,) = result.images
    assert image.size_hw == (72, side)  # 150 x 200 -> longest side 96, aspect kept
    expected = Tagger(model, NAMES).tag(big, max_side=side)
    np.testing.assert_allclose(list(image.scores.values()), list(expected.values()), rtol=0, atol=SCORE_ATOL)
    with zipfile.ZipFile(result.archive) as archive:
        assert Image.open(io.BytesIO(archive.read("masks/big.png"))).size == (side, 72)


def test_uploads_with_the_same_name_keep_apart(engine, tmp_path, pics):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / pics["cat"].name).write_bytes(pics["coffee"].read_bytes())
    result = engine.run([str(pics["cat"]), str(other / pics["cat"].name)], CLASSES)
    assert [r.image_id for r in result.images] == ["cat", "cat-2"]
    assert sorted(result.summary["images"]) == ["cat", "cat-2"]
    assert result.images[0].scores != result.images[1].scores


def test_text_features_are_encoded_once_per_vocabulary(engine, monkeypatch, pics):
    calls = []
    real = segment_module.encode_cam_text
    monkeypatch.setattr(segment_module, "encode_cam_text", lambda *a: calls.append(1) or real(*a))
    image = [str(pics["cat"])]
    engine.run(image, CLASSES, BACKGROUND)
    engine.run(image, "cat,dog,  cup,sofa", "floor\nwall")  # the same words, typed otherwise
    assert len(calls) == 1
    engine.run(image, CLASSES, "")
    assert len(calls) == 2
    for i in range(A.VOCABULARY_CACHE_SIZE):
        engine.segmenter((f"class{i}",), (), "voc2007")
    engine.run(image, CLASSES, BACKGROUND)  # evicted by the vocabularies since: encoded again
    assert len(calls) == 3 + A.VOCABULARY_CACHE_SIZE


def test_two_requests_at_once_both_finish(engine, pics):
    jobs = {"cat": ([str(pics["cat"])], CLASSES), "rocket": ([str(pics["rocket"])], "rocket, sky")}
    alone = {key: engine.run(*job).images[0].scores for key, job in jobs.items()}
    results, errors = {}, []

    def request(key):
        try:
            results[key] = engine.run(*jobs[key]).images[0].scores
        except Exception as err:  # noqa: BLE001 - handed to the main thread's assertion
            errors.append(err)

    threads = [threading.Thread(target=request, args=(key,)) for key in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == alone


def test_old_request_folders_are_removed(engine, monkeypatch, pics):
    monkeypatch.setattr(A, "KEEP_REQUESTS", 2)
    for _ in range(4):
        engine.run([str(pics["cat"])], "cat, dog")
    assert sorted(p.name for p in engine.workdir.iterdir()) == ["request-000003", "request-000004"]


def test_tag_bars_mark_the_threshold_and_escape_names(tmp_path):
    names = ["<b>cat</b>", "dog & co", "sofa"]
    image = A.ImageResult("x", "x<1>.jpg", (4, 4), dict(zip(names, [0.8, 0.2, 0.4])), ["<b>cat</b>"], 0.5,
                          tmp_path / "o.png", [])
    bars = A.tag_bars_html(image)
    assert "<b>cat</b>" not in bars and "&lt;b&gt;cat&lt;/b&gt;" in bars and "dog &amp; co" in bars
    # bars relative to the best score (0.8): 100 %, 50 %, 25 %; the threshold 0.5 at 62.5 %
    assert [float(w) for w in _between(bars, 'class="tc-bar" style="width:', '%"')] == [100.0, 50.0, 25.0]
    assert set(_between(bars, 'class="tc-thr" style="left:', '%"')) == {"62.50"}
    assert bars.count('class="tc-row tc-tag"') == 1 and bars.count('class="tc-row tc-other"') == 2


def test_tag_bars_show_the_tags_and_a_few_more(tmp_path):
    names = [f"c{i}" for i in range(40)]
    scores = dict(zip(names, np.linspace(1.0, 0.0, 40).tolist()))
    image = A.ImageResult("x", "x.jpg", (4, 4), scores, names[:3], 0.9, tmp_path / "o.png", [])
    bars = A.tag_bars_html(image)
    assert bars.count('class="tc-row') == 3 + A.MAX_BARS
    assert f"{40 - 3 - A.MAX_BARS} more classes not shown" in bars


def test_the_page_shows_each_image_with_its_mask_and_heat_maps(engine, pics):
    result = engine.run([str(pics["cat"]), str(pics["coffee"])], CLASSES, BACKGROUND)
    page = A.results_html(result)
    assert page.count('<section class="tc-image">') == 2
    for image in result.images:
        assert f'alt="mask of {image.file_name}"' in page
        for tag, path in image.cam_pictures:
            assert f'alt="CAM of {tag}"' in page and path.is_file()
    previews = _between(page, 'src="data:image/jpeg;base64,', '"')
    assert len(previews) == 2 + sum(len(r.cam_pictures) for r in result.images)
    first = Image.open(io.BytesIO(base64.b64decode(previews[0])))
    overlay = Image.open(result.images[0].overlay)
    assert first.format == "JPEG" and first.size == overlay.size  # small pictures: no downscaling
    assert overlay.height > PICTURES["cat"][0]  # the legend below the picture


def _between(text: str, start: str, end: str) -> list[str]:
    parts = text.split(start)[1:]
    return [p.split(end, 1)[0] for p in parts]


def test_vocabulary_picker_fills_the_boxes():
    classes, background, settings = A.vocabulary_words("COCO-Stuff")
    assert settings == "cocostuff" and len(A.split_words(classes)) == 171
    classes, background, settings = A.vocabulary_words("VOC 2007")
    assert A.split_words(classes)[:3] == ["aeroplane", "bicycle", "bird"] and settings == "voc2007"
    assert A.split_words(background)  # VOC's background words


def test_the_command_s_flags_reach_the_engine_and_the_server(monkeypatch, capsys):
    """``tagclip app``'s own flags, up to the page and its launch (a stand-in page records them)."""
    from pipelines.command import main

    calls = {}

    class Page:
        def queue(self, **kwargs):
            calls["queue"] = kwargs

        def launch(self, **kwargs):
            calls["launch"] = kwargs
            return None, f"http://{kwargs['server_name']}:{kwargs['server_port']}/", None

        def block_thread(self):
            calls["blocked"] = True

        def close(self):
            calls["closed"] = True

    def build(engine):
        calls["engine"] = engine
        return Page()

    monkeypatch.setattr(A, "build_page", build)
    assert main(["app", "--model_path", str(TINY), "--device", "cpu", "--max_side", "64", "--no_text_cache",
                 "--host", "localhost", "--port", "0"]) == 0
    engine = calls["engine"]
    assert engine.max_side == 64 and engine.use_text_cache is False and engine.model_name == str(TINY)
    assert next(engine.model.parameters()).device.type == "cpu"
    launch = calls["launch"]
    assert (launch["server_name"], launch["server_port"]) == ("localhost", 0)
    assert launch["allowed_paths"] == [str(engine.workdir)] and launch["max_file_size"] == A.MAX_UPLOAD
    assert calls["queue"] == {"default_concurrency_limit": 1, "max_size": A.QUEUE_SIZE}
    assert calls["blocked"] and calls["closed"]
    assert not engine.workdir.exists()  # the results folder goes with the server
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tagclip app: http://localhost:0/ (model ")


def test_progress_is_reported_per_image(engine, pics):
    seen = []
    engine.run([str(pics["cat"]), str(pics["coffee"])], CLASSES, progress=lambda f, text: seen.append((f, text)))
    assert seen == [(0.0, "text features"), (0.0, f"image 1 of 2: {pics['cat'].name}"),
                    (0.5, f"image 2 of 2: {pics['coffee'].name}"), (1.0, "writing the results")]


def test_an_address_the_app_cannot_listen_on_is_one_input_error():
    from toolkit.errors import InputError

    not_here = r"^192\.0\.2\.1:7860: cannot listen there \(Cannot assign requested address\)"
    with pytest.raises(InputError, match=not_here):
        A.check_address("192.0.2.1", 7860)  # TEST-NET-1: never this machine's
    with pytest.raises(InputError, match=r"^no-such-host\.invalid:7860: cannot listen there \(.+\); choose another "
                                         r"--host$"):
        A.check_address("no-such-host.invalid", 7860)
    A.check_address("127.0.0.1", 0)  # any free port of this machine: no error
