"""Hugging Face ``transformers`` CLIPModel checkpoints, converted to OpenAI's layout on load.

A folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), or such a
weights file with its ``config.json`` beside it. The conversion is exact: the query, key and
value projections are concatenated into ``in_proj``, the towers' names mapped
(``pre_layrnorm`` -> ``ln_pre``, ``layer_norm1`` -> ``ln_1``, ``fc1`` -> ``c_fc``, ...), the two
projections transposed; the activation and head counts come from ``config.json``.
"""
from __future__ import annotations

import pathlib
import re
from typing import Mapping, Optional

import torch

from toolkit.errors import InputError
from toolkit.files import read_json_object

from .model import GELU, QUICK_GELU, Architecture

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
MODEL_TYPE = "clip"
# transformers' hidden_act names -> this package's activation names.
ACTIVATIONS = {"quick_gelu": QUICK_GELU, "gelu": GELU}
# The LayerNorm epsilon of OpenAI's CLIP (and this package's LayerNorm).
LAYER_NORM_EPS = 1e-5
TOWER_PREFIXES = ("vision_model.", "text_model.")
# Buffers some checkpoints carry that OpenAI's layout has no place for (positions 0..n-1).
DROPPED = re.compile(r"(vision|text)_model\.embeddings\.position_ids")

# Whole-name renames; per-block names follow in _BLOCK.
_TOP = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_BLOCK = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)")
_BLOCK_NAMES = {"self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
                "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
                "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
                "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
                "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}
_QKV = ("q_proj", "k_proj", "v_proj")


def is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(TOWER_PREFIXES) for key in state)


def weights_in(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The weights file of a Hugging Face model folder (one with ``config.json``), if any."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    return next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)


def to_openai_layout(state: Mapping[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict in OpenAI's layout (exact: concatenations and transposes only)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> q, k, v
    for key, value in state.items():
        if DROPPED.fullmatch(key):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()  # (E, W) -> (W, E)
            continue
        block = _BLOCK.fullmatch(key)
        if block is None:
            raise InputError(source, f"a Hugging Face checkpoint with a key this CLIP ViT does not have: {key}")
        tower, index, rest = block.groups()
        base = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
        if rest in _BLOCK_NAMES:
            out[base + _BLOCK_NAMES[rest]] = value
            continue
        proj, _, kind = rest.removeprefix("self_attn.").partition(".")
        if not rest.startswith("self_attn.") or proj not in _QKV or kind not in ("weight", "bias"):
            raise InputError(source, f"a Hugging Face checkpoint with a key this CLIP ViT does not have: {key}")
        qkv.setdefault((base, kind), {})[proj] = value
    for (base, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise InputError(source, f"a Hugging Face checkpoint without all of q/k/v in {base}self_attn")
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)  # (3W, ...) q, k, v
    return out


def read_config(path: pathlib.Path) -> Optional[dict]:
    """``config.json`` of a CLIPModel beside ``path`` (None when absent or not a CLIP config)."""
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        return None
    config = read_json_object(config_path, "model config")
    return config if config.get("model_type") == MODEL_TYPE else None


def architecture(config: dict, source: str) -> Architecture:
    """Activation and head widths of a CLIPModel ``config.json``."""
    towers = {name: config.get(f"{name}_config") or {} for name in ("vision", "text")}
    acts = {name: tower.get("hidden_act", "quick_gelu") for name, tower in towers.items()}
    if len(set(acts.values())) != 1 or acts["vision"] not in ACTIVATIONS:
        raise InputError(source, f"activations {acts} are not supported (one of {', '.join(ACTIVATIONS)} "
                                 "for both towers)")
    for name, tower in towers.items():
        if tower.get("layer_norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
            raise InputError(source, f"{name} layer_norm_eps {tower['layer_norm_eps']} differs from CLIP's "
                                     f"{LAYER_NORM_EPS}")

    def head_width(tower: dict) -> int:
        return int(tower["hidden_size"]) // int(tower["num_attention_heads"])

    try:
        return Architecture(ACTIVATIONS[acts["vision"]], head_width(towers["vision"]), head_width(towers["text"]),
                            source=source)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        raise InputError(source, "config.json lacks hidden_size / num_attention_heads of a tower") from None
