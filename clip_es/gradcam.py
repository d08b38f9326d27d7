"""Grad-CAM of the last block for every label of an image (SPEC §5, step 2).

The activation of interest is the output of the last block's ``ln_1``; the image feature is
the mean of ``ln_post`` over the PATCH tokens, ``@ proj``, normalised; the probabilities are
the softmax over [the image's label rows, background rows] of exp(logit_scale)·cos. cam =
ReLU(Σ_ch weight · activation), the weight being the gradient's mean over the patch tokens,
scaled twice as the reference's ``scale_cam_image`` and layer aggregation do.

Two ways to the gradients, one result (:func:`gradcam` picks):

* the fast path, :func:`gradcam_written_out`: Grad-CAM needs, per label, only the gradient
  SUMMED over patch tokens, so the backward pass is written out (:func:`gradcam_weights`):
  one forward of the block for all labels, then the labels' backward passes as one batch in
  which the attention's input gradients are reduced to patch sums analytically — one
  attention matrix product per label instead of four and no input-projection product per
  token (3x faster per label on a CPU). Its contract, :func:`written_out_supported`: the
  block is this package's pre-LN QuickGELU block, exactly;
* any other block: :func:`gradcam_autograd`, one forward and one batched autograd backward.

:func:`gradcam_per_target` is the reference's schedule (a forward and a backward pass per
label); the tests hold all three together.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from clip import CLIP
from clip.intermediates import AttentionParts, attention_parts
from clip.kernels import ALL_AT_ONCE, AttentionSchedule, Linear, input_gradient, linear
from clip.model import QUICK_GELU_ALPHA, Attention, LayerNorm, QuickGELU, ResidualAttentionBlock

from .trunk import Trunk

# SPEC §5: scale_cam_image's denominator, (x − min) / (max + 1e-7).
SCALE_EPS = 1e-7
# SPEC §5: Grad-CAM is scaled twice (scale_cam_image per layer, then again after the layer mean).
GRADCAM_SCALINGS = 2
# Labels whose backward passes run as one batch are capped so that the widest temporary
# (labels x tokens x MLP width) stays under this many elements (1 GiB in float32).
GRADCAM_CHUNK_ELEMENTS = 2**28
# The MLP the written-out backward pass differentiates: c_fc, activation, c_proj, in this order.
MLP_LAYOUT = ["c_fc", "gelu", "c_proj"]


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
    attn = attention_parts(block.attn, activation, attention)
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
    GRADCAM_CHUNK_ELEMENTS allows; float32, matrix products in the model's dtype). Two
    identities keep the per-target work to two token-wise products and one attention product:

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
    per_token = gate * input_gradient(block.mlp.c_proj, xhat.to(dtype)).float()       # (L, 4D)
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
    d_hidden = gate * input_gradient(block.mlp.c_proj, w.to(dtype)).float()[:, None]  # (K, L, 4D)
    d_hidden.addcmul_(beta[..., None], per_token, value=-1.0)
    # c_fc and ln_2, then out_proj.
    d_normed = input_gradient(block.mlp.c_fc, d_hidden.to(dtype)).float()             # (K, L, D)
    grad = grad + _layer_norm_backward(d_normed, fwd.mid, *fwd.ln_2, block.ln_2.weight.float())
    d_heads = input_gradient(block.attn.out_proj, grad.to(dtype))                     # (K, L, D)
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


def written_out_supported(model: CLIP) -> bool:
    """The fast path's contract: the last block is exactly this package's pre-LN
    :class:`~clip.model.ResidualAttentionBlock` (``ln_1`` -> :class:`~clip.model.Attention`
    -> ``ln_2`` -> ``c_fc`` -> :class:`~clip.model.QuickGELU` -> ``c_proj``, every LayerNorm
    :class:`~clip.model.LayerNorm` and every product a :class:`~clip.kernels.Linear`), and
    ``ln_post`` is a :class:`~clip.model.LayerNorm`: the operations
    :func:`gradcam_weights` differentiates by hand. Any other block runs autograd."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    mlp = getattr(block, "mlp", None)
    layers = (type(block) is ResidualAttentionBlock and type(block.attn) is Attention
              and type(block.attn.out_proj) is Linear
              and all(type(ln) is LayerNorm for ln in (block.ln_1, block.ln_2, visual.ln_post)))
    return bool(layers and isinstance(mlp, torch.nn.Sequential) and list(mlp._modules) == MLP_LAYOUT
                and type(mlp.c_fc) is Linear and type(mlp.gelu) is QuickGELU and type(mlp.c_proj) is Linear)


def gradcam(model: CLIP, trunk: Trunk, rows: torch.Tensor, targets: Sequence[int],
            max_batch: Optional[int] = None, attention: AttentionSchedule = ALL_AT_ONCE) -> GradCamOutput:
    """Grad-CAMs of the probabilities ``targets`` (row indices): the written-out backward pass
    (:func:`gradcam_written_out`) where :func:`written_out_supported`, else batched autograd
    (:func:`gradcam_autograd`). Both give the reference's Grad-CAM (tests hold them together,
    and to :func:`gradcam_per_target`, the reference's schedule)."""
    if written_out_supported(model):
        return gradcam_written_out(model, trunk, rows, targets, max_batch, attention)
    return gradcam_autograd(model, trunk, rows, targets)


def gradcam_written_out(model: CLIP, trunk: Trunk, rows: torch.Tensor, targets: Sequence[int],
                        max_batch: Optional[int] = None,
                        attention: AttentionSchedule = ALL_AT_ONCE) -> GradCamOutput:
    """Grad-CAMs from ONE forward pass of the last block and one batched, written-out
    backward pass (:func:`gradcam_weights`), ``max_batch`` targets at a time (default: as
    many as GRADCAM_CHUNK_ELEMENTS allows). Only for blocks :func:`written_out_supported`."""
    fwd = last_block_forward(model, trunk.tokens.detach(), attention)
    targets = [int(t) for t in targets]
    probs, cotangents = _probability_gradients(model, fwd.pooled, rows, targets)
    weights = gradcam_weights(model, fwd, cotangents, max_batch)
    n_patches = fwd.out.shape[0] - 1
    cams = gradcam_from_weights(fwd.activation, weights / n_patches, trunk.grid)
    return GradCamOutput(cams, probs, fwd.attn.weights[0])


def gradcam_autograd(model: CLIP, trunk: Trunk, rows: torch.Tensor, targets: Sequence[int]) -> GradCamOutput:
    """Grad-CAMs of any last block: one forward pass through the block's own modules and one
    autograd backward pass for all targets (``is_grads_batched``)."""
    block = model.visual.transformer.resblocks[-1]
    tokens = trunk.tokens.detach()
    with torch.no_grad():
        activation = block.ln_1(tokens)
    activation.requires_grad_(True)
    with torch.enable_grad():
        probs, weights = last_block_probabilities(model, tokens, activation, rows)
        if len(targets):
            index = torch.as_tensor([int(t) for t in targets], device=probs.device)
            selectors = torch.zeros(len(targets), *probs.shape, dtype=probs.dtype, device=probs.device)
            selectors[torch.arange(len(targets), device=probs.device), 0, index] = 1.0  # (K, 1, R)
            (grads,) = torch.autograd.grad(probs, activation, selectors, is_grads_batched=True)  # (K, 1, L, D)
            grads = grads[:, 0]
        else:
            grads = activation.new_zeros(0, *activation.shape[1:])
    cams = gradcam_from_gradients(activation[0].detach(), grads, trunk.grid)
    return GradCamOutput(cams, probs[0].detach(), weights[0].detach())


def gradcam_per_target(model: CLIP, trunk: Trunk, rows: torch.Tensor,
                       targets: Sequence[int]) -> GradCamOutput:
    """The reference's schedule: one forward and one backward pass per target (the tests'
    independent side)."""
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
