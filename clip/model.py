"""CLIP ViT (OpenAI architecture and parameter names) with the hooks TagCLIP and CLIP-ES need.

SPEC §2. Differences from OpenAI's ``clip/model.py`` are all additive:

* every block can return its attention map averaged over heads, computed from the scores
  WITHOUT the additive mask (the reference returns the unmasked softmax even when a mask
  changed the block's output);
* attention masks are arguments of ``forward`` (one per block), never state of a module;
* the positional table is resized to any patch grid, with the reference's float16 rounding
  (quirk Q1) as an explicit switch;
* tokens are batch-first, ``(batch, tokens, width)``; parameter names are unchanged, so
  OpenAI checkpoints load strictly.

Attention runs on ``torch.nn.functional.scaled_dot_product_attention`` unless maps are
requested; the explicit path follows the reference's order of operations
(``q * scale`` before ``q @ kᵀ``) so that its maps match bit for bit where possible.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import printable

# SPEC §2: heads are width // 64 in both towers, whatever the checkpoint (OpenAI build_model).
HEAD_WIDTH = 64
# SPEC §2: QuickGELU constant.
QUICK_GELU_ALPHA = 1.702
# oneDNN's fp32 GEMM beats MKL's sgemm by 5-15 % on the AMD CPUs we measured (same math up to
# summation order); every float32 CPU product of the model goes through it, with and without
# gradients, so that no result depends on autograd state.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN copies a plain weight into its blocked layout on every call; modules keep the blocked
# copy instead (4-8 % less time per product for ViT-B/16, bit-identical results; about one
# more copy of the float32 weights in memory). The layout is chosen for this many input rows
# (the main pass of a 500x375 image); every row count from 20 to 1576 ran as fast with it.
_ONEDNN_PACK_ROWS = 769
# Shape of the capability probe of weight packing (rows, input width, output width).
_PACK_PROBE_SHAPE = (_ONEDNN_PACK_ROWS, 64, 48)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN runs float32 products on the CPU (the kernel choice reads device and dtype only)."""
    return (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32)


@functools.lru_cache(maxsize=None)
def packing_supported() -> bool:
    """Whether this build can keep weights in oneDNN's blocked layout: the reorder operator
    exists and a product with a packed weight equals the plain oneDNN product to the bit."""
    if not (_ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    rows, width, out = _PACK_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _ONEDNN_PACK_ROWS)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                           torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    except RuntimeError:  # an operator this build registers but cannot run
        return False


def _packed(weight: torch.Tensor, cache: dict, slot: str) -> torch.Tensor:
    """The blocked copy of ``weight`` kept in ``cache[slot]``, redone when the weight changed."""
    key = (weight.data_ptr(), weight._version, weight.shape, weight.stride())
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_PACK_ROWS))
        cache[slot] = hit
    return hit[1]


class _OneDNNLinear(torch.autograd.Function):
    """x @ weightᵀ + bias through oneDNN (``kernel_weight``: the weight or its blocked copy);
    the backward pass is the plain one, so the forward is the same with or without autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel_weight):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, kernel_weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # (..., out) -> (N, out)
        grad_x = grad @ weight if need_x else None
        grad_w = rows.t() @ x.reshape(-1, x.shape[-1]) if need_w else None  # (out, N) @ (N, in)
        grad_b = rows.sum(dim=0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           cache: Optional[dict] = None, slot: str = "weight") -> torch.Tensor:
    """``F.linear`` (x @ weightᵀ + bias), through oneDNN for float32 on the CPU; with a
    ``cache`` dict the weight's blocked copy is kept there under ``slot``."""
    if _onednn_applies(x, weight):
        # Inference-mode tensors have no version counter to notice in-place changes with.
        packable = cache is not None and not weight.is_inference() and packing_supported()
        kernel_weight = _packed(weight, cache, slot) if packable else weight
        try:
            return _OneDNNLinear.apply(x, weight, bias, kernel_weight)
        except RuntimeError:  # a layout this build's oneDNN does not take: the portable path
            pass
    return F.linear(x, weight, bias)


class PackedWeights:
    """Mixin for modules whose products go through :func:`linear` with a weight cache: the
    cache is dropped when parameters move or change dtype (``_apply``) and never pickled."""

    @property
    def weight_cache(self) -> dict:
        return self.__dict__.setdefault("_onednn_weights", {})

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_onednn_weights", None)
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_onednn_weights", None)
        return state


class Linear(PackedWeights, nn.Linear):
    """``nn.Linear`` (same parameters and names) running :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_cache, "weight")

    def input_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ weight: the gradient w.r.t. the input, given the gradient w.r.t. the output."""
        return linear(grad, self.weight.t(), None, self.weight_cache, "weight_t")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (input, weight and bias) whatever the dtypes (SPEC §2);
    the result has the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(dtype)


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x); one temporary instead of three, same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.mul(x, QUICK_GELU_ALPHA).sigmoid_()
        return gate.mul_(x) if not torch.is_grad_enabled() else x * gate


class AttentionSchedule(NamedTuple):
    """How the explicit attention path (the one that returns maps) is cut into steps.

    Every schedule computes the same products per image and head, and the head average
    always sums the heads one after another, so only speed and memory differ: outputs and
    maps are bit-equal at CLIP's sizes (measured at 197 and 769 tokens); for tiny matrices a
    BLAS may round a batched product apart from single ones (tests allow 1e-6 there). A CPU is fastest with one image and one head at a time, where one score
    block stays in cache (ViT-B/16 at 769 tokens: as fast on plain blocks, half the time on
    the main pass's self-only block, whose softmax is nearly all tiny values); a GPU with
    everything at once. :meth:`for_device` is that rule; pass another schedule to override it.
    """
    images: Optional[int] = None  # images per step; None: the whole batch
    heads: Optional[int] = None   # heads per step; None: all heads

    @classmethod
    def for_device(cls, device) -> "AttentionSchedule":
        return CPU_ATTENTION if torch.device(device).type == "cpu" else ALL_AT_ONCE


ALL_AT_ONCE = AttentionSchedule()
CPU_ATTENTION = AttentionSchedule(images=1, heads=1)


def _steps(n: int, size: Optional[int]) -> list[slice]:
    """``size`` items at a time (None: all), as slices of range(n)."""
    size = size or n or 1
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class AttentionParts(NamedTuple):
    """Intermediates of one unmasked explicit attention pass (:meth:`Attention.parts`), the
    values an analytic backward pass reads."""
    q: torch.Tensor        # (B, heads, L, d) queries, already scaled by 1/√d
    k: torch.Tensor        # (B, heads, L, d)
    v: torch.Tensor        # (B, heads, L, d)
    probs: torch.Tensor    # (B, heads, L, L) softmax(q kᵀ), model dtype
    heads: torch.Tensor    # (B, heads, L, d) probs @ v (a strided view)
    out: torch.Tensor      # (B, L, D) after out_proj
    weights: torch.Tensor  # (B, L, L) float32 head average of probs


class Attention(PackedWeights, nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    ``forward(x, attn_mask, need_weights, is_causal, n_queries, schedule)``:
      x:          (B, L, D)
      attn_mask:  additive float mask broadcastable to (B, heads, Lq, L), or None
      need_weights: also return softmax(q kᵀ / √d) WITHOUT the mask, averaged over heads
                  (the explicit path; otherwise fused SDPA)
      n_queries:  compute outputs for the first ``n_queries`` tokens only (keys/values
                  still come from all L tokens); None means all
      schedule:   how the explicit path is cut into steps (:class:`AttentionSchedule`)
    returns (out (B, Lq, D), weights (B, Lq, L) or None)
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = Linear(width, width)

    def _qkv(self, x: torch.Tensor, n_queries: Optional[int]):
        width = x.shape[-1]
        cache = self.weight_cache
        if n_queries is None:
            q, k, v = linear(x, self.in_proj_weight, self.in_proj_bias, cache, "qkv").chunk(3, dim=-1)
        else:
            q = linear(x[:, :n_queries], self.in_proj_weight[:width], self.in_proj_bias[:width], cache, "q")
            k, v = linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:], cache, "kv").chunk(2, dim=-1)
        return q, k, v

    def _explicit_inputs(self, x: torch.Tensor, n_queries: Optional[int]):
        """q (scaled by 1/√d, the reference's order), k, v of the explicit path, (B, heads, n, d) each."""
        q, k, v = self._qkv(x, n_queries)
        q = q * (x.shape[-1] // self.heads) ** -0.5
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, n, d/heads)

    @staticmethod
    def _mask_rows(mask: Optional[torch.Tensor], rows: slice):
        """The part of a mask broadcastable to (B, heads, Lq, L) that belongs to samples ``rows``."""
        if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
            return mask
        return mask[rows]

    @staticmethod
    def _mask_heads(mask: Optional[torch.Tensor], heads: slice):
        """The part of a mask broadcastable to (b, heads, Lq, L) that belongs to ``heads``."""
        if mask is None or mask.dim() < 4 or mask.shape[1] == 1:
            return mask
        return mask[:, heads]

    def _explicit_heads(self, q, k, v, mask, is_causal):
        """Reference order: scaled q @ kᵀ; the returned map is the softmax WITHOUT the mask,
        the output uses the masked one. (b, h, Lq, d) -> ((b, h, Lq, d), (b, h, Lq, L)).

        The returned map is always float32: for float16 / bfloat16 models the scores are
        upcast before its softmax (thresholds downstream read it); the output path keeps
        the model's dtype.
        """
        scores = q @ k.transpose(-2, -1)  # (b, h, Lq, L)
        low = scores.dtype != torch.float32
        weights = scores.float().softmax(dim=-1) if low else torch.softmax(scores, dim=-1)
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        if mask is not None or is_causal:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = weights.to(scores.dtype) if low else weights
        return probs @ v, weights

    def _explicit(self, q, k, v, mask, is_causal, heads_per_step: Optional[int],
                  keep_probs: Optional[torch.Tensor] = None):
        """(b, heads, Lq, d) -> (output (b, Lq, heads, d), head-averaged map (b, Lq, L)),
        ``heads_per_step`` heads at a time (None: all). The map is the heads' sum / heads, as
        the reference, summed head after head whatever the step. ``keep_probs`` (b, heads,
        Lq, L), if given, receives the unmasked softmax of every head in the model's dtype.
        """
        b, heads, n_q, d = q.shape
        out = q.new_empty(b, n_q, heads, d)
        total = None
        for group in _steps(heads, heads_per_step):
            o, w = self._explicit_heads(q[:, group], k[:, group], v[:, group],
                                        self._mask_heads(mask, group), is_causal)
            out[:, :, group] = o.transpose(1, 2)  # (b, h, Lq, d) -> (b, Lq, h, d)
            if keep_probs is not None:
                keep_probs[:, group] = w
            for j in range(w.shape[1]):
                if total is None:
                    total = w[:, j]  # a view: w is not read again once o is computed
                elif total.requires_grad or w.requires_grad:  # keep the graph of every head's map
                    total = total + w[:, j]
                else:
                    total.add_(w[:, j])
        return out, total / heads

    def parts(self, x: torch.Tensor, schedule: AttentionSchedule = ALL_AT_ONCE) -> AttentionParts:
        """Unmasked attention over (B, L, D) tokens with every intermediate kept; ``out`` and
        ``weights`` equal ``forward(x, need_weights=True)``'s (same operations, same order)."""
        b, n, width = x.shape
        q, k, v = self._explicit_inputs(x, None)
        probs = q.new_empty(b, self.heads, n, n)
        heads, weights = self._explicit(q, k, v, None, False, schedule.heads, keep_probs=probs)  # (B, L, heads, d)
        out = self.out_proj(heads.reshape(b, n, width))  # (B, L, heads, d) -> (B, L, D)
        return AttentionParts(q, k, v, probs, heads.transpose(1, 2), out, weights)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False, is_causal: bool = False,
                n_queries: Optional[int] = None, schedule: AttentionSchedule = ALL_AT_ONCE):
        b = x.shape[0]
        if need_weights:
            q, k, v = self._explicit_inputs(x, n_queries)
            parts = [self._explicit(q[rows], k[rows], v[rows], self._mask_rows(attn_mask, rows),
                                    is_causal, schedule.heads)
                     for rows in _steps(b, schedule.images)]
            out = torch.cat([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]  # (B, Lq, heads, d)
            avg = torch.cat([w for _, w in parts]) if len(parts) > 1 else parts[0][1]
        else:
            q, k, v = (self._split_heads(t) for t in self._qkv(x, n_queries))
            mask = attn_mask.to(q.dtype) if attn_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
            out = out.transpose(1, 2)  # (B, heads, Lq, d) -> (B, Lq, heads, d)
            avg = None
        out = out.flatten(2)  # (B, Lq, heads, d) -> (B, Lq, D)
        return self.out_proj(out), avg


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False, is_causal: bool = False,
                n_queries: Optional[int] = None, schedule: AttentionSchedule = ALL_AT_ONCE):
        """(B, L, D) -> ((B, Lq, D), weights (B, Lq, L) or None); Lq = n_queries or L."""
        a, weights = self.attn(self.ln_1(x), attn_mask, need_weights, is_causal, n_queries, schedule)
        x = x[:, :n_queries] + a if n_queries is not None else x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class TransformerOutput(NamedTuple):
    tokens: torch.Tensor                   # (B, L, D), or (B, n_queries, D) if requested
    attentions: tuple[torch.Tensor, ...]   # one (B, L, L) head-averaged map per block, or ()


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                need_weights: bool = False, is_causal: bool = False,
                last_block_queries: Optional[int] = None,
                schedule: AttentionSchedule = ALL_AT_ONCE) -> TransformerOutput:
        """Run every block. ``attn_masks[i]`` is block i's additive mask (or None).

        ``last_block_queries=n`` computes the last block for the first n tokens only (the
        crop pass of TagCLIP reads nothing but the class token of the last block).
        ``schedule`` splits the map-returning attention (results do not depend on it).
        """
        if attn_masks is not None and len(attn_masks) != self.layers:
            raise ValueError(f"expected {self.layers} attention masks, got {len(attn_masks)}")
        maps = []
        for i, block in enumerate(self.resblocks):
            mask = attn_masks[i] if attn_masks is not None else None
            n_q = last_block_queries if i == self.layers - 1 else None
            if n_q is not None and mask is not None:
                mask = mask[..., :n_q, :]
            x, w = block(x, mask, need_weights, is_causal, n_q, schedule)
            if need_weights:
                maps.append(w)
        return TransformerOutput(x, tuple(maps))


def resize_positional_embedding(table: torch.Tensor, grid: tuple[int, int],
                                round_fp16: bool = True) -> torch.Tensor:
    """Positional table for a (gh, gw) patch grid: (1 + gh*gw, D).

    The patch rows are resized bilinearly (align_corners=False); the class row is kept.
    Quirk Q1: the reference wraps the result (class row included) in float16 before use,
    so ``round_fp16`` rounds it through float16 and back.
    """
    cls_row, patches = table[:1], table[1:]
    side = math.isqrt(patches.shape[0])
    d = patches.shape[1]
    grid_map = patches.t().reshape(1, d, side, side)  # (P0, D) -> (1, D, s, s)
    grid_map = F.interpolate(grid_map, size=grid, mode="bilinear", align_corners=False)
    patches = grid_map.reshape(d, -1).t()  # (1, D, gh, gw) -> (gh*gw, D)
    out = torch.cat([cls_row, patches], dim=0)
    if round_fp16:
        out = out.half().to(table.dtype)
    return out


class VisionOutput(NamedTuple):
    tokens: torch.Tensor                   # (B, 1 + P, E): ln_post on every token, then @ proj
    attentions: tuple[torch.Tensor, ...]   # per block (B, 1 + P, 1 + P) head-averaged, or ()


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(
            torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    @property
    def native_grid(self) -> tuple[int, int]:
        side = self.input_resolution // self.patch_size
        return side, side

    def positional_embedding_for(self, grid: tuple[int, int], always_resize: bool = False,
                                 round_fp16: bool = True) -> torch.Tensor:
        """TagCLIP uses the stored table at the native grid and a resized, float16-rounded
        one elsewhere; CLIP-ES resizes (and rounds) always (quirk Q1)."""
        if grid == self.native_grid and not always_resize:
            return self.positional_embedding
        return resize_positional_embedding(self.positional_embedding, grid, round_fp16)

    def embed(self, images: torch.Tensor, always_resize_pos: bool = False,
              round_pos_fp16: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + P, width) tokens after ``ln_pre``; H, W multiples of the patch."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, width, gh, gw) -> (B, P, width)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + P, width)
        pos = self.positional_embedding_for(grid, always_resize_pos, round_pos_fp16)
        return self.ln_pre(x + pos.to(x.dtype))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``@ proj`` on every token: (B, n, width) -> (B, n, E)."""
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor,
                attn_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                need_weights: bool = False, cls_only: bool = False,
                always_resize_pos: bool = False, round_pos_fp16: bool = True,
                schedule: AttentionSchedule = ALL_AT_ONCE) -> VisionOutput:
        """Encode images; ``cls_only`` returns just the class token (B, 1, E) and skips the
        last block's work for the patch tokens; ``schedule``: see :class:`AttentionSchedule`."""
        x = self.embed(images, always_resize_pos, round_pos_fp16)
        out = self.transformer(x, attn_masks, need_weights,
                               last_block_queries=1 if cls_only else None, schedule=schedule)
        return VisionOutput(self.project(out.tokens), out.attentions)


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int,
                 vision_width: int, vision_patch_size: int, context_length: int,
                 vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, vision_width // HEAD_WIDTH, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.checkpoint_sha256: Optional[str] = None  # set by the loader; keys text caches

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> (B, E) features taken at the end token (the largest id).

        The sequence is cut after the longest prompt's end token: under the causal mask no
        position attends to later ones, so the result is exactly that of the full context.
        """
        eot = tokens.argmax(dim=-1)  # (B,)
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x, is_causal=True).tokens  # (B, length, width)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


class StateDictMismatch(RuntimeError):
    """A state dict that does not fit the model built from its shapes; the one-line message
    names the first missing key, unexpected key or size mismatch and counts the rest."""


def check_state_dict_fits(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise :class:`StateDictMismatch` unless ``state_dict`` has exactly ``model``'s keys and
    shapes (what a strict ``load_state_dict`` demands, reported on one line)."""
    expected = model.state_dict()
    missing = [f"Missing key {printable(k)}" for k in expected if k not in state_dict]
    unexpected = [f"Unexpected key {printable(k)}" for k in state_dict if k not in expected]
    sizes = [f"Size mismatch for {printable(k)}: {list(state_dict[k].shape)} in the state dict, "
             f"{list(v.shape)} in the model" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    problems = missing + unexpected + sizes
    if not problems:
        return
    rest = [f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                          (len(sizes), "size mismatches")) if n]
    more = f" (and {len(problems) - 1} more; in all {', '.join(rest)})" if len(problems) > 1 else ""
    raise StateDictMismatch(f"{problems[0]}{more}")


def build_model(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> CLIP:
    """Build a CLIP ViT from an OpenAI state dict, reading the architecture from tensor shapes.

    A state dict that does not fit that architecture raises :class:`StateDictMismatch`."""
    sd = {k: v for k, v in state_dict.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise ValueError("not a CLIP ViT state dict (ResNet CLIP models are not supported)")
    vision_width = sd["visual.conv1.weight"].shape[0]
    vision_patch = sd["visual.conv1.weight"].shape[-1]
    vision_layers = sum(1 for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    model = CLIP(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=vision_patch * grid,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=text_width // HEAD_WIDTH,
        transformer_layers=text_layers,
    )
    check_state_dict_fits(model, sd)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return model.to(dtype).eval().requires_grad_(False)
