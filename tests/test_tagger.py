"""The README's Python API (``Tagger.tag``, ``Tagger.tag_many``) on the golden fixtures, and
prompts longer than CLIP's text context: an error naming the class, never a silent cut.

Token counts are checked against open_clip's tokenizer called directly with a context long
enough that it cuts nothing (an independent count: ``clip.text`` counts with its own call).
"""
from __future__ import annotations

import helpers
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip import TAGCLIP_TEMPLATES
from clip.prompts import encode_prompt_ensemble
from clip.text import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, TextTooLongError, tokenize
from clip_es.cams import CAM_TEMPLATE
from tagclip import Tagger
from tagclip.text_features import cache_key, class_embeddings
from toolkit.errors import InputError

# SPEC §3, VOC classification names in order (written out, not read from the registry).
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor"]


def open_clip_count(text: str) -> int:
    """Tokens of ``text`` (start and end token included) by open_clip, uncut."""
    row = open_clip.tokenize([text], context_length=1000)[0]
    assert row[0] == SOT_TOKEN
    return int((row != 0).sum())


def longest_template_tokens(templates) -> int:
    """Tokens of the longest template with an empty name (start and end token included)."""
    return max(open_clip_count(t.format("")) for t in templates)


# "cat" is one BPE token wherever it stands ("cat." splits into "cat" and "."), so a name of k
# cats adds exactly k tokens to every template.
def cats(k: int) -> str:
    return " ".join(["cat"] * k)


# ----------------------------------------------------------------------------- clip.text.tokenize

def test_tokenize_equals_open_clip_on_text_that_fits():
    texts = ["a photo of a dining table.", "there is a potted plant in the scene.", cats(75)]
    got = tokenize(texts)
    assert got.dtype == torch.int64 and got.shape == (3, CONTEXT_LENGTH)
    assert torch.equal(got, open_clip.tokenize(texts))
    # cats(75): start token, 75 cats, end token = 77 tokens, the whole context
    assert open_clip_count(cats(75)) == 77
    assert got[2, 0] == SOT_TOKEN and got[2, 76] == EOT_TOKEN and (got[2, 1:76] == got[2, 1]).all()


def test_tokenize_raises_on_overlong_text_instead_of_cutting():
    text = cats(76)  # 1 + 76 + 1 = 78 tokens
    assert open_clip_count(text) == 78
    with pytest.raises(TextTooLongError) as e:
        tokenize(["a dog", text, cats(200)])  # the first overlong text is reported
    assert isinstance(e.value, ValueError)
    assert (e.value.text, e.value.n_tokens, e.value.context_length) == (text, 78, 77)
    assert "78 tokens" in str(e.value) and "77" in str(e.value)
    with pytest.raises(TextTooLongError) as e:
        tokenize(["a b c"], context_length=4)  # 1 + 3 + 1 = 5 > 4
    assert (e.value.n_tokens, e.value.context_length) == (5, 4)


# ----------------------------------------------------------------------------- prompt ensembles

LONG_NAME = " ".join(["very"] * 60 + ["large", "striped", "cat", "sitting", "on", "a", "red",
                                      "sofa", "next", "to", "the", "open", "window", "in", "the",
                                      "morning", "light", "with", "a", "small", "dog", "and",
                                      "two", "birds", "near", "an", "old", "wooden", "chair",
                                      "under", "a", "lamp", "beside", "the", "tall", "green",
                                      "potted", "plant", "while", "rain"])  # 100 words


def test_long_name_has_about_100_words_and_does_not_fit():
    assert len(LONG_NAME.split()) == 100
    assert open_clip_count(TAGCLIP_TEMPLATES[0].format(LONG_NAME)) > CONTEXT_LENGTH


@pytest.mark.parametrize("templates", [TAGCLIP_TEMPLATES, (CAM_TEMPLATE,)], ids=["tagclip", "cam"])
def test_overlong_prompt_is_an_input_error_naming_the_class(tiny_model, monkeypatch, templates):
    calls = []
    real = tiny_model.encode_text
    monkeypatch.setattr(tiny_model, "encode_text", lambda tokens: calls.append(len(tokens)) or real(tokens))
    with pytest.raises(InputError) as e:
        encode_prompt_ensemble(tiny_model, ["dog", LONG_NAME, "sofa"], templates)
    assert calls == []  # every prompt is checked before the first forward
    template = templates[0]  # all templates fail with this name; the first is reported
    prompt = template.format(LONG_NAME)
    n = open_clip_count(prompt)  # independent count
    msg = str(e.value)
    assert e.value.path == LONG_NAME
    assert msg.startswith(f"{LONG_NAME}: ")
    assert repr(template) in msg and repr(prompt) in msg
    assert f"is {n} tokens long" in msg and f"holds {CONTEXT_LENGTH}" in msg
    assert "\n" not in msg


def test_tagger_with_overlong_class_or_background_fails(tiny_model, tmp_path):
    with pytest.raises(InputError) as e:
        Tagger(tiny_model, ["dog", LONG_NAME], text_cache_dir=tmp_path)
    assert e.value.path == LONG_NAME
    with pytest.raises(InputError) as e:
        Tagger(tiny_model, ["dog"], background=["floor", LONG_NAME], use_text_cache=False)
    assert e.value.path == LONG_NAME
    assert list(tmp_path.iterdir()) == []  # nothing was cached


def test_overlong_prompt_fails_even_with_a_cached_file(tiny_model, tmp_path):
    """A cache file for these names (as a version that cut prompts would have written) is
    not used: the prompts are checked first."""
    names, templates = ["dog", LONG_NAME], ("a photo of a {}.",)
    key = cache_key(tiny_model.checkpoint_sha256, names, templates, tiny_model.dtype)
    width = tiny_model.text_projection.shape[1]
    np.save(tmp_path / f"{key}.npy", np.ones((2, width), np.float32))
    with pytest.raises(InputError) as e:
        class_embeddings(tiny_model, names, templates, cache_dir=tmp_path)
    assert e.value.path == LONG_NAME


def test_longest_fitting_name_works_and_one_more_word_fails(tiny_model):
    # longest TagCLIP template: 11 tokens with an empty name (start and end included), so a
    # name of 77 - 11 = 66 one-token words fills the context exactly.
    base = longest_template_tokens(TAGCLIP_TEMPLATES)
    assert base == 11
    fits, too_long = cats(CONTEXT_LENGTH - base), cats(CONTEXT_LENGTH - base + 1)
    assert max(open_clip_count(t.format(fits)) for t in TAGCLIP_TEMPLATES) == 77
    tagger = Tagger(tiny_model, [fits, "dog"], use_text_cache=False)
    assert tagger.class_names == (fits, "dog")
    assert tagger.text.shape == (2, tiny_model.text_projection.shape[1])
    assert torch.isfinite(tagger.text).all()
    with pytest.raises(InputError) as e:
        Tagger(tiny_model, [too_long, "dog"], use_text_cache=False)
    assert e.value.path == too_long and "is 78 tokens long" in str(e.value)


# ----------------------------------------------------------------------------- Tagger.tag / tag_many

VOC_IDS = helpers.golden_image_ids("voc2007")


@pytest.fixture(scope="module")
def voc(tiny_model):
    """The README's ``Tagger.for_dataset(model, "voc2007")`` (default text cache: the test
    session's temporary cache folder, see conftest)."""
    return Tagger.for_dataset(tiny_model, "voc2007")


def reference_scores(image_id: str) -> np.ndarray:
    """Final scores of the ORIGINAL code for one golden VOC image."""
    return helpers.golden_npz("voc2007")[f"{image_id}/scores"]


def test_voc_class_names_are_the_reference_ones():
    assert helpers.golden_json("voc2007")["class_names"][:20] == VOC_CLASSES


@pytest.mark.parametrize("image_id", VOC_IDS)
def test_tag_path_gives_the_reference_scores(voc, image_id):
    got = voc.tag(helpers.golden_image_path("voc2007", image_id))
    assert isinstance(got, dict)
    assert list(got) == VOC_CLASSES
    assert all(type(v) is float for v in got.values())
    helpers.assert_close_abs_or_rel(list(got.values()), reference_scores(image_id), f"voc2007/{image_id}")


@pytest.mark.parametrize("image_id", ["2007_000121", "2007_000107"], ids=["rgb", "greyscale"])
def test_tag_pil_image_equals_tag_path(voc, image_id):
    path = helpers.golden_image_path("voc2007", image_id)
    with Image.open(path) as img:
        assert img.mode == ("RGB" if image_id == "2007_000121" else "L")
        from_pil = voc.tag(img)
    assert from_pil == voc.tag(str(path))
    helpers.assert_close_abs_or_rel(list(from_pil.values()), reference_scores(image_id), image_id)


def test_tag_many_equals_single_tags_in_the_given_order(voc):
    # Not the split order; the first two share a size (64x48) and go through one batch.
    ids = ["2008_000901", "2007_000121", "2008_000986"]
    paths = [helpers.golden_image_path("voc2007", i) for i in ids]
    many = voc.tag_many(paths)
    assert isinstance(many, list) and len(many) == 3
    for image_id, path, got in zip(ids, paths, many):
        assert list(got) == VOC_CLASSES
        single = voc.tag(path)
        np.testing.assert_allclose(list(got.values()), list(single.values()), rtol=0, atol=1e-6,
                                   err_msg=image_id)
        helpers.assert_close_abs_or_rel(list(got.values()), reference_scores(image_id), image_id)
    # the three rows differ, so a reordering could not pass the checks above
    rows = [tuple(d.values()) for d in many]
    assert len(set(rows)) == 3


# ----------------------------------------------------------------------------- test-session setup
# (tests/conftest.py: user caches in a session folder, the no-writes guard)

def test_user_caches_point_into_the_session_folder(voc):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tagclip.text_features import default_text_cache_dir

    home_cache = Path.home() / ".cache"
    for name in ("TAGCLIP_CACHE", "XDG_CACHE_HOME"):
        value = Path(os.environ[name])
        assert value.is_absolute() and home_cache not in (value, *value.parents), name
    assert default_text_cache_dir() == Path(os.environ["TAGCLIP_CACHE"]) / "text"
    # the README's Tagger.for_dataset (fixture `voc`) cached its text features there
    assert list(default_text_cache_dir().glob("*.npy"))
    # subprocesses inherit both
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['TAGCLIP_CACHE']); "
                          "print(os.environ['XDG_CACHE_HOME'])"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [os.environ["TAGCLIP_CACHE"], os.environ["XDG_CACHE_HOME"]]


def test_write_guard_snapshots_see_created_removed_and_modified_files(tmp_path):
    import os

    import conftest

    root = tmp_path / "repo"
    for rel in ("a.txt", "pkg/b.py", ".git/HEAD", ".venv/lib/x", "pkg/__pycache__/b.pyc",
                "build/out.o", "pkg/build/keep.txt", "x.egg-info/PKG-INFO", ".pytest_cache/v"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("0")
    before = conftest.snapshot_repository(root)
    assert set(before) == {"a.txt", "pkg", "pkg/b.py", "pkg/build", "pkg/build/keep.txt"}
    (root / "a.txt").unlink()
    (root / "pkg" / "b.py").write_text("changed")
    os.utime(root / "pkg" / "build" / "keep.txt", ns=(0, 0))  # same size, new mtime
    (root / "output").mkdir()
    (root / "output" / "labels.txt").write_text("x")
    (root / "pkg" / "__pycache__" / "c.pyc").write_text("ignored")
    (root / ".git" / "index").write_text("ignored")
    assert conftest.snapshot_changes(before, conftest.snapshot_repository(root)) == [
        "removed a.txt", "created output", "created output/labels.txt", "modified pkg/b.py",
        "modified pkg/build/keep.txt"]
    listing = conftest.snapshot_listing(root)
    (root / "new.txt").write_text("")
    assert conftest.snapshot_changes(listing, conftest.snapshot_listing(root)) == ["created new.txt"]


# ----------------------------------------------------------------------------- vocabulary checks

@pytest.mark.parametrize("names,background,message", [
    (["cat", "dog", "cat"], [], "class name 'cat' is listed twice"),
    (["cat", " dog ", "dog"], [], "class name 'dog' is listed twice"),     # names are compared stripped
    (["cat", "", "dog"], [], "class name 2 of 3 is empty"),
    (["cat", "   "], [], "class name 2 of 2 is empty"),
    ([], [], "no class names given"),
    (["cat", "dog"], ["sky", "dog"], "background word 'dog' is also a class name"),
    (["cat"], ["sky", "sky"], "background word 'sky' is listed twice"),
    (["cat"], ["sky", ""], "background word 2 of 2 is empty"),
])
def test_tagger_rejects_a_bad_vocabulary_before_any_encoding(names, background, message, tiny_model, monkeypatch):
    import tagclip.tagger as T

    def no_encoding(*args, **kwargs):
        raise AssertionError("text was encoded before the vocabulary was checked")

    monkeypatch.setattr(T, "class_embeddings", no_encoding)
    with pytest.raises(ValueError) as info:
        Tagger(tiny_model, names, background)
    assert str(info.value) == message


def test_tagger_rejects_a_batch_size_below_one(tiny_model):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        Tagger(tiny_model, ["cat"], batch_size=0)
