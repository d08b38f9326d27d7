"""What a checkpoint's shapes cannot say (activation, head widths), and where it is read.

In order:

1. an explicit ``arch``: an :class:`~clip.model.Architecture`, or an OpenCLIP model name
   (``--arch ViT-B-16``) read from open_clip's bundled model configs;
2. an OpenCLIP config beside the weights (``open_clip_config.json``, as hub releases ship it),
   or a Hugging Face CLIPModel's ``config.json`` (:mod:`clip.hf`);
3. one of OpenAI's releases (by SHA256): OpenAI's facts;
4. anything else in OpenAI's layout: OpenAI's facts, with one warning line naming ``--arch``.

OpenCLIP models that are not plain CLIP ViTs (a timm vision trunk such as SigLIP or EVA, or a
Hugging Face text tower) are refused with one line naming what was found.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Optional, Union

from toolkit.errors import InputError
from toolkit.files import read_json_object

from . import hf
from .model import GELU, HEAD_WIDTH, OPENAI_ARCHITECTURE, QUICK_GELU, Architecture

log = logging.getLogger(__name__)

# The OpenCLIP model config that hub releases keep beside their weights.
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
ARCH_FLAG = "--arch"
# open_clip's defaults for what a model config leaves out (open_clip's CLIPVisionCfg / CLIPTextCfg).
OPEN_CLIP_DEFAULT_TEXT_WIDTH = 512
OPEN_CLIP_DEFAULT_TEXT_HEADS = 8
# Config entries of OpenCLIP models whose towers this backbone does not implement.
UNSUPPORTED_TOWERS = {("vision_cfg", "timm_model_name"): "a timm vision trunk",
                      ("text_cfg", "hf_model_name"): "a Hugging Face text tower"}
# Config entries that change the block from OpenAI's (layer scale, no ln_pre, attentional pooling, ...).
# OpenAI's block: the MLP is 4 times the width.
OPENAI_MLP_RATIO = 4
UNSUPPORTED_VISION_OPTIONS = ("ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                              "pool_type", "output_tokens")


def from_open_clip_config(config: dict, source: str) -> Architecture:
    """The :class:`Architecture` of an OpenCLIP model config (``{"model_cfg": ...}`` as hub
    releases wrap it, or the bare config as open_clip bundles it)."""
    cfg = config.get("model_cfg", config)
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    for (tower, key), what in UNSUPPORTED_TOWERS.items():
        if (cfg.get(tower) or {}).get(key):
            raise InputError(source, f"an OpenCLIP model with {what} ({cfg[tower][key]}); supported: CLIP ViTs "
                                     "in OpenAI's layout (OpenAI's models, OpenCLIP's ViT-*/*-quickgelu models)")
    changed = [key for key in UNSUPPORTED_VISION_OPTIONS if vision.get(key) not in (None, False, "tok")]
    changed += [f"mlp_ratio {tower.get('mlp_ratio')}" for tower in (vision, text)
                if tower.get("mlp_ratio") not in (None, OPENAI_MLP_RATIO)]
    if changed:
        raise InputError(source, f"an OpenCLIP ViT with {', '.join(changed)}, which changes OpenAI's block; "
                                 "supported: CLIP ViTs in OpenAI's layout")
    text_width = text.get("width", OPEN_CLIP_DEFAULT_TEXT_WIDTH)
    text_heads = text.get("heads", OPEN_CLIP_DEFAULT_TEXT_HEADS)
    return Architecture(activation=QUICK_GELU if cfg.get("quick_gelu") else GELU,
                        vision_head_width=int(vision.get("head_width", HEAD_WIDTH)),
                        text_head_width=int(text_width // text_heads), source=source)


def named(name: str) -> Architecture:
    """The facts of an OpenCLIP model name (``ViT-B-16``, ``ViT-H-14``, ``ViT-B-16-quickgelu``)."""
    import open_clip  # deferred: only when a name is given

    config = open_clip.get_model_config(name)
    if config is None:
        raise InputError(ARCH_FLAG, f"unknown OpenCLIP model name {name!r} (open_clip.list_models() lists them)")
    return from_open_clip_config(config, f"{ARCH_FLAG} {name}")


def beside(path: pathlib.Path) -> Optional[Architecture]:
    """The facts of ``open_clip_config.json`` in the checkpoint's folder, if there is one."""
    config_path = path.with_name(OPEN_CLIP_CONFIG_NAME)
    if not config_path.is_file():
        return None
    return from_open_clip_config(read_json_object(config_path, "OpenCLIP config"), str(config_path))


def resolve(path: pathlib.Path, arch: Union[Architecture, str, None], openai_release: bool,
            warn: bool = True) -> Architecture:
    """The architecture facts of the checkpoint at ``path`` (the order in the module docstring);
    ``warn``: say in one line when OpenAI's facts are assumed for a file that is not OpenAI's."""
    if isinstance(arch, Architecture):
        return arch
    if arch:
        return named(arch)
    found = beside(path)
    if found is not None:
        return found
    hf_config = hf.read_config(path)
    if hf_config is not None:
        return hf.architecture(hf_config, str(path.parent / hf.CONFIG_NAME))
    if warn and not openai_release:
        log.warning("%s: activation and head width are not in the file; assuming OpenAI's (QuickGELU, %d-wide "
                    "heads). For another model pass %s NAME (an OpenCLIP model name) or put its %s beside it",
                    path, HEAD_WIDTH, ARCH_FLAG, OPEN_CLIP_CONFIG_NAME)
    return OPENAI_ARCHITECTURE
