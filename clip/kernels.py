"""How the backbone's products run: CPU kernels and loop schedules. Never what they compute.

* :func:`linear` — ``F.linear``, through oneDNN for float32 on the CPU, with the weight's
  blocked copy kept per module (:class:`PackedWeights`); the same values as ``F.linear`` up to
  summation order, with and without autograd (the kernel choice reads device and dtype only).
* :class:`AttentionSchedule` — how the map-returning attention is cut into steps (images and
  heads per step); every schedule computes the same products.

:mod:`clip.model` is written against these; nothing here knows CLIP's architecture.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

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



def input_gradient(layer: Linear, grad: torch.Tensor) -> torch.Tensor:
    """grad @ weight: the gradient w.r.t. a :class:`Linear`'s input, given the gradient w.r.t.
    its output (the transposed weight's blocked copy kept in the layer's cache)."""
    return linear(grad, layer.weight.t(), None, layer.weight_cache, "weight_t")


class AttentionSchedule(NamedTuple):
    """How the explicit attention path (the one that returns maps) is cut into steps.

    Every schedule computes the same products per image and head, and the head average
    always sums the heads one after another, so only speed and memory differ: outputs and
    maps are bit-equal at CLIP's sizes (measured at 197 and 769 tokens); for tiny matrices a
    BLAS may round a batched product apart from single ones (tests allow 1e-6 there). A CPU
    is fastest with one image and one head at a time, where one score block stays in cache
    (ViT-B/16 at 769 tokens: as fast on plain blocks, half the time on the main pass's
    self-only block, whose softmax is nearly all tiny values); a GPU with everything at once.
    :meth:`for_device` is that rule; pass another schedule to override it.
    """
    images: Optional[int] = None  # images per step; None: the whole batch
    heads: Optional[int] = None   # heads per step; None: all heads

    @classmethod
    def for_device(cls, device) -> "AttentionSchedule":
        return CPU_ATTENTION if torch.device(device).type == "cpu" else ALL_AT_ONCE


ALL_AT_ONCE = AttentionSchedule()
CPU_ATTENTION = AttentionSchedule(images=1, heads=1)


def steps(n: int, size: Optional[int]) -> list[slice]:
    """``size`` items at a time (None: all), as slices of range(n)."""
    size = size or n or 1
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
