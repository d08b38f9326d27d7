"""CLIP-ES class activation maps from image-level labels (SPEC §5; quirks Q1, Q8).

Per image, with the labels of one label-file line (:func:`compute_cams`):

1. :func:`clip_es.trunk.encode_trunk` — blocks 0–10 of the vision tower without gradients,
   the positional table always resized and float16-rounded (Q1), the affinity maps summed
   as the blocks run.
2. :func:`clip_es.gradcam.gradcam` — Grad-CAM of block 11 for every label at once.
3. :func:`transition_matrix` — the affinity (mean of the maps of ``CamConfig.affinity_layers``,
   patch×patch) normalised by columns then rows, twice more, symmetrised and squared.
4. :func:`affinity_refine` — per label, boxes of its cam (``scoremap2bbox``, all contours);
   the transition matrix with source columns outside the boxes zeroed times the cam, as
   ``T @ (B ⊙ cam)`` (equal to ``(T ⊙ B_row) @ cam``).
5. :func:`highres` — min–max scaling and ``cv2.resize`` (bilinear) to the original image
   size; stored as float16 in the CAM file (:mod:`clip_es.cam_files`).

Steps 3–5 treat every label on its own (one product and one resize per label), so a label's
map from its Grad-CAM on depends on nothing else the image holds, to the last bit.

Precision (``--precision``): the trunk and the Grad-CAM forward/backward run in the model's
dtype; attention maps come back float32 from the model, and the probabilities, the gradients
(cast on arrival), the CAMs, the affinity and the refinement are float32.

The whole stage decides text vs. image by argument, never by sequence length, so a 76-patch
image (e.g. 304×64), on which the reference crashes (Q8), is handled like any other.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch

from clip import CLIP
from clip.kernels import ALL_AT_ONCE, AttentionSchedule
from clip.prompts import encode_prompt_ensemble
from toolkit.boxes import CAM_CONTOURS, box_masks

from .cam_files import HIGHRES_DTYPE, KEYS_DTYPE
from .gradcam import SCALE_EPS, GradCamOutput, gradcam
from .registry import CamConfig
from .trunk import Trunk, encode_trunk

# SPEC §5: the single prompt template of the CAM stage.
CAM_TEMPLATE = "a clean origami {}."
# SPEC §5: normalisation rounds of the transition matrix after the first (column, row) one.
EXTRA_NORMALISATION_ROUNDS = 2
# SPEC §5: T = T·T, once.
TRANSITION_SQUARINGS = 1
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


def affinity_refine(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """refined_k = (T with source columns outside box_k zeroed) @ cam_k, one class at a time.

    (P, P), (K, gh, gw), (K, gh, gw) -> (K, gh, gw); ``T @ (B_k ⊙ cam_k)`` is the same sum
    as ``(T ⊙ B_k as a row) @ cam_k`` (B is 0/1). Each class is its own matrix-vector
    product, as in the reference: one product over all K columns would let a class's last
    bits depend on how many other labels the image has (SPEC §5 treats classes apart). Each
    source vector is its own allocation: BLAS matrix-vector kernels round differently for a
    vector that starts mid-buffer (measured with MKL: 1 ulp).
    """
    k, gh, gw = cams.shape
    if not k:
        return cams.new_zeros(0, gh, gw)
    refined = [transition @ (masks[i] * cams[i]).reshape(gh * gw) for i in range(k)]  # K x (P,)
    return torch.stack(refined).reshape(k, gh, gw)  # (K, P) -> (K, gh, gw)


def highres(refined: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(K, gh, gw) -> (K, H, W) float32: scale_cam_image, then ``cv2.resize`` (bilinear) to (W, H),
    one class at a time as the reference did. A single multi-channel resize is not bit-equal
    to per-channel ones on every OpenCV release (5.0 differs for K >= 2), which would make a
    class's map depend on the image's other labels."""
    h, w = size_hw
    out = np.empty((refined.shape[0], h, w), dtype=np.float32)
    for k, cam in enumerate(refined):
        scaled = cam - cam.min()
        scaled = (scaled / (scaled.max() + np.float32(SCALE_EPS))).astype(np.float32)
        out[k] = cv2.resize(scaled, (w, h), interpolation=cv2.INTER_LINEAR)
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
    masks = torch.from_numpy(box_masks(cams.cpu().numpy(), float(cfg.box_threshold), CAM_CONTOURS)).to(cams.device)
    refined = affinity_refine(transition, cams, masks)
    return highres(refined.cpu().numpy(), size_hw)


def compute_cams(model: CLIP, image: torch.Tensor, labels: Sequence[int], text: CamText,
                 cfg: CamConfig, size_hw: tuple[int, int],
                 attention: AttentionSchedule = ALL_AT_ONCE) -> CamResult:
    """CLIP-ES CAMs of one image: (3, h, w) model input, its labels, the original (H, W).
    ``attention`` cuts the map-returning attention into steps (results do not depend on it;
    ``AttentionSchedule.for_device`` is the commands' rule)."""
    trunk = encode_trunk(model, image, cfg.affinity_layers, attention)
    rows = image_text_rows(text, labels)
    grad = gradcam(model, trunk, rows, target_rows(labels), attention=attention)
    highres_maps = refine_cams(model, trunk, grad, cfg, size_hw)
    keys = np.asarray([int(c) for c in labels], dtype=KEYS_DTYPE)
    return CamResult(keys, highres_maps.astype(HIGHRES_DTYPE), grad.cams, grad.probs, grad.attn_last)


