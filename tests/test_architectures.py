"""Other CLIP ViTs: OpenCLIP checkpoints (GELU or QuickGELU, other head widths) in .safetensors
and .bin, with their config beside them or named with ``--arch``, checked against open_clip's
own forward on random weights (the independent side)."""
from __future__ import annotations

import copy
import json
import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clip
import clip.preprocess
from clip import architecture
from clip.model import GELU, QUICK_GELU, Architecture
from toolkit.errors import InputError

# open_clip's features against ours, relative to the features' size (float32, CPU).
REL_TOL = 1e-5
# The logits combine both towers' differences, and are small for random weights (|logit| ~ 0.1).
LOGIT_REL_TOL = 1e-4
# Blocks per tower: enough to exercise every block type, small enough for the CPU suite.
CUT_LAYERS = 2
CASES = {  # open_clip config name -> (expected activation, vision head width, text head width)
    "ViT-B-16": (GELU, 64, 64),
    "ViT-B-16-quickgelu": (QUICK_GELU, 64, 64),
    "ViT-H-14": (GELU, 80, 64),
}


def _cut(name: str) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["vision_cfg"]["layers"] = CUT_LAYERS
    cfg["text_cfg"]["layers"] = CUT_LAYERS
    return cfg


def _open_clip_model(cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                 quick_gelu=bool(cfg.get("quick_gelu")))
    with torch.no_grad():  # open_clip zero-initialises some tensors; random values test more
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _save(model, cfg: dict, folder, fmt: str):
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = folder / ("open_clip_model.safetensors" if fmt == "safetensors" else "open_clip_pytorch_model.bin")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest value of ``b``."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_open_clip_checkpoints_give_open_clips_features(name, fmt, tmp_path):
    cfg = _cut(name)
    theirs = _open_clip_model(cfg, seed=len(name))
    path = _save(theirs, cfg, tmp_path / "hub", fmt)
    (path.parent / architecture.OPEN_CLIP_CONFIG_NAME).write_text(json.dumps({"model_cfg": cfg}))
    ours = clip.load_clip(path, device="cpu")
    activation, vision_hw, text_hw = CASES[name]
    facts = ours.architecture
    assert (facts.activation, facts.vision_head_width, facts.text_head_width) == (activation, vision_hw, text_hw)
    assert ours.visual.transformer.resblocks[0].attn.heads == cfg["vision_cfg"]["width"] // vision_hw
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = clip.tokenize(["a photo of a cat", "a diagram"])
    with torch.no_grad():
        want_image, want_text = theirs.encode_image(images), theirs.encode_text(tokens)
        got_image, got_text = ours.encode_image(images), ours.encode_text(tokens)
        logits_per_image, logits_per_text = ours(images, tokens)
    assert _close(got_image, want_image) <= REL_TOL
    assert _close(got_text, want_text) <= REL_TOL
    norm_i = want_image / want_image.norm(dim=-1, keepdim=True)
    norm_t = want_text / want_text.norm(dim=-1, keepdim=True)
    expected = theirs.logit_scale.exp() * norm_i @ norm_t.t()
    assert _close(logits_per_image, expected) <= LOGIT_REL_TOL and torch.equal(logits_per_text, logits_per_image.t())


def test_the_wrong_activation_is_measurably_wrong(tmp_path):
    """Why the facts matter: a GELU model run with QuickGELU (what OpenAI-layout loading assumes)
    moves the features far beyond the tolerance."""
    cfg = _cut("ViT-B-16")
    theirs = _open_clip_model(cfg, seed=3)
    path = _save(theirs, cfg, tmp_path, "safetensors")
    wrong = clip.load_clip(path, device="cpu", arch=Architecture(activation=QUICK_GELU, source="test"))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _close(wrong.encode_image(images), theirs.encode_image(images)) > 100 * REL_TOL


def test_arch_by_name_and_the_warning_without_facts(tmp_path, caplog):
    cfg = _cut("ViT-B-16")
    path = _save(_open_clip_model(cfg, seed=4), cfg, tmp_path, "bin")
    with caplog.at_level(logging.WARNING, logger="clip.architecture"):
        assumed = clip.load_clip(path, device="cpu")
    assert assumed.architecture.activation == QUICK_GELU
    warnings = [r.getMessage() for r in caplog.records if r.name == "clip.architecture"]
    assert len(warnings) == 1 and "assuming OpenAI's" in warnings[0] and "--arch" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.architecture"):
        named = clip.load_clip(path, device="cpu", arch="ViT-B-16")
    assert named.architecture.activation == GELU and not caplog.records
    with pytest.raises(InputError, match="unknown OpenCLIP model name"):
        clip.load_clip(path, device="cpu", arch="ViT-Nonexistent")


@pytest.mark.parametrize("config, found", [
    ({"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224"}, "text_cfg": {}}},
     "timm vision trunk"),
    ({"vision_cfg": {"width": 768}, "text_cfg": {"hf_model_name": "xlm-roberta-base"}}, "Hugging Face text tower"),
    ({"vision_cfg": {"width": 768, "ls_init_value": 1e-5}, "text_cfg": {}}, "ls_init_value"),
    (open_clip.get_model_config("ViT-g-14"), "mlp_ratio 4.3637"),
])
def test_models_that_are_not_plain_clip_vits_are_refused(config, found):
    with pytest.raises(InputError, match=found):
        architecture.from_open_clip_config(config, "cfg.json")


OPENAI_LAYOUTS = {"ViT-B/32": "ViT-B-32-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu",
                  "ViT-L/14": "ViT-L-14-quickgelu", "ViT-L/14@336px": "ViT-L-14-336-quickgelu"}


@pytest.mark.parametrize("openai_name", list(OPENAI_LAYOUTS))
def test_openai_api_gives_open_clips_openai_model(openai_name, tmp_path):
    """OpenAI's API (``clip.load`` -> (model, preprocess), ``encode_image``, ``encode_text``,
    ``model(image, text)``) on a random OpenAI-layout checkpoint of each OpenAI architecture (cut
    to 2 blocks), against open_clip's OpenAI path (``build_model_from_openai_state_dict``) and
    open_clip's evaluation transform with OpenAI's mean and std."""
    from open_clip.transform import image_transform
    from PIL import Image

    cfg = _cut(OPENAI_LAYOUTS[openai_name])
    # float16, as OpenAI's releases (open_clip's OpenAI path rounds the weights to float16 too)
    state = {k: v.half().contiguous() for k, v in _open_clip_model(cfg, seed=7).state_dict().items()}
    path = tmp_path / "openai_layout.pt"
    torch.save(state, path)
    theirs = open_clip.model.build_model_from_openai_state_dict(dict(state)).float().eval()
    model, preprocess = clip.load(str(path), device="cpu")
    assert model.dtype == torch.float32   # OpenAI's loader: float32 on the CPU
    size = cfg["vision_cfg"]["image_size"]
    picture = Image.fromarray((torch.rand(size + 37, size + 11, 3, generator=torch.Generator().manual_seed(3))
                               * 255).byte().numpy())
    want_input = image_transform(size, is_train=False, mean=clip.preprocess.CLIP_MEAN,
                                 std=clip.preprocess.CLIP_STD)(picture)
    image = preprocess(picture)
    assert image.shape == (3, size, size) and torch.allclose(image, want_input, atol=1e-6)
    tokens = clip.tokenize(["a photo of a dog", "x" * 400], truncate=True)
    with torch.no_grad():
        assert _close(model.encode_image(image[None]), theirs.encode_image(image[None])) <= REL_TOL
        assert _close(model.encode_text(tokens), theirs.encode_text(tokens)) <= REL_TOL
        logits_per_image, logits_per_text = model(image[None], tokens)
    assert logits_per_image.shape == (1, 2) and torch.equal(logits_per_text, logits_per_image.t())
    assert "ViT-L/14@336px" in clip.available_models()
    with pytest.raises(ValueError, match="jit=True"):
        clip.load(str(path), device="cpu", jit=True)


@pytest.mark.parametrize("patch, resolution", [(32, 224), (14, 224), (14, 336)])
def test_tag_and_cams_use_the_models_patch(patch, resolution, tmp_path, monkeypatch):
    """``tagclip tag`` and ``generate_cams.py`` on a B/32-, L/14- and L/14@336-layout model: the
    model input is rounded to multiples of the model's patch, the CAM grid is the input's patch
    grid, and each CAM has the image's own size."""
    import helpers
    import numpy as np
    from PIL import Image

    from clip_es.registry import get_cam_config
    from clip_es.trunk import encode_trunk
    from tagclip import Tagger

    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    state = helpers.random_state_dict(seed=5, patch_size=patch, image_resolution=resolution, vision_layers=12)
    ckpt = tmp_path / f"vit_p{patch}.pt"
    torch.save(state, ckpt)
    pics = tmp_path / "pics"
    pics.mkdir()
    w, h = 80, 48
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(pics / "a.jpg")
    model = clip.load_clip(ckpt, device="cpu")
    x, size_hw = clip.preprocess.load_model_input(pics / "a.jpg", patch_size=model.visual.patch_size)
    assert size_hw == (h, w) and x.shape[1] % patch == 0 and x.shape[2] % patch == 0
    assert x.shape[1] - h < patch and x.shape[2] - w < patch        # the next multiple, not more
    trunk = encode_trunk(model, x, get_cam_config("voc2012").affinity_layers)
    assert trunk.grid == (x.shape[1] // patch, x.shape[2] // patch)
    assert Tagger(model, ["cat", "dog"]).patch_size == patch
    keys, maps = _tag_then_cams(ckpt, pics, tmp_path, "a 0 14")
    assert keys.tolist() == [0, 14] and maps.shape == (2, h, w)


def test_paper_blocks_carried_to_other_depths_by_hand():
    from toolkit.depths import parse_layers, scale_layers

    assert scale_layers((8, 9, 10), 12) == (8, 9, 10)
    assert scale_layers((8, 9, 10), 24) == tuple(range(16, 22))           # ViT-L/14
    assert scale_layers(tuple(range(4, 11)), 24) == tuple(range(8, 22))   # VOC affinity
    assert scale_layers(tuple(range(4, 12)), 24) == tuple(range(8, 24))   # COCO affinity: to the last block
    # 32 blocks (ViT-H/14): block i of 12 -> floor(i*32/12) .. floor((i+1)*32/12) - 1
    assert scale_layers((8, 9, 10), 32) == (21, 22, 23, 24, 25, 26, 27, 28)
    assert scale_layers((8, 9, 10), 6) == (4, 5)                          # shallower: blocks shared
    assert parse_layers("8,9,10") == (8, 9, 10) and parse_layers("16-18, 3") == (3, 16, 17, 18)
    with pytest.raises(ValueError):
        parse_layers("8..10")


def test_a_deeper_model_refines_with_the_carried_blocks(tmp_path, capsys):
    import helpers

    from pipelines.command import main
    from tagclip import TagCLIPParams, Tagger

    model = helpers.random_model(seed=6, vision_layers=24)
    assert Tagger(model, ["cat", "dog"], use_text_cache=False).params.refine_layers == tuple(range(16, 22))
    with pytest.raises(ValueError, match="do not exist in a 24-block tower"):
        Tagger(model, ["cat"], params=TagCLIPParams(refine_layers=(30,), layers_depth=24), use_text_cache=False)
    ckpt = tmp_path / "deep.pt"
    torch.save(helpers.random_state_dict(seed=6, vision_layers=24), ckpt)
    pics = tmp_path / "pics"
    pics.mkdir()
    from PIL import Image
    Image.new("RGB", (64, 48), (90, 140, 30)).save(pics / "a.png")
    argv = ["tag", str(pics), "--classes", "cat,dog", "--model_path", str(ckpt), "--device", "cpu",
            "--output_dir", str(tmp_path / "out"), "--no_text_cache"]
    assert main(argv + ["--refine_layers", "30"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: --refine_layers: refinement blocks [30] do not exist in a 24-block tower"
    assert main(argv + ["--refine_layers", "20-23", "--quiet"]) == 0


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hugging_face_clipmodel_folder_gives_transformers_features(act, tmp_path):
    """A transformers CLIPModel saved with ``save_pretrained`` (config.json + model.safetensors)
    loads by its folder; image and text features equal transformers' own."""
    import transformers  # a test dependency (.ci/run installs it): the independent side

    theirs = transformers.CLIPModel.from_pretrained(_hf_folder(tmp_path / "hf", act)).eval()
    ours = clip.load_clip(tmp_path / "hf", device="cpu")
    assert ours.architecture.activation == (QUICK_GELU if act == "quick_gelu" else GELU)
    assert ours.visual.transformer.resblocks[0].attn.heads == 4
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    tokens = clip.tokenize(["a photo of a cat", "two dogs on a sofa"])
    with torch.no_grad():
        want_image = _projected(theirs.get_image_features(pixel_values=images))
        want_text = _projected(theirs.get_text_features(input_ids=tokens))
        assert _close(ours.encode_image(images), want_image) <= REL_TOL
        assert _close(ours.encode_text(tokens), want_text) <= REL_TOL


@pytest.mark.parametrize("keys, found", [
    ({"visual.conv1.weight": (8, 3, 16, 16), "visual.proj": (8, 4)}, "a vision tower alone"),
    ({"patch_embed.proj.weight": (8, 3, 16, 16), "blocks.0.attn.qkv.weight": (24, 8)}, "a timm ViT"),
    ({"visual.trunk.patch_embed.proj.weight": (8, 3, 16, 16), "token_embedding.weight": (10, 8)},
     "timm vision trunk"),
    ({"visual.layer1.0.conv1.weight": (8, 8, 1, 1), "visual.attnpool.c_proj.weight": (8, 8),
      "token_embedding.weight": (10, 8)}, "a ResNet CLIP"),
])
def test_files_that_are_not_clip_vits_name_what_they_are(keys, found, tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    with pytest.raises(InputError, match=found) as info:
        clip.load_clip(path, device="cpu")
    assert "supported: CLIP ViTs in OpenAI's layout" in str(info.value) and "\n" not in str(info.value)


def _tag_then_cams(ckpt, pics, tmp_path, label_line: str):
    """``tagclip tag`` on the folder, then ``generate_cams.py`` (VOC 2012) on one label-file line;
    the (keys, maps) of the CAM file of image ``a``."""
    from clip_es.cam_files import load_cam
    from clip_es.cli import generate_cams_main
    from pipelines.command import main

    assert main(["tag", str(pics), "--classes", "cat,dog", "--model_path", str(ckpt), "--device", "cpu",
                 "--output_dir", str(tmp_path / "out"), "--quiet"]) == 0
    (tmp_path / "labels.txt").write_text(label_line + "\n", encoding="utf-8")
    assert generate_cams_main(["--dataset", "voc2012", "--img_root", str(pics), "--split_file",
                               str(tmp_path / "labels.txt"), "--model_path", str(ckpt), "--cam_out_dir",
                               str(tmp_path / "cams"), "--device", "cpu"]) == 0
    return load_cam(tmp_path / "cams" / "a.npy")


def _projected(features):
    """transformers 4 returns the projected features; 5 wraps them as ``pooler_output``."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _hf_folder(folder, act: str = "gelu"):
    import transformers  # a test dependency (.ci/run installs it): the independent side

    torch.manual_seed(12)
    tower = dict(intermediate_size=512, num_hidden_layers=2, hidden_act=act, projection_dim=32)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=128, num_attention_heads=2, vocab_size=49408, max_position_embeddings=77,
                         **tower),
        vision_config=dict(hidden_size=128, num_attention_heads=4, image_size=64, patch_size=16, **tower),
        projection_dim=32)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _open_clip_checkpoint(folder, name: str, fmt: str = "safetensors"):
    cfg = _cut(name)
    path = _save(_open_clip_model(cfg, seed=8), cfg, folder, fmt)
    (path.parent / architecture.OPEN_CLIP_CONFIG_NAME).write_text(json.dumps({"model_cfg": cfg}))
    return path


def _training_checkpoint(folder):
    """OpenCLIP's training output: ``{"epoch", "name", "state_dict": {"module.…"}, "optimizer"}``."""
    cfg = _cut("ViT-B-16-quickgelu")
    model = _open_clip_model(cfg, seed=9)
    folder.mkdir(parents=True)
    path = folder / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}, path)
    return path


CHAIN_CASES = {
    "open_clip ViT-B-16 (GELU)": lambda d: _open_clip_checkpoint(d, "ViT-B-16"),
    "open_clip ViT-H-14 (80-wide heads)": lambda d: _open_clip_checkpoint(d, "ViT-H-14", "bin"),
    "open_clip training checkpoint": _training_checkpoint,
    "Hugging Face CLIPModel folder": _hf_folder,
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_tag_and_cams_run_on_every_supported_kind(case, tmp_path, monkeypatch):
    """The whole chain on each kind of checkpoint (2 blocks): the paper's blocks carried to its
    depth; on GELU models the CAM stage's Grad-CAM runs through autograd (the written-out pass
    covers QuickGELU blocks only)."""
    import numpy as np
    from PIL import Image

    from clip_es.gradcam import written_out_supported

    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    path = CHAIN_CASES[case](tmp_path / "model")
    model = clip.load_clip(path, device="cpu")
    assert written_out_supported(model) == (model.architecture.activation == QUICK_GELU)
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(pics / "a.jpg")
    keys, maps = _tag_then_cams(path, pics, tmp_path, "a 7 11")
    assert keys.tolist() == [7, 11] and maps.shape == (2, 40, 56) and np.isfinite(maps).all()
