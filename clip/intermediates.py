"""What a written-out backward pass reads from the forward: attention's intermediates.

:func:`attention_parts` runs one unmasked explicit attention pass with every intermediate
kept (queries, keys, values, per-head probabilities, head outputs); its ``out`` and ``weights``
equal ``Attention.forward(x, need_weights=True)``'s (same operations, same order). CLIP-ES's
Grad-CAM fast path (:mod:`clip_es.gradcam`) is its reader.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .kernels import ALL_AT_ONCE, AttentionSchedule
from .model import Attention


class AttentionParts(NamedTuple):
    """Intermediates of one unmasked explicit attention pass (:func:`attention_parts`), the
    values an analytic backward pass reads."""
    q: torch.Tensor        # (B, heads, L, d) queries, already scaled by 1/√d
    k: torch.Tensor        # (B, heads, L, d)
    v: torch.Tensor        # (B, heads, L, d)
    probs: torch.Tensor    # (B, heads, L, L) softmax(q kᵀ), model dtype
    heads: torch.Tensor    # (B, heads, L, d) probs @ v (a strided view)
    out: torch.Tensor      # (B, L, D) after out_proj
    weights: torch.Tensor  # (B, L, L) float32 head average of probs


def attention_parts(attn: Attention, x: torch.Tensor, schedule: AttentionSchedule = ALL_AT_ONCE) -> AttentionParts:
    """Unmasked attention over (B, L, D) tokens with every intermediate kept."""
    b, n, width = x.shape
    q, k, v = attn.explicit_qkv(x, None)
    probs = q.new_empty(b, attn.heads, n, n)
    heads, weights = attn.explicit_attention(q, k, v, None, False, schedule.heads, keep_probs=probs)  # (B, L, heads, d)
    out = attn.out_proj(heads.reshape(b, n, width))  # (B, L, heads, d) -> (B, L, D)
    return AttentionParts(q, k, v, probs, heads.transpose(1, 2), out, weights)
