"""CLIP ViT (OpenAI architecture and parameter names) with the hooks TagCLIP and CLIP-ES need.

SPEC §2. Differences from OpenAI's ``clip/model.py`` are all additive:

* every block can return its attention map averaged over heads, computed from the scores
  WITHOUT the additive mask (the reference returns the unmasked softmax even when a mask
  changed the block's output);
* attention masks are arguments of ``forward`` (one per block), never state of a module;
* the positional table is resized to any patch grid, or passed in by the caller (a method
  that needs another table, as TagCLIP's and CLIP-ES's float16 rounding, builds its own);
* tokens are batch-first, ``(batch, tokens, width)``; parameter names are unchanged, so
  OpenAI checkpoints load strictly.

Attention runs on ``torch.nn.functional.scaled_dot_product_attention`` unless maps are
requested; the explicit path follows the reference's order of operations
(``q * scale`` before ``q @ kᵀ``) so that its maps match bit for bit where possible. How the
products run (CPU kernels, loop schedules) lives in :mod:`clip.kernels`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import printable

from .kernels import ALL_AT_ONCE, AttentionSchedule, Linear, PackedWeights, linear, steps

# SPEC §2: heads are width // 64 in both towers, whatever the checkpoint (OpenAI build_model).
HEAD_WIDTH = 64
# SPEC §2: QuickGELU constant.
QUICK_GELU_ALPHA = 1.702
# MLP activations by name: OpenAI's CLIP uses QuickGELU; OpenCLIP's own trainings use GELU.
QUICK_GELU, GELU = "quick_gelu", "gelu"


@dataclass(frozen=True)
class Architecture:
    """The facts of a CLIP ViT that its weights cannot show (shapes give everything else).
    The defaults are OpenAI's; ``source`` says where the facts were read, for messages."""
    activation: str = QUICK_GELU
    vision_head_width: int = HEAD_WIDTH
    text_head_width: int = HEAD_WIDTH
    source: str = "OpenAI's CLIP"

    def key(self) -> str:
        """The facts for cache and resume keys: empty for OpenAI's (so that keys written before
        other architectures existed stay valid), else ``activation/vision head/text head``."""
        facts = (self.activation, self.vision_head_width, self.text_head_width)
        openai = (QUICK_GELU, HEAD_WIDTH, HEAD_WIDTH)
        return "" if facts == openai else "/".join(map(str, facts))


OPENAI_ARCHITECTURE = Architecture()

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


def activation_module(name: str) -> nn.Module:
    """The MLP activation called ``name`` (:data:`QUICK_GELU` or :data:`GELU`, the exact erf form)."""
    if name == QUICK_GELU:
        return QuickGELU()
    if name == GELU:
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; choose {QUICK_GELU!r} or {GELU!r}")


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

    def explicit_qkv(self, x: torch.Tensor, n_queries: Optional[int]):
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

    def explicit_attention(self, q, k, v, mask, is_causal, heads_per_step: Optional[int],
                  keep_probs: Optional[torch.Tensor] = None):
        """(b, heads, Lq, d) -> (output (b, Lq, heads, d), head-averaged map (b, Lq, L)),
        ``heads_per_step`` heads at a time (None: all). The map is the heads' sum / heads, as
        the reference, summed head after head whatever the step. ``keep_probs`` (b, heads,
        Lq, L), if given, receives the unmasked softmax of every head in the model's dtype.
        """
        b, heads, n_q, d = q.shape
        out = q.new_empty(b, n_q, heads, d)
        total = None
        for group in steps(heads, heads_per_step):
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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False, is_causal: bool = False,
                n_queries: Optional[int] = None, schedule: AttentionSchedule = ALL_AT_ONCE):
        b = x.shape[0]
        if need_weights:
            q, k, v = self.explicit_qkv(x, n_queries)
            parts = [self.explicit_attention(q[rows], k[rows], v[rows], self._mask_rows(attn_mask, rows),
                                    is_causal, schedule.heads)
                     for rows in steps(b, schedule.images)]
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
    def __init__(self, width: int, heads: int, activation: str = QUICK_GELU):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", Linear(width, width * 4)),
            ("gelu", activation_module(activation)),  # OpenAI's name for the slot, whatever the activation
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
    def __init__(self, width: int, layers: int, heads: int, activation: str = QUICK_GELU):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

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


def resize_positional_embedding(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Positional table for a (gh, gw) patch grid: (1 + gh*gw, D).

    The patch rows are resized bilinearly (align_corners=False); the class row is kept.
    """
    cls_row, patches = table[:1], table[1:]
    side = math.isqrt(patches.shape[0])
    d = patches.shape[1]
    grid_map = patches.t().reshape(1, d, side, side)  # (P0, D) -> (1, D, s, s)
    grid_map = F.interpolate(grid_map, size=grid, mode="bilinear", align_corners=False)
    patches = grid_map.reshape(d, -1).t()  # (1, D, gh, gw) -> (gh*gw, D)
    return torch.cat([cls_row, patches], dim=0)


class VisionOutput(NamedTuple):
    tokens: torch.Tensor                   # (B, 1 + P, E): ln_post on every token, then @ proj
    attentions: tuple[torch.Tensor, ...]   # per block (B, 1 + P, 1 + P) head-averaged, or ()


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, activation: str = QUICK_GELU):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(
            torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    @property
    def native_grid(self) -> tuple[int, int]:
        side = self.input_resolution // self.patch_size
        return side, side

    def positional_embedding_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The stored table at the native grid, resized bilinearly elsewhere."""
        if grid == self.native_grid:
            return self.positional_embedding
        return resize_positional_embedding(self.positional_embedding, grid)

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        """The (gh, gw) patch grid of (B, 3, H, W) images."""
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def embed(self, images: torch.Tensor, positional_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + P, width) tokens after ``ln_pre``; H, W multiples of the patch.
        ``positional_embedding``: the (1 + P, width) table to add (default
        :meth:`positional_embedding_for` the images' grid)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, width, gh, gw) -> (B, P, width)
        cls_token = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)  # (B, 1, width)
        x = torch.cat([cls_token, x], dim=1)  # (B, 1 + P, width)
        pos = self.positional_embedding_for(grid) if positional_embedding is None else positional_embedding
        return self.ln_pre(x + pos.to(x.dtype))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``@ proj`` on every token: (B, n, width) -> (B, n, E)."""
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor,
                attn_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                need_weights: bool = False, cls_only: bool = False,
                positional_embedding: Optional[torch.Tensor] = None,
                schedule: AttentionSchedule = ALL_AT_ONCE) -> VisionOutput:
        """Encode images; ``cls_only`` returns just the class token (B, 1, E) and skips the
        last block's work for the patch tokens; ``positional_embedding``: see :meth:`embed`;
        ``schedule``: see :class:`~clip.kernels.AttentionSchedule`."""
        x = self.embed(images, positional_embedding)
        out = self.transformer(x, attn_masks, need_weights,
                               last_block_queries=1 if cls_only else None, schedule=schedule)
        return VisionOutput(self.project(out.tokens), out.attentions)


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int,
                 vision_width: int, vision_patch_size: int, context_length: int,
                 vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int, vision_heads: Optional[int] = None, activation: str = QUICK_GELU):
        """OpenAI's signature; ``vision_heads`` (default width // 64) and ``activation``
        (default QuickGELU) are the facts other CLIP ViTs differ in."""
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_heads or vision_width // HEAD_WIDTH, embed_dim, activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, activation)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.checkpoint_sha256: Optional[str] = None  # set by the loader; keys text caches
        vision_head_width = HEAD_WIDTH if vision_heads is None else vision_width // vision_heads
        self.architecture = Architecture(activation, vision_head_width, transformer_width // transformer_heads,
                                         source="constructor arguments")

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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, E) features: ``ln_post`` of the class token ``@ proj``."""
        return self.visual(images, cls_only=True).tokens[:, 0]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI's ``model(image, text)``: (logits_per_image (B, T), logits_per_text (T, B))."""
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


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


def _heads(width: int, head_width: int, tower: str, arch: Architecture) -> int:
    if head_width < 1 or width % head_width:
        raise StateDictMismatch(f"the {tower} width {width} is not a multiple of the head width {head_width} "
                                f"({arch.source})")
    return width // head_width


def build_model(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                arch: Architecture = OPENAI_ARCHITECTURE) -> CLIP:
    """Build a CLIP ViT from a state dict in OpenAI's layout, reading the architecture from
    tensor shapes and ``arch`` (activation, head widths: what shapes cannot show).

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
        transformer_heads=_heads(text_width, arch.text_head_width, "text", arch),
        transformer_layers=text_layers,
        vision_heads=_heads(vision_width, arch.vision_head_width, "vision", arch),
        activation=arch.activation,
    )
    check_state_dict_fits(model, sd)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    model.architecture = arch  # with its source
    return model.to(dtype).eval().requires_grad_(False)
