"""Devices and precisions: the names users give on the command line and what they become.

``--device`` names a torch device (checked to exist before any work starts) and
``--precision`` the dtype of the model's weights (``auto``, and what a low precision costs on
a device: :mod:`toolkit.precision`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import InputError, short_reason

# --precision names and their weight dtypes; fp32 is the paper's setting, for every stage and device.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_PRECISION = "fp32"


def precision_dtype(name: str) -> torch.dtype:
    """The dtype of a ``--precision`` name (fp32, fp16, bf16)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)} (auto is resolved "
                         f"for a device first: toolkit.precision.resolve_precision)") from None


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """The torch device a user named (None: CUDA where available, else the CPU), checked to
    exist before any work starts: an unknown name, or a CUDA device this machine does not
    have, is an :class:`InputError` naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(device, "not a torch device (examples: cpu, cuda, cuda:1)") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(device, "no CUDA device is available on this machine (use --device cpu)")
        if chosen.index is not None and chosen.index >= count:
            raise InputError(device, f"this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
    elif chosen.type != "cpu":
        try:
            torch.empty(0, device=chosen)  # mps, xpu, ...: the device answers or it does not exist
        except (RuntimeError, AssertionError) as err:
            raise InputError(device, f"not available here ({short_reason(err)})") from None
    return chosen
