"""CLIP-ES class activation maps from image-level labels (SPEC §5; quirks Q1, Q8).

Per image, with the labels of one label-file line:

1. :func:`encode_trunk` — blocks 0–10 of the vision tower without gradients (plain
   attention), the positional table always resized and float16-rounded (Q1). The affinity
   maps are summed as the blocks run, so no block's full map is kept.
2. :func:`gradcam` — block 11 with gradients from the output of its ``ln_1`` (the
   activation of interest); image feature = mean of ``ln_post`` over the PATCH tokens,
   ``@ proj``, normalised; probabilities = softmax over [the image's label rows, background
   rows] of exp(logit_scale)·cos. The Grad-CAMs of ALL labels come from one forward pass;
   label k's vector-Jacobian product uses the one-hot of its probability, and the products
   of several labels run as one batched backward pass (``is_grads_batched``) — on a GPU up
   to 8 labels, on a CPU as many as keep the batch cache-sized (one at a time for 500×375
   images, where that is faster; see GRADCAM_MAX_BATCH). Weights = spatial mean of the
   gradient over patch tokens; cam = ReLU(Σ_ch weight·activation), scaled twice as the
   reference's ``scale_cam_image`` and layer aggregation do.
3. :func:`transition_matrix` — the affinity (mean of the maps of ``CamConfig.affinity_layers``,
   patch×patch) normalised by columns then rows, twice more, symmetrised and squared.
4. :func:`refine` — per label, boxes of its cam (``scoremap2bbox``, all contours); the
   transition matrix with source columns outside the boxes zeroed times the cam; all labels
   in one matrix product: ``T @ (B ⊙ cam)`` equals ``(T ⊙ B_row) @ cam``.
5. :func:`highres` — min–max scaling and ``cv2.resize`` (bilinear) to the original image
   size; stored as float16.

A CAM file ``{id}.npy`` is what the reference's ``np.save`` wrote: a pickled dict
``{"keys": int64 (K,), "attn_highres": float16 (K, H, W)}`` (:func:`save_cam`,
:func:`load_cam`). :func:`load_cam` unpickles with a whitelist (numpy arrays only), so a CAM
folder from elsewhere cannot run code.

Precision (``--precision``): the trunk and the Grad-CAM forward/backward run in the model's
dtype; attention maps come back float32 from the model, and the probabilities, the gradients
(cast on arrival), the CAMs, the affinity and the refinement are float32.

The whole stage decides text vs. image by argument, never by sequence length, so a 76-patch
image (e.g. 304×64), on which the reference crashes (Q8), is handled like any other.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch

from clip import CLIP
from tagclip.boxes import CAM_CONTOURS, box_union, scoremap2bbox
from tagclip.errors import InputError
from tagclip.labels import atomic_writer
from tagclip.registry import CamConfig
from tagclip.text_features import encode_prompt_ensemble

# SPEC §5: the single prompt template of the CAM stage.
CAM_TEMPLATE = "a clean origami {}."
# SPEC §5: scale_cam_image's denominator, (x − min) / (max + 1e-7).
SCALE_EPS = 1e-7
# SPEC §5: normalisation rounds of the transition matrix after the first (column, row) one.
EXTRA_NORMALISATION_ROUNDS = 2
# SPEC §5: T = T·T, once.
TRANSITION_SQUARINGS = 1
# SPEC §5: Grad-CAM is scaled twice (scale_cam_image per layer, then again after the layer mean).
GRADCAM_SCALINGS = 2
# Labels per batched backward pass. A batch holds about labels x heads x (1 + P)^2 attention
# gradients (several copies). On a CPU, batching pays while that stays cache-sized; beyond it one
# backward per label over the same forward graph is faster (ViT-B/16, 2 threads: 768 patches,
# 8 labels: 0.94 s one by one vs 1.23 s batched; 280 patches: 0.32 s vs 0.26 s). A GPU takes up
# to GRADCAM_MAX_BATCH labels at once; the cap bounds memory.
GRADCAM_MAX_BATCH = 8
GRADCAM_CPU_BATCH_ELEMENTS = 8 * 2**20
# SPEC §5: CAM file format.
KEYS_DTYPE = np.int64
HIGHRES_DTYPE = np.float16
CAM_FILE_SUFFIX = ".npy"
CAM_KEYS = ("keys", "attn_highres")
# cv2.resize handles at most this many channels per call (OpenCV's CV_CN_MAX).
CV2_MAX_CHANNELS = 512
# Pickle globals a CAM file may name: numpy's array reconstruction only.
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


# ----------------------------------------------------------------------------- text


class CamText(NamedTuple):
    """Prompt embeddings of the CAM stage (each row normalised)."""
    foreground: torch.Tensor  # (C, E), CamConfig.class_names order
    background: torch.Tensor  # (M, E)


def encode_cam_text(model: CLIP, cfg: CamConfig) -> CamText:
    """Foreground and background rows with the single template (SPEC §5), once per run."""
    device = next(model.parameters()).device
    return CamText(encode_prompt_ensemble(model, cfg.class_names, [CAM_TEMPLATE]).to(device),
                   encode_prompt_ensemble(model, cfg.background, [CAM_TEMPLATE]).to(device))


def image_text_rows(text: CamText, labels: Sequence[int]) -> torch.Tensor:
    """(K + M, E): the image's label rows in label order, then every background row."""
    index = torch.as_tensor(list(labels), dtype=torch.long, device=text.foreground.device)
    return torch.cat([text.foreground[index], text.background], dim=0)


def target_rows(labels: Sequence[int]) -> list[int]:
    """Row of each label's probability: its first occurrence (the reference's ``list.index``)."""
    labels = [int(c) for c in labels]
    return [labels.index(c) for c in labels]


# ----------------------------------------------------------------------------- blocks 0..10


class Trunk(NamedTuple):
    tokens: torch.Tensor            # (1, 1 + P, width): output of blocks 0 .. n−2
    affinity_sum: torch.Tensor      # (P, P) float32: sum of the maps of the affinity blocks among them
    grid: tuple[int, int]           # (h/16, w/16)


@torch.no_grad()
def encode_trunk(model: CLIP, image: torch.Tensor, affinity_layers: Sequence[int]) -> Trunk:
    """Blocks 0 .. n−2 (plain attention, no gradients) on one (3, h, w) input.

    Maps are computed only for the blocks in ``affinity_layers``; the others run the fused
    attention (same outputs up to float rounding).
    """
    visual = model.visual
    x = image[None].to(device=visual.conv1.weight.device)
    grid = (x.shape[-2] // visual.patch_size, x.shape[-1] // visual.patch_size)
    tokens = visual.embed(x, always_resize_pos=True, round_pos_fp16=True)
    n_patches = grid[0] * grid[1]
    affinity = torch.zeros(n_patches, n_patches, dtype=torch.float32, device=tokens.device)
    wanted = set(affinity_layers)
    for i, block in enumerate(visual.transformer.resblocks[:-1]):
        tokens, weights = block(tokens, None, need_weights=i in wanted)
        if weights is not None:
            affinity += weights[0, 1:, 1:].float()
    return Trunk(tokens, affinity, grid)


# ----------------------------------------------------------------------------- Grad-CAM


class GradCamOutput(NamedTuple):
    cams: torch.Tensor       # (K, gh, gw) float32 in [0, 1], scaled twice (SPEC §5)
    probs: torch.Tensor      # (K + M,) softmax over the image's rows
    attn_last: torch.Tensor  # (1 + P, 1 + P) head-averaged map of the last block (unmasked)


def clip_probabilities(image_feature: torch.Tensor, rows: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """softmax(exp(logit_scale) · cos) of (B, E) features against (R, E) rows -> (B, R)."""
    image_feature = image_feature / image_feature.norm(dim=-1, keepdim=True)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return (logit_scale.exp() * image_feature @ rows.t()).softmax(dim=-1)


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per map (last two dims): (x − min) / (max(x − min) + 1e-7), the reference's scale_cam_image."""
    flat = maps.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (flat.max(dim=-1, keepdim=True).values + SCALE_EPS)
    return flat.reshape(maps.shape)


def last_block_probabilities(model: CLIP, tokens: torch.Tensor, activation: torch.Tensor,
                             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rest of the last block from its ``ln_1`` output, then the patch-mean image feature.

    ``tokens``: (B, 1 + P, width) block input; ``activation``: ln_1(tokens), possibly a leaf
    with gradients. Returns (probabilities (B, R), head-averaged map (B, 1 + P, 1 + P)).
    """
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    attended, weights = block.attn(activation, None, need_weights=True)
    x = tokens + attended
    x = x + block.mlp(block.ln_2(x))
    feature = visual.ln_post(x)[:, 1:].mean(dim=1) @ visual.proj  # (B, E)
    return clip_probabilities(feature.float(), rows.float(), model.logit_scale.float()), weights


def gradcam_from_gradients(activation: torch.Tensor, gradients: torch.Tensor,
                           grid: tuple[int, int]) -> torch.Tensor:
    """(1 + P, width) activation and (K, 1 + P, width) gradients -> (K, gh, gw) scaled cams.

    The class token is dropped; weights = mean of the gradient over patches per channel;
    cam = ReLU(Σ_ch w·A), then scaled twice (SPEC §5).
    """
    patches = activation[1:].float()                  # (P, width)
    weights = gradients[:, 1:].float().mean(dim=1)    # (K, width)
    cams = torch.relu(weights @ patches.t())          # (K, P)
    cams = cams.reshape(-1, *grid)
    for _ in range(GRADCAM_SCALINGS):
        cams = scale_maps(torch.relu(cams))
    return cams


def gradcam_batch_size(n_tokens: int, heads: int, device: torch.device) -> int:
    """Labels per batched backward pass for this image size and device (see GRADCAM_MAX_BATCH)."""
    if device.type != "cpu":
        return GRADCAM_MAX_BATCH
    per_label = heads * n_tokens * n_tokens
    return max(1, min(GRADCAM_MAX_BATCH, GRADCAM_CPU_BATCH_ELEMENTS // per_label))


def gradcam(model: CLIP, trunk: Trunk, rows: torch.Tensor, targets: Sequence[int],
            max_batch: Optional[int] = None) -> GradCamOutput:
    """Grad-CAMs of the probabilities ``targets`` (row indices) from ONE forward pass of the
    last block.

    ``rows``: (R, E) text rows of this image. The vector-Jacobian products of up to
    ``max_batch`` targets (default: :func:`gradcam_batch_size`) are computed in one batched
    backward pass (``torch.autograd.grad(..., is_grads_batched=True)``); further targets take
    further passes over the same graph. :func:`gradcam_per_target` is the reference's
    schedule (a forward and a backward pass per label), for tests.
    """
    block = model.visual.transformer.resblocks[-1]
    tokens = trunk.tokens.detach()
    with torch.no_grad():
        activation = block.ln_1(tokens)
    activation.requires_grad_(True)
    if max_batch is None:
        max_batch = gradcam_batch_size(tokens.shape[1], block.attn.heads, tokens.device)
    with torch.enable_grad():
        probs, weights = last_block_probabilities(model, tokens, activation, rows)
        targets = [int(t) for t in targets]
        parts = [activation.new_zeros(0, *activation.shape[1:])]
        for start in range(0, len(targets), max_batch):
            chunk = targets[start:start + max_batch]
            selectors = torch.zeros(len(chunk), *probs.shape, dtype=probs.dtype, device=probs.device)
            selectors[torch.arange(len(chunk), device=probs.device), 0,
                      torch.as_tensor(chunk, device=probs.device)] = 1.0
            (grads,) = torch.autograd.grad(probs, activation, selectors, is_grads_batched=True,
                                           retain_graph=start + max_batch < len(targets))
            parts.append(grads[:, 0])                             # (k, 1 + P, width)
    cams = gradcam_from_gradients(activation[0].detach(), torch.cat(parts), trunk.grid)
    return GradCamOutput(cams, probs[0].detach(), weights[0].detach())


def gradcam_per_target(model: CLIP, trunk: Trunk, rows: torch.Tensor,
                       targets: Sequence[int]) -> GradCamOutput:
    """The reference's schedule: one forward and one backward pass per target (for tests)."""
    block = model.visual.transformer.resblocks[-1]
    tokens = trunk.tokens.detach()
    cams = []
    for target in targets:
        with torch.no_grad():
            activation = block.ln_1(tokens)
        activation.requires_grad_(True)
        with torch.enable_grad():
            probs, weights = last_block_probabilities(model, tokens, activation, rows)
            (grad,) = torch.autograd.grad(probs[0, target], activation)
        cams.append(gradcam_from_gradients(activation[0].detach(), grad, trunk.grid))
    return GradCamOutput(torch.cat(cams), probs[0].detach(), weights[0].detach())


# ----------------------------------------------------------------------------- refinement


def affinity_matrix(trunk: Trunk, attn_last: torch.Tensor, affinity_layers: Sequence[int],
                    n_blocks: int) -> torch.Tensor:
    """(P, P) mean of the maps of ``affinity_layers`` (the last block's from ``attn_last``)."""
    total = trunk.affinity_sum
    if n_blocks - 1 in affinity_layers:
        total = total + attn_last[1:, 1:].float()
    return total / len(affinity_layers)


def transition_matrix(affinity: torch.Tensor) -> torch.Tensor:
    """SPEC §5: T = A / column sums; T = T / row sums; twice more (columns, rows);
    T = (T + Tᵀ) / 2; T = T·T."""
    t = affinity / affinity.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(EXTRA_NORMALISATION_ROUNDS):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.t()) / 2
    for _ in range(TRANSITION_SQUARINGS):
        t = t @ t
    return t


def box_masks(cams: np.ndarray, threshold: float) -> np.ndarray:
    """(K, gh, gw) float32 0/1: union of each cam's boxes (all contours, SPEC §5, §7)."""
    grid = cams.shape[1:]
    out = np.zeros(cams.shape, dtype=np.float32)
    for k, cam in enumerate(cams):
        out[k] = box_union(scoremap2bbox(cam, float(threshold), CAM_CONTOURS), grid)
    return out


def refine(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """refined_k = (T with source columns outside box_k zeroed) @ cam_k, all k at once.

    (P, P), (K, gh, gw), (K, gh, gw) -> (K, gh, gw); ``T @ (B_k ⊙ cam_k)`` is the same sum
    as ``(T ⊙ B_k as a row) @ cam_k`` (B is 0/1).
    """
    k, gh, gw = cams.shape
    sources = (masks * cams).reshape(k, gh * gw).t()  # (P, K)
    return (transition @ sources).t().reshape(k, gh, gw)


def highres(refined: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(K, gh, gw) -> (K, H, W) float32: scale_cam_image with cv2.resize (bilinear) to (W, H)."""
    h, w = size_hw
    scaled = refined - refined.min(axis=(1, 2), keepdims=True)
    scaled = (scaled / (scaled.max(axis=(1, 2), keepdims=True) + np.float32(SCALE_EPS))).astype(np.float32)
    out = np.empty((scaled.shape[0], h, w), dtype=np.float32)
    for start in range(0, scaled.shape[0], CV2_MAX_CHANNELS):
        part = scaled[start:start + CV2_MAX_CHANNELS]
        resized = cv2.resize(np.ascontiguousarray(part.transpose(1, 2, 0)), (w, h),
                             interpolation=cv2.INTER_LINEAR)
        out[start:start + part.shape[0]] = resized.reshape(h, w, -1).transpose(2, 0, 1)
    return out


# ----------------------------------------------------------------------------- one image


class CamResult(NamedTuple):
    keys: np.ndarray            # (K,) int64 class ids in label order
    attn_highres: np.ndarray    # (K, H, W) float16 refined CAMs at the original size
    gradcams: torch.Tensor      # (K, gh, gw) float32 Grad-CAMs before refinement
    probs: torch.Tensor         # (K + M,) probabilities of the image's rows
    attn_last: torch.Tensor     # (1 + P, 1 + P) last block's head-averaged map


def refine_cams(model: CLIP, trunk: Trunk, grad: GradCamOutput, cfg: CamConfig,
                size_hw: tuple[int, int]) -> np.ndarray:
    """Affinity refinement of Grad-CAMs -> (K, H, W) float32 at the original size."""
    n_blocks = len(model.visual.transformer.resblocks)
    transition = transition_matrix(affinity_matrix(trunk, grad.attn_last, cfg.affinity_layers, n_blocks))
    cams = grad.cams.float()
    masks = torch.from_numpy(box_masks(cams.cpu().numpy(), cfg.box_threshold)).to(cams.device)
    refined = refine(transition, cams, masks)
    return highres(refined.cpu().numpy(), size_hw)


def compute_cams(model: CLIP, image: torch.Tensor, labels: Sequence[int], text: CamText,
                 cfg: CamConfig, size_hw: tuple[int, int]) -> CamResult:
    """CLIP-ES CAMs of one image: (3, h, w) model input, its labels, the original (H, W)."""
    trunk = encode_trunk(model, image, cfg.affinity_layers)
    rows = image_text_rows(text, labels)
    grad = gradcam(model, trunk, rows, target_rows(labels))
    highres_maps = refine_cams(model, trunk, grad, cfg, size_hw)
    keys = np.asarray([int(c) for c in labels], dtype=KEYS_DTYPE)
    return CamResult(keys, highres_maps.astype(HIGHRES_DTYPE), grad.cams, grad.probs, grad.attn_last)


# ----------------------------------------------------------------------------- CAM files


def save_cam(path, keys, attn_highres) -> None:
    """Write ``{"keys": int64, "attn_highres": float16}`` as the reference's pickled-dict .npy,
    atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    keys = np.asarray(keys, dtype=KEYS_DTYPE).reshape(-1)
    maps = np.asarray(attn_highres).astype(HIGHRES_DTYPE, copy=False)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"attn_highres shape {maps.shape} does not match {keys.shape[0]} keys")
    with atomic_writer(path) as handle:
        np.save(handle, {"keys": keys, "attn_highres": maps}, allow_pickle=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_npy_object(path: Path):
    """The object stored in a .npy file, with numpy-only unpickling for object arrays."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if not dtype.hasobject:
            raise ValueError("holds a plain array, not the {keys, attn_highres} dict")
        if shape != ():
            raise ValueError(f"holds an object array of shape {shape}, not one dict")
        data = f.read()
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load().item()


def load_cam(path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys int64 (K,), attn_highres (K, H, W))`` of a CAM file (float16 as :func:`save_cam`
    writes it; other float dtypes are accepted as they are); InputError if not."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "CAM file not found" if not path.exists() else "not a file")
    try:
        obj = _read_npy_object(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError,
            IndexError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(path, f"not a readable CAM file ({reason})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"not a CAM file: holds a {type(obj).__name__}, not a dict")
    missing = [k for k in CAM_KEYS if k not in obj]
    if missing:
        raise InputError(path, f"not a CAM file: missing {', '.join(repr(k) for k in missing)}")
    keys, maps = obj["keys"], obj["attn_highres"]
    if not isinstance(keys, np.ndarray) or keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise InputError(path, "CAM file: 'keys' is not a 1-d integer array")
    if not isinstance(maps, np.ndarray) or not np.issubdtype(maps.dtype, np.floating):
        got = maps.dtype if isinstance(maps, np.ndarray) else type(maps).__name__
        raise InputError(path, f"CAM file: 'attn_highres' must be a float array (float16 as written), got {got}")
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise InputError(path, f"CAM file: 'attn_highres' shape {maps.shape} does not match "
                               f"{keys.shape[0]} keys")
    return keys.astype(KEYS_DTYPE, copy=False), maps


def cam_path(cam_out_dir, image_id: str) -> Path:
    """``{cam_out_dir}/{id}.npy``."""
    return Path(cam_out_dir) / f"{image_id}{CAM_FILE_SUFFIX}"
