"""CLIP-ES class activation maps from image-level labels (SPEC §5; quirks Q1, Q8).

Per image, with the labels of one label-file line:

1. :func:`encode_trunk` — blocks 0–10 of the vision tower without gradients (plain
   attention), the positional table always resized and float16-rounded (Q1). The affinity
   maps are summed as the blocks run, so no block's full map is kept.
2. :func:`gradcam` — block 11 from the output of its ``ln_1`` (the activation of interest);
   image feature = mean of ``ln_post`` over the PATCH tokens, ``@ proj``, normalised;
   probabilities = softmax over [the image's label rows, background rows] of
   exp(logit_scale)·cos. Grad-CAM needs, per label, only the gradient SUMMED over patch
   tokens (its spatial mean is the channel weight), so the backward pass is written out
   (:func:`gradcam_weights`): one forward of the block for all labels, then the labels'
   backward passes as one batch in which the attention's input gradients are reduced to
   patch sums analytically — one attention matrix product per label instead of four and
   no input-projection product per token. :func:`gradcam_per_target` is the reference's
   schedule through autograd; a test holds the two together. cam = ReLU(Σ_ch weight ·
   activation), scaled twice as the reference's ``scale_cam_image`` and layer aggregation do.
3. :func:`transition_matrix` — the affinity (mean of the maps of ``CamConfig.affinity_layers``,
   patch×patch) normalised by columns then rows, twice more, symmetrised and squared.
4. :func:`refine` — per label, boxes of its cam (``scoremap2bbox``, all contours); the
   transition matrix with source columns outside the boxes zeroed times the cam, as
   ``T @ (B ⊙ cam)`` (equal to ``(T ⊙ B_row) @ cam``).
5. :func:`highres` — min–max scaling and ``cv2.resize`` (bilinear) to the original image
   size; stored as float16.

Steps 3–5 treat every label on its own (one product and one resize per label), so a label's
map from its Grad-CAM on depends on nothing else the image holds, to the last bit.

A CAM file ``{id}.npy`` is what the reference's ``np.save`` wrote: a pickled dict
``{"keys": int64 (K,), "attn_highres": float16 (K, H, W)}`` (:func:`save_cam`,
:func:`load_cam`). :func:`load_cam` unpickles with a whitelist (numpy arrays only), so a CAM
folder from elsewhere cannot run code, and checks every size the file states (the pickle's
lengths and memo indices, each array's shape against its data and against MAX_CAM_CLASSES maps
of at most MAX_IMAGE_PIXELS pixels) before anything is allocated, so it cannot exhaust memory.

Precision (``--precision``): the trunk and the Grad-CAM forward/backward run in the model's
dtype; attention maps come back float32 from the model, and the probabilities, the gradients
(cast on arrival), the CAMs, the affinity and the refinement are float32.

The whole stage decides text vs. image by argument, never by sequence length, so a 76-patch
image (e.g. 304×64), on which the reference crashes (Q8), is handled like any other.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import reprlib
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch

from clip import CLIP
from clip.model import ALL_AT_ONCE, QUICK_GELU_ALPHA, AttentionParts, AttentionSchedule, linear
from tagclip.boxes import CAM_CONTOURS, box_union, scoremap2bbox
from tagclip.errors import InputError
from tagclip.images import MAX_IMAGE_PIXELS
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
# Labels whose backward passes run as one batch are capped so that the widest temporary
# (labels x tokens x MLP width) stays under this many elements (1 GiB in float32).
GRADCAM_CHUNK_ELEMENTS = 2**28
# SPEC §5: CAM file format.
KEYS_DTYPE = np.int64
HIGHRES_DTYPE = np.float16
CAM_FILE_SUFFIX = ".npy"
CAM_KEYS = ("keys", "attn_highres")
# CAM file limits (load_cam), checked before anything is allocated: at most MAX_CAM_CLASSES
# maps (and keys) per file, each map at most tagclip.images.MAX_IMAGE_PIXELS pixels (CAMs have
# the size of their image, and no reader of the toolkit accepts a larger image), so a file may
# ask for at most MAX_CAM_ELEMENTS array elements (fewer when the image size is known). No
# shipped vocabulary has more than 171 classes.
MAX_CAM_CLASSES = 1024
MAX_CAM_ELEMENTS = MAX_CAM_CLASSES * (MAX_IMAGE_PIXELS + 1)  # the maps plus the keys
# Widest array element a CAM file may hold (float64 / int64 are 8 bytes; longdouble 16).
MAX_CAM_ITEMSIZE = 16
# Bytes a CAM file holds besides its arrays' data (the .npy header and the pickle opcodes take
# well under 1 KiB): a file larger than its element limit allows plus this is not read.
CAM_FILE_OVERHEAD_BYTES = 64 * 1024
# Pickle globals a CAM file may name: numpy's array reconstruction only. Each one is replaced by
# a checked stand-in (_ArrayUnpickler); the class numpy.ndarray may not be called at all.
_RECONSTRUCT_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_SCALAR_NAMES = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NDARRAY_NAME = ("numpy", "ndarray")
_DTYPE_NAME = ("numpy", "dtype")
# The type strings numpy pickles a dtype of numbers (or of objects) with: kind and item size.
_DTYPE_SPEC = re.compile(r"[biufcO][0-9]{1,2}")
# Pickle opcodes that store into the memo: their index is bounded by the opcodes read so far
# (a pickler numbers its memo from 0), since the unpickler sizes its memo by the index.
_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


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
def encode_trunk(model: CLIP, image: torch.Tensor, affinity_layers: Sequence[int],
                 attention: AttentionSchedule = ALL_AT_ONCE) -> Trunk:
    """Blocks 0 .. n−2 (plain attention, no gradients) on one (3, h, w) input.

    Maps are computed only for the blocks in ``affinity_layers`` (their attention cut into
    steps by ``attention``); the others run the fused attention (same outputs up to float
    rounding).
    """
    visual = model.visual
    x = image[None].to(device=visual.conv1.weight.device)
    grid = (x.shape[-2] // visual.patch_size, x.shape[-1] // visual.patch_size)
    tokens = visual.embed(x, always_resize_pos=True, round_pos_fp16=True)
    n_patches = grid[0] * grid[1]
    affinity = torch.zeros(n_patches, n_patches, dtype=torch.float32, device=tokens.device)
    wanted = set(affinity_layers)
    for i, block in enumerate(visual.transformer.resblocks[:-1]):
        tokens, weights = block(tokens, None, need_weights=i in wanted, schedule=attention)
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


def gradcam_from_weights(activation: torch.Tensor, weights: torch.Tensor,
                         grid: tuple[int, int]) -> torch.Tensor:
    """(1 + P, width) activation and (K, width) channel weights -> (K, gh, gw) scaled cams.

    cam = ReLU(Σ_ch w·A) over the patch tokens (class token dropped), then scaled twice (SPEC §5).
    """
    patches = activation[1:].float()                  # (P, width)
    cams = torch.relu(weights.float() @ patches.t())  # (K, P)
    cams = cams.reshape(-1, *grid)                    # (K, P) -> (K, gh, gw)
    for _ in range(GRADCAM_SCALINGS):
        cams = scale_maps(torch.relu(cams))
    return cams


def gradcam_from_gradients(activation: torch.Tensor, gradients: torch.Tensor,
                           grid: tuple[int, int]) -> torch.Tensor:
    """(1 + P, width) activation and (K, 1 + P, width) gradients -> (K, gh, gw) scaled cams;
    the weights are the gradients' mean over the patch tokens."""
    return gradcam_from_weights(activation, gradients[:, 1:].float().mean(dim=1), grid)


def _layer_norm_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         gamma: torch.Tensor) -> torch.Tensor:
    """d LayerNorm(x) / dx applied to ``grad`` (…, L, D), with the forward's per-token mean
    and reciprocal std (L, 1): rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = grad ⊙ γ."""
    xhat = (x - mean) * rstd
    g = grad * gamma
    return rstd * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))


def _quick_gelu_derivative(u: torch.Tensor) -> torch.Tensor:
    """d/du [u · σ(αu)] = σ(αu) · (1 + αu · (1 − σ(αu)))."""
    s = torch.sigmoid(QUICK_GELU_ALPHA * u)
    return s * (1 + QUICK_GELU_ALPHA * u * (1 - s))


class LastBlockForward(NamedTuple):
    """Block 11's forward pass from its ``ln_1`` output, with what the backward pass reads."""
    activation: torch.Tensor  # (L, width) ln_1 output, the Grad-CAM activation
    attn: AttentionParts      # batch of one
    mid: torch.Tensor         # (L, width) float32 tokens + attention
    ln_2: tuple[torch.Tensor, torch.Tensor]    # per-token mean, rstd (L, 1) of ln_2's input
    hidden: torch.Tensor      # (L, 4·width) MLP pre-activation (c_fc output)
    out: torch.Tensor         # (L, width) float32 block output
    ln_post: tuple[torch.Tensor, torch.Tensor]  # per-token mean, rstd of ln_post's input
    pooled: torch.Tensor      # (width,) float32 mean of ln_post over the patch tokens


def _layer_norm_stats(ln: torch.nn.LayerNorm, x: torch.Tensor):
    """(LayerNorm(x) in float32 as the model computes it, (mean, rstd) per token)."""
    out, mean, rstd = torch.native_layer_norm(x.float(), ln.normalized_shape, ln.weight.float(),
                                              ln.bias.float(), ln.eps)
    return out, (mean, rstd)


@torch.no_grad()
def last_block_forward(model: CLIP, tokens: torch.Tensor,
                       attention: AttentionSchedule = ALL_AT_ONCE) -> LastBlockForward:
    """Block 11 (plain attention) on the trunk's (1, L, width) tokens, every intermediate kept.

    Same operations as :func:`last_block_probabilities` (the model's modules, its dtype for the
    matrix products, LayerNorm in float32)."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    dtype = tokens.dtype
    activation = block.ln_1(tokens)
    attn = block.attn.parts(activation, attention)
    mid = tokens + attn.out                                   # (1, L, width)
    normed, ln_2 = _layer_norm_stats(block.ln_2, mid)
    hidden = block.mlp.c_fc(normed.to(dtype))
    out = mid + block.mlp.c_proj(block.mlp.gelu(hidden))
    post, ln_post = _layer_norm_stats(visual.ln_post, out)
    return LastBlockForward(activation[0], attn, mid[0].float(), (ln_2[0][0], ln_2[1][0]), hidden[0],
                            out[0].float(), (ln_post[0][0], ln_post[1][0]), post[0, 1:].mean(dim=0))


def _probability_gradients(model: CLIP, pooled: torch.Tensor, rows: torch.Tensor,
                           targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (R,), d p_t / d pooled (K, width)) through ``@ proj``, the normalisation
    and the softmax (small; autograd)."""
    proj = model.visual.proj
    leaf = pooled.detach().to(proj.dtype).requires_grad_(True)
    with torch.enable_grad():
        probs = clip_probabilities((leaf @ proj)[None].float(), rows.float(), model.logit_scale.float())[0]
        if not targets:
            return probs.detach(), pooled.new_zeros(0, pooled.shape[0], dtype=torch.float32)
        index = torch.as_tensor(list(targets), device=probs.device)
        selectors = torch.zeros(len(targets), probs.shape[0], dtype=probs.dtype, device=probs.device)
        selectors[torch.arange(len(targets), device=probs.device), index] = 1.0
        (grads,) = torch.autograd.grad(probs, leaf, selectors, is_grads_batched=True)
    return probs.detach(), grads.float()


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(K, L, D) -> (heads, L, K·d): each head's columns of every label side by side."""
    k, n, d = t.shape
    return t.reshape(k, n, heads, d // heads).permute(2, 1, 0, 3).reshape(heads, n, k * (d // heads))


def gradcam_weights(model: CLIP, fwd: LastBlockForward, cotangents: torch.Tensor,
                    max_batch: Optional[int] = None) -> torch.Tensor:
    """Σ over patch tokens of d(target)/d(activation) for K targets given d(target)/d(pooled).

    ``cotangents``: (K, width) gradients at the pooled feature -> (K, width). The backward
    pass of block 11 written out, ``max_batch`` targets at a time (default: as many as
    GRADCAM_CHUNK_ELEMENTS allows; float32, matrix products in the model's dtype). Two identities keep the per-target work to two token-wise products and one
    attention product:

    * ln_post's backward at token i is rstd_i·(w − x̂_i·(x̂_i·w)/D)/P with w the centred
      γ ⊙ cotangent, so its product with c_proj's weight is rstd_i·(w W − (x̂_i·w)/D · x̂_i W)/P:
      x̂ W is computed once for all targets;
    * only patch SUMS of the attention's input gradients are needed. With S = q kᵀ (q
      scaled), P = softmax(S), O = P v, r_i = dO_i·O_i and D = Pᵀ dO:
        Σ_i dq_i = scale · Σ_j u_j k_j,  u_j = v_j·D_j − (Pᵀ r)_j
        Σ_{j≥1} dk_j = −Σ_i dS_i0 q_i,   dS_i0 = P_i0 (dO_i·v_0 − r_i)
        Σ_{j≥1} dv_j = Σ_{j≥1} D_j
      (the class token's query row gets no gradient, and the rows of dS sum to zero).
    """
    if not len(cotangents):
        return cotangents.new_zeros(0, fwd.out.shape[1])
    block = model.visual.transformer.resblocks[-1]
    dtype = fwd.hidden.dtype
    # Shared by every target: ln_post's x̂ and rstd (zero for the class token, which gets no
    # gradient), the MLP's gate, and x̂ times c_proj's weight.
    mean, rstd = fwd.ln_post
    xhat = (fwd.out - mean) * rstd                                                   # (L, D)
    rstd = rstd.t().clone()
    rstd[:, 0] = 0.0                                                                 # (1, L)
    gate = rstd[0, :, None] * _quick_gelu_derivative(fwd.hidden.float())              # (L, 4D)
    per_token = gate * block.mlp.c_proj.input_gradient(xhat.to(dtype)).float()       # (L, 4D)
    if max_batch is None:
        max_batch = max(1, GRADCAM_CHUNK_ELEMENTS // fwd.hidden.numel())
    return torch.cat([_target_weights(model, fwd, cotangents[s:s + max_batch], xhat, rstd, gate, per_token)
                      for s in range(0, cotangents.shape[0], max_batch)])


def _target_weights(model: CLIP, fwd: LastBlockForward, cotangents: torch.Tensor, xhat: torch.Tensor,
                    rstd: torch.Tensor, gate: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """:func:`gradcam_weights` for one chunk of K targets, given the shared terms."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    heads = block.attn.heads
    dtype = fwd.hidden.dtype
    n_tokens, width = fwd.out.shape
    k = cotangents.shape[0]
    # ln_post and the patch mean, times c_proj's weight. The mean's 1/P is applied at the very
    # end: gradients of a probability divided by P would sit in float16's subnormal range
    # when the model runs in half precision.
    w = cotangents * visual.ln_post.weight.float()
    w = w - w.mean(dim=-1, keepdim=True)                                             # (K, D)
    beta = (w @ xhat.t()) / width                                                    # (K, L)
    grad = rstd[..., None] * (w[:, None] - beta[..., None] * xhat)                   # (K, L, D) at x_out
    d_hidden = gate * block.mlp.c_proj.input_gradient(w.to(dtype)).float()[:, None]  # (K, L, 4D)
    d_hidden.addcmul_(beta[..., None], per_token, value=-1.0)
    # c_fc and ln_2, then out_proj.
    d_normed = block.mlp.c_fc.input_gradient(d_hidden.to(dtype)).float()             # (K, L, D)
    grad = grad + _layer_norm_backward(d_normed, fwd.mid, *fwd.ln_2, block.ln_2.weight.float())
    d_heads = block.attn.out_proj.input_gradient(grad.to(dtype))                     # (K, L, D)
    d_heads = _split_heads(d_heads, heads)                                           # (h, L, K·d)
    a = fwd.attn
    q, key, v, probs, out = a.q[0], a.k[0], a.v[0], a.probs[0], a.heads[0]          # (h, L, d), (h, L, L)
    head_dim = q.shape[-1]
    r = (d_heads.reshape(heads, n_tokens, k, head_dim).float() * out.float()[:, :, None]).sum(dim=-1)
    both = probs.transpose(1, 2) @ torch.cat([d_heads, r.to(dtype)], dim=-1)        # Pᵀ [dO | r] (h, L, K·d + K)
    pt_d = both[..., :-k].float().reshape(heads, n_tokens, k, head_dim)              # D = Pᵀ dO (h, L, K, d)
    pt_r = both[..., -k:].float()                                                    # Pᵀ r (h, L, K)
    d_heads = d_heads.reshape(heads, n_tokens, k, head_dim).float()                  # (h, L, K, d)
    u = (pt_d * v.float()[:, :, None]).sum(dim=-1) - pt_r                            # (h, L, K)
    sum_q = torch.einsum("hjk,hjd->khd", u, key.float()) * head_dim ** -0.5         # (K, h, d)
    ds0 = probs[:, :, 0, None].float() * ((d_heads * v[:, 0, None, None].float()).sum(dim=-1) - r)
    sum_k = -torch.einsum("hik,hid->khd", ds0, q.float())                            # (K, h, d)
    sum_v = pt_d[:, 1:].sum(dim=1).permute(1, 0, 2)                                  # (K, h, d)
    sums = torch.cat([t.reshape(k, width) for t in (sum_q, sum_k, sum_v)], dim=1)     # (K, 3D)
    return linear(sums.to(dtype), block.attn.in_proj_weight.t()).float() / (n_tokens - 1)  # (K, D)


def gradcam(model: CLIP, trunk: Trunk, rows: torch.Tensor, targets: Sequence[int],
            max_batch: Optional[int] = None, attention: AttentionSchedule = ALL_AT_ONCE) -> GradCamOutput:
    """Grad-CAMs of the probabilities ``targets`` (row indices) from ONE forward pass of the
    last block and one batched, written-out backward pass (:func:`gradcam_weights`).

    ``rows``: (R, E) text rows of this image. Targets are processed ``max_batch`` at a time
    (default: as many as GRADCAM_CHUNK_ELEMENTS allows). :func:`gradcam_per_target` is the
    reference's schedule (a forward and an autograd backward pass per label), for tests.
    """
    fwd = last_block_forward(model, trunk.tokens.detach(), attention)
    targets = [int(t) for t in targets]
    probs, cotangents = _probability_gradients(model, fwd.pooled, rows, targets)
    weights = gradcam_weights(model, fwd, cotangents, max_batch)
    n_patches = fwd.out.shape[0] - 1
    cams = gradcam_from_weights(fwd.activation, weights / n_patches, trunk.grid)
    return GradCamOutput(cams, probs, fwd.attn.weights[0])


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
    masks = torch.from_numpy(box_masks(cams.cpu().numpy(), cfg.box_threshold)).to(cams.device)
    refined = refine(transition, cams, masks)
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


class CamLimits(NamedTuple):
    """What one CAM file may ask for (:func:`cam_limits`)."""
    classes: int    # maps (and keys) per file
    pixels: int     # pixels per map
    elements: int   # array elements in the whole file
    pixels_from: str = "MAX_IMAGE_PIXELS"  # where ``pixels`` comes from, for messages

    def file_bytes(self) -> int:
        """Size beyond which a file cannot be a CAM file within these limits."""
        return self.elements * MAX_CAM_ITEMSIZE + CAM_FILE_OVERHEAD_BYTES


def cam_limits(expected_hw: Optional[tuple[int, int]] = None,
               max_elements: Optional[int] = None) -> CamLimits:
    """MAX_CAM_CLASSES maps of ``H x W`` pixels when the image size is known, else of at most
    MAX_IMAGE_PIXELS; ``max_elements`` lowers the element limit further."""
    pixels, pixels_from = MAX_IMAGE_PIXELS, "MAX_IMAGE_PIXELS"
    if expected_hw is not None:
        h, w = (int(v) for v in expected_hw)
        if h < 0 or w < 0:
            raise ValueError(f"expected_hw must be two sizes >= 0, got {expected_hw!r}")
        if h * w < pixels:
            pixels, pixels_from = h * w, f"the image's {w}x{h}"
    elements = min(MAX_CAM_ELEMENTS, MAX_CAM_CLASSES * (pixels + 1))
    if max_elements is not None:
        if int(max_elements) < 0:
            raise ValueError(f"max_elements must be >= 0, got {max_elements!r}")
        elements = min(elements, int(max_elements))
    return CamLimits(MAX_CAM_CLASSES, pixels, elements, pixels_from)


def _brief(value) -> str:
    """A short repr of a value read from a file (bounded in length and depth)."""
    return reprlib.repr(value)


def _is_plain_number_dtype(dtype) -> bool:
    """A numpy dtype of plain numbers (bool, integer, float, complex): no fields, no sub-array."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.names is None
            and dtype.subdtype is None and dtype.itemsize <= MAX_CAM_ITEMSIZE
            and dtype == np.dtype(dtype.str))


class _ArrayBudget:
    """The elements one CAM file may still ask for; every array's pickled state is checked
    against it (and against its own data) before numpy allocates the array."""

    def __init__(self, limits: CamLimits):
        self.limits = limits
        self.elements = 0

    def check_state(self, state) -> None:
        """``state``: the ``(version, shape, dtype, fortran, data)`` an ndarray is pickled with."""
        if not isinstance(state, tuple) or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise pickle.UnpicklingError("an array's pickled state is not numpy's")
        shape, dtype, fortran, data = state[-4:]
        if type(fortran) not in (bool, int):
            raise pickle.UnpicklingError("an array's pickled state is not numpy's")
        if (not isinstance(shape, tuple) or len(shape) > 3
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"array shape {_brief(shape)} is not a tuple of 0 to 3 sizes")
        if not (isinstance(dtype, np.dtype) and (dtype == np.dtype(object) or _is_plain_number_dtype(dtype))):
            raise pickle.UnpicklingError(f"array of dtype {_brief(dtype)} (a CAM file holds numbers)")
        limits = self.limits
        count = math.prod(shape)
        if len(shape) == 1 and count > limits.classes:
            raise pickle.UnpicklingError(f"a 1-d array of {count} elements, more keys than MAX_CAM_CLASSES = "
                                         f"{limits.classes}")
        if len(shape) == 3 and shape[0] > limits.classes:
            raise pickle.UnpicklingError(f"{shape[0]} maps, more than MAX_CAM_CLASSES = {limits.classes}")
        if len(shape) == 3 and shape[1] * shape[2] > limits.pixels:
            raise pickle.UnpicklingError(f"maps of {shape[2]}x{shape[1]} (WxH) = {shape[1] * shape[2]} pixels, more "
                                         f"than {limits.pixels_from} = {limits.pixels}")
        if not dtype.hasobject and self.elements + count > limits.elements:
            raise pickle.UnpicklingError(f"arrays of {self.elements + count} elements in all, more than the "
                                         f"{limits.elements} a CAM file may hold")
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
                raise pickle.UnpicklingError(f"object array of shape {shape} holds {got}")
        else:
            need = count * dtype.itemsize
            if not isinstance(data, (bytes, str)) or len(data) != need:
                got = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else f"a {type(data).__name__}"
                raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dtype} needs {need} bytes "
                                             f"of data, the file holds {got}")
            self.elements += count


class _CheckedArray(np.ndarray):
    """What a CAM file's arrays are rebuilt as: numpy's own ``__setstate__``, once the state
    passed its :class:`_ArrayBudget` (``load_cam`` returns plain ndarray views of them)."""

    def __setstate__(self, state):
        self.__dict__["_budget"].check_state(state)
        np.ndarray.__setstate__(self, state)


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` in a CAM file: an argument of numpy's ``_reconstruct``,
    never a callable (``ndarray(shape, dtype)`` would allocate the pickled shape)."""

    __slots__ = ()  # no __dict__ for a pickled BUILD to fill

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray; numpy pickles arrays with _reconstruct")


_NDARRAY = _NdarrayClass()
_RECONSTRUCT = np.empty(0).__reduce__()[0]    # numpy's _reconstruct, wherever numpy keeps it
_SCALAR = np.float16(0).__reduce__()[0]       # numpy's scalar


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers and plain containers, nothing else, within a budget.

    The globals a CAM file may name are numpy's array reconstruction, each replaced by a checked
    stand-in: ``_reconstruct`` gives an empty :class:`_CheckedArray` (numpy always pickles the
    shape ``(0,)`` there), whose ``__setstate__`` checks the shape, dtype and data length against
    the budget before numpy builds the array; ``scalar`` takes a plain number dtype and exactly
    its bytes; ``dtype`` a type string.
    """

    def __init__(self, file, budget: _ArrayBudget):
        super().__init__(file, encoding="latin1")
        self._budget = budget

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _RECONSTRUCT_NAMES:
            return self._reconstruct
        if key in _SCALAR_NAMES:
            return self._scalar
        if key == _NDARRAY_NAME:
            return _NDARRAY
        if key == _DTYPE_NAME:
            return self._dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def _reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY or shape != (0,):
            raise pickle.UnpicklingError(f"unexpected array reconstruction with shape {_brief(shape)}; numpy "
                                         f"pickles the shape (0,) there")
        array = _RECONSTRUCT(_CheckedArray, (0,), b"b")
        array.__dict__["_budget"] = self._budget
        return array

    @staticmethod
    def _dtype(spec, align=False, copy=False):
        # numpy 2 pickles dtype("f2", False, True); numpy 1 dtype("f2", 0, 1)
        if (not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec)
                or type(align) not in (bool, int) or type(copy) not in (bool, int)):
            raise pickle.UnpicklingError(f"unexpected dtype {_brief(spec)}")
        return np.dtype(spec, bool(align), bool(copy))

    @staticmethod
    def _scalar(dtype, data=None):
        if not _is_plain_number_dtype(dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise pickle.UnpicklingError(f"unexpected numpy scalar of dtype {_brief(dtype)}")
        return _SCALAR(dtype, data)


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes before anything is built: every counted argument (bytes,
    strings, frames) must lie within ``data`` (:func:`pickletools.genops` reads each one, so
    a length field cannot make the unpickler allocate more than the file holds) and every memo
    index must be below the number of opcodes read so far."""
    for count, (opcode, arg, pos) in enumerate(pickletools.genops(data), start=1):
        if opcode.name in _MEMO_PUT_OPCODES and arg >= count:
            raise ValueError(f"memo index {arg} at byte {pos} is out of range")


def _read_npy_object(path: Path, limits: CamLimits):
    """The object stored in a .npy file, with numpy-only unpickling for object arrays."""
    size = path.stat().st_size
    if size > limits.file_bytes():
        raise ValueError(f"{size} bytes, more than the {limits.file_bytes()} a CAM file within the limits holds")
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
        data = f.read(size - f.tell())  # the size was checked above; one read, one buffer
    _check_opcodes(data)
    obj = _ArrayUnpickler(io.BytesIO(data), _ArrayBudget(limits)).load()
    if not isinstance(obj, np.ndarray) or obj.shape != ():
        raise ValueError("the pickle does not hold one object array")
    return obj.item()


def load_cam(path, expected_hw: Optional[tuple[int, int]] = None,
             max_elements: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(keys int64 (K,), attn_highres (K, H, W))`` of a CAM file (float16 as :func:`save_cam`
    writes it; other float dtypes are accepted as they are); InputError if not.

    Nothing is allocated for an array before its size is checked (:func:`cam_limits`): at most
    MAX_CAM_CLASSES maps of at most MAX_IMAGE_PIXELS pixels, or of ``expected_hw`` pixels when
    the caller knows the image's ``(H, W)``, and at most ``max_elements`` elements in all when
    given; the file's size, the .npy header, each array's pickled shape, dtype and data length
    and the pickle's counted arguments must all agree with that. The size itself is not
    compared with ``expected_hw`` here (callers report a different size in their own words).
    """
    path = Path(path)
    limits = cam_limits(expected_hw, max_elements)
    if not path.is_file():
        raise InputError(path, "CAM file not found" if not path.exists() else "not a file")
    try:
        obj = _read_npy_object(path, limits)
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
    return np.asarray(keys).astype(KEYS_DTYPE, copy=False), np.asarray(maps)


def cam_path(cam_out_dir, image_id: str) -> Path:
    """``{cam_out_dir}/{id}.npy``."""
    return Path(cam_out_dir) / f"{image_id}{CAM_FILE_SUFFIX}"
