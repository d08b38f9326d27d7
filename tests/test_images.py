"""Tests for toolkit.images and clip.preprocess: bit-exact preprocessing, mode handling and input errors."""

import math
import warnings
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from clip.preprocess import CLIP_MEAN, CLIP_STD, PATCH_SIZE, load_model_input, to_model_input
from toolkit import images
from toolkit.errors import InputError
from toolkit.images import DEFAULT_MAX_SIDE, iter_image_files, open_image, to_rgb_or_l

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_JPG = FIXTURES / "golden" / "inputs" / "VOC" / "JPEGImages" / "2007_000121.jpg"
GOLDEN_NPY = FIXTURES / "golden_input_2007_000121.npy"
SHARED_GOLDEN = helpers.SHARED_GOLDEN  # <repo>/../shared/golden


def reference_transform(img):
    """The reference TagCLIP transform, built from torchvision."""
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    h = math.ceil(img.size[1] / 16) * 16
    w = math.ceil(img.size[0] / 16) * 16
    return Compose([
        Resize((h, w), interpolation=InterpolationMode.BICUBIC),
        lambda im: im.convert("RGB"),
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ])(img)


def stack3(img_l):
    """The reference's treatment of a greyscale image: stack to three channels first."""
    a = np.asarray(img_l)
    return Image.fromarray(np.stack([a, a, a], axis=2), mode="RGB")


def textured(size, channels, seed=0):
    """A smooth gradient plus noise, so resampling has something to do."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255.0 / max(w - 1, 1) + yy * 97.0 / max(h - 1, 1)) % 256
    planes = [np.clip(base * (0.5 + 0.25 * c) + rng.normal(0, 40, (h, w)), 0, 255)
              for c in range(channels)]
    arr = np.stack(planes, axis=2).astype(np.uint8)
    return arr[:, :, 0] if channels == 1 else arr


def one_line_with_path(err, path):
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------
# bit-exactness


def test_constants():
    assert PATCH_SIZE == 16
    assert DEFAULT_MAX_SIDE == 4096
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("size", [(37, 23), (64, 48), (10, 7), (300, 16)])
def test_rgb_matches_torchvision_exactly(size):
    img = Image.fromarray(textured(size, 3), mode="RGB")
    got = to_model_input(img)
    want = reference_transform(img)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [(37, 23), (53, 80), (5, 3)])
def test_greyscale_resize_then_stack_matches_stack_then_resize(size):
    img = Image.fromarray(textured(size, 1, seed=3), mode="L")
    got = to_model_input(img)
    want = reference_transform(stack3(img))
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_golden_reference_input_fixture():
    tensor, hw = load_model_input(GOLDEN_JPG)
    golden = torch.from_numpy(np.load(GOLDEN_NPY))
    assert golden.shape == (3, 48, 64)
    assert hw == (48, 64)
    assert tensor.shape == golden.shape
    assert float((tensor - golden).abs().max()) == 0.0
    assert torch.equal(tensor, golden)


def _shared_input_cases():
    """One case per preprocessed input tensor in the shared golden references. A missing
    reference file still yields a case, which then fails naming the file."""
    cases = []
    for npz, folder in (("classify_voc2007", "VOC"), ("classify_cocostuff", "COCOSTUFF"),
                        ("classify_coco2014", "COCO")):
        f = SHARED_GOLDEN / "reference" / f"{npz}.npz"
        if not f.exists():
            cases.append(pytest.param(str(f), None, folder, id=f"{npz}-missing"))
            continue
        with np.load(f) as z:
            keys = [key for key in z.files if key.endswith("/input")]
        cases += [(str(f), key, folder) for key in keys]
        if not keys:  # a reference without inputs: fail instead of testing nothing
            cases.append(pytest.param(str(f), None, folder, id=f"{npz}-no-inputs"))
    return cases


@pytest.mark.parametrize("npz,key,folder", _shared_input_cases())
def test_every_shared_golden_input(npz, key, folder):
    helpers.require_fixture(npz)
    assert key is not None, f"{npz} holds no '<id>/input' arrays"
    image_id = key.split("/")[0]
    path = helpers.require_fixture(SHARED_GOLDEN / "inputs" / folder / "JPEGImages" / f"{image_id}.jpg")
    with np.load(npz) as z:
        golden = torch.from_numpy(z[key])
    tensor, _ = load_model_input(path)
    assert torch.equal(tensor, golden)


def test_shared_greyscale_jpeg_matches_reference_pipeline():
    # The golden references hold no preprocessed tensor of a greyscale image, so check a real
    # greyscale JPEG from the golden inputs against the reference pipeline (stack, then resize).
    path = helpers.require_fixture(SHARED_GOLDEN / "inputs" / "VOC" / "JPEGImages" / "2007_000107.jpg")
    img = open_image(path)
    assert img.mode == "L"
    with Image.open(path) as raw:
        want = reference_transform(stack3(raw.convert("L")))
    assert torch.equal(to_model_input(img), want)


# ------------------------------------------------------------------------------------------
# modes


def test_greyscale_png_kept(tmp_path):
    arr = textured((20, 12), 1)
    p = tmp_path / "g.png"
    Image.fromarray(arr, mode="L").save(p)
    img = open_image(p)
    assert img.mode == "L"
    assert np.array_equal(np.asarray(img), arr)
    assert to_model_input(img).shape == (3, 16, 32)


def test_rgb_jpeg_kept(tmp_path):
    p = tmp_path / "c.jpg"
    Image.fromarray(textured((20, 12), 3), mode="RGB").save(p, quality=95)
    img = open_image(p)
    assert img.mode == "RGB"
    with Image.open(p) as raw:
        assert np.array_equal(np.asarray(img), np.asarray(raw))


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    cmyk = Image.fromarray(np.concatenate([textured((24, 16), 3), textured((24, 16), 1)[..., None]],
                                          axis=2), mode="CMYK")
    cmyk.save(p, quality=95)
    img = open_image(p)
    assert img.mode == "RGB"
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
        assert np.array_equal(np.asarray(img), np.asarray(raw.convert("RGB")))


def test_rgba_png_alpha_dropped(tmp_path):
    arr = np.zeros((6, 8, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 100, 50
    arr[..., 3] = 0  # fully transparent: the colour is still used, not composited on white
    p = tmp_path / "a.png"
    Image.fromarray(arr, mode="RGBA").save(p)
    img = open_image(p)
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == (200, 100, 50)


def _palette_image():
    img = Image.new("P", (8, 4))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    img.putpalette(palette)
    img.putdata([0, 1, 2, 3] * 8)
    return img


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png(tmp_path, transparent):
    p = tmp_path / "p.png"
    pal = _palette_image()
    if transparent:
        pal.save(p, transparency=3)
    else:
        pal.save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = open_image(p)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (255, 0, 0), (0, 255, 0),
                                                        (10, 20, 30)]


def test_palette_with_alpha_mode_pa():
    # Mode PA exists in every supported Pillow (>= 9.4; libImaging has had it since 2003), even
    # where ``Image.MODES`` does not list it (Pillow 9.x lists 12 modes, PA not among them).
    pa = _palette_image().convert("PA")
    assert pa.mode == "PA"
    out = to_rgb_or_l(pa)
    assert out.mode == "RGB"
    assert out.getpixel((3, 0)) == (10, 20, 30)


def test_16bit_png_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 1280], [65535, 65279, 0x8000, 0xABCD]], dtype=np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(values).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    img = open_image(p)
    assert img.mode == "L"
    got = np.asarray(img)
    assert np.array_equal(got, (values >> 8).astype(np.uint8))
    # 1280 = 0x0500: v >> 8 gives 5 where floor(v / 257) would give 4
    assert got[0, 3] == 5
    assert got[1, 3] == 0xAB


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16bit_byte_orders(mode):
    values = np.array([[0, 1280, 0xABCD, 65535]], dtype=np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    img = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    out = to_rgb_or_l(img)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[0, 5, 0xAB, 255]]


def test_32bit_int():
    small = Image.fromarray(np.array([[0, 1280, 65535, -7]], dtype=np.int32))
    assert small.mode == "I"
    assert np.asarray(to_rgb_or_l(small)).tolist() == [[0, 5, 255, 0]]
    big = Image.fromarray(np.array([[0, 100000, 200000]], dtype=np.int32))
    assert np.asarray(to_rgb_or_l(big)).tolist() == [[0, 127, 255]]


def test_float_mode(tmp_path):
    f = Image.fromarray(np.array([[-5.0, 0.4, 100.5, 254.6, 300.0, np.nan]], dtype=np.float32))
    assert f.mode == "F"
    out = to_rgb_or_l(f)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[0, 0, 101, 255, 255, 0]]
    p = tmp_path / "f.tif"
    f.save(p)
    assert np.asarray(open_image(p)).tolist() == [[0, 0, 101, 255, 255, 0]]


def test_one_bit(tmp_path):
    p = tmp_path / "b.png"
    arr = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(arr).convert("1").save(p)
    img = open_image(p)
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 255, 255], [255, 0, 0]]


def test_la_and_premultiplied_modes():
    la = Image.new("LA", (2, 2), (90, 0))
    assert to_rgb_or_l(la).mode == "L"
    assert to_rgb_or_l(la).getpixel((0, 0)) == 90
    la_pre = Image.new("La", (2, 2), (100, 128))
    out = to_rgb_or_l(la_pre)
    assert out.mode == "L"
    assert out.getpixel((0, 0)) == Image.new("La", (1, 1), (100, 128)).convert("LA").getpixel(
        (0, 0))[0]
    rgba_pre = Image.new("RGBa", (2, 2), (100, 50, 20, 128))
    assert to_rgb_or_l(rgba_pre).mode == "RGB"


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_other_colour_spaces(mode):
    img = Image.new(mode, (3, 2), (120, 130, 140))
    out = to_rgb_or_l(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == img.convert("RGB").getpixel((0, 0))


def test_to_model_input_converts_other_modes():
    rgba = Image.fromarray(textured((20, 9), 3), mode="RGB").convert("RGBA")
    assert torch.equal(to_model_input(rgba), to_model_input(rgba.convert("RGB")))


def test_tiny_image_rounds_up_to_one_patch(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(textured((10, 7), 3), mode="RGB").save(p)
    tensor, hw = load_model_input(p)
    assert hw == (7, 10)
    assert tensor.shape == (3, 16, 16)
    assert tensor.dtype == torch.float32


def test_wide_image(tmp_path):
    p = tmp_path / "wide.png"
    Image.fromarray(textured((304, 64), 3), mode="RGB").save(p)
    tensor, hw = load_model_input(p)
    assert hw == (64, 304)
    assert tensor.shape == (3, 64, 304)
    # already a multiple of 16: no resampling at all
    want = (torch.from_numpy(textured((304, 64), 3)).permute(2, 0, 1).float() / 255
            - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(tensor, want, atol=1e-6)


def test_patch_size_argument():
    img = Image.fromarray(textured((33, 10), 3), mode="RGB")
    assert to_model_input(img, patch_size=32).shape == (3, 32, 64)
    with pytest.raises(ValueError):
        to_model_input(img, patch_size=0)


def test_exif_orientation(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(textured((40, 20), 3), mode="RGB").save(p, exif=exif)
    assert open_image(p).size == (40, 20)
    assert open_image(p, exif_transpose=True).size == (20, 40)
    _, hw = load_model_input(p)
    assert hw == (20, 40)
    tensor, hw = load_model_input(p, exif_transpose=True)
    assert hw == (40, 20)
    assert tensor.shape == (3, 48, 32)


def test_max_side(tmp_path):
    p = tmp_path / "long.png"
    Image.new("RGB", (5000, 100), (10, 200, 30)).save(p)
    img = open_image(p, max_side=4096)
    assert max(img.size) == 4096
    assert img.size == (4096, 82)
    assert open_image(p).size == (4096, 82)  # the default
    assert open_image(p, max_side=None).size == (5000, 100)
    tensor, hw = load_model_input(p, max_side=1000)
    assert hw == (20, 1000)
    assert tensor.shape == (3, 32, 1008)
    with pytest.raises(ValueError):
        open_image(p, max_side=0)


def test_max_side_portrait_keeps_aspect(tmp_path):
    p = tmp_path / "tall.png"
    Image.new("L", (300, 1000), 7).save(p)
    img = open_image(p, max_side=500)
    assert img.size == (150, 500)
    assert img.mode == "L"


def test_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    img = open_image(p)
    assert img.mode in ("RGB", "L")
    assert img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(InputError) as err:
        open_image(p)
    assert "no such file" in one_line_with_path(err, p)
    with pytest.raises(InputError) as err:
        load_model_input(str(p))
    one_line_with_path(err, p)


def test_directory(tmp_path):
    d = tmp_path / "dir.jpg"
    d.mkdir()
    with pytest.raises(InputError) as err:
        open_image(d)
    assert "directory" in one_line_with_path(err, d)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(InputError) as err:
        open_image(p)
    assert "cannot read image" in one_line_with_path(err, p)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    with pytest.raises(InputError) as err:
        open_image(p)
    msg = one_line_with_path(err, p)
    assert "cannot read image" in msg
    assert msg.count(str(p)) == 1


def test_truncated_jpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    good = tmp_path / "good.jpg"
    Image.fromarray(textured((64, 64), 3), mode="RGB").save(good, quality=95)
    data = good.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        open_image(p)
    assert "cannot read image" in one_line_with_path(err, p)


def test_truncated_png(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    good = tmp_path / "good.png"
    Image.fromarray(textured((64, 64), 3), mode="RGB").save(good)
    data = good.read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        open_image(p)
    assert "cannot read image" in one_line_with_path(err, p)


def test_corrupt_header(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(textured((16, 16), 3), mode="RGB").save(good)
    data = bytearray(good.read_bytes())
    data[16:24] = b"\xff" * 8  # absurd width / height in IHDR (and a bad checksum)
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        open_image(p)
    one_line_with_path(err, p)


def test_zero_size_file_is_rejected(tmp_path):
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    p = tmp_path / "zero.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(InputError) as err:
        open_image(p)
    one_line_with_path(err, p)


def test_zero_size_image(tmp_path, monkeypatch):
    # PIL's readers refuse 0-pixel files themselves; make sure our own check also holds.
    p = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(p)
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: Image.new("RGB", (0, 3)))
    with pytest.raises(InputError) as err:
        open_image(p)
    assert "zero-size" in one_line_with_path(err, p)


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: PIL warns; 2500 px (> 2x limit): PIL errors
def test_decompression_bomb(tmp_path, monkeypatch, side):
    p = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning must not escape either
        with pytest.raises(InputError) as err:
            open_image(p)
    assert "too large" in one_line_with_path(err, p)


def test_default_bomb_limit_lets_12_megapixels_through():
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > 12_000_000


# ------------------------------------------------------------------------------------------
# folders


def test_iter_image_files(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", "d.TIFF", "e.webp", ".hidden.jpg", "noext"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    (tmp_path / "sub.jpg" / "inner.jpg").write_bytes(b"x")
    assert iter_image_files(tmp_path) == [("a", "a.JPG"), ("b", "b.png"), ("d", "d.TIFF"),
                                          ("e", "e.webp")]
    assert iter_image_files(str(tmp_path))[0] == ("a", "a.JPG")


def test_iter_image_files_empty(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as err:
        iter_image_files(tmp_path)
    msg = one_line_with_path(err, tmp_path)
    assert "no images found" in msg
    assert ".jpg" in msg and ".png" in msg


def test_iter_image_files_missing_and_not_a_folder(tmp_path):
    with pytest.raises(InputError) as err:
        iter_image_files(tmp_path / "nope")
    one_line_with_path(err, tmp_path / "nope")
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(InputError) as err:
        iter_image_files(f)
    one_line_with_path(err, f)


def test_iter_image_files_duplicate_ids(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InputError) as err:
        iter_image_files(tmp_path)
    assert "a.jpg" in one_line_with_path(err, tmp_path)
