"""Command-line plumbing shared by every command: the common flag groups and the way a run ends.

Each flag that several commands take is defined once here (device, precision, model cache,
checkpoint code, on_error, max_side, vis_dir, workers); a command adds the groups it uses and
its own flags, then hands typed options to library code. :func:`guarded` turns the outcome
into the exit status: 0, :data:`~toolkit.errors.EXIT_SKIPPED_IMAGES`,
:data:`~toolkit.errors.EXIT_INPUT_ERROR` (one ``error:`` line),
:data:`~toolkit.errors.EXIT_INTERRUPTED`, or :data:`~toolkit.errors.EXIT_INTERNAL_ERROR`
(a bug: its traceback).
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence

from .depths import parse_layers
from .devices import DEFAULT_PRECISION, resolve_device
from .errors import (
    EXIT_INPUT_ERROR,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_SKIPPED_IMAGES,
    EXIT_TERMINATED,
    InputError,
    Interrupted,
)
from .files import writable_dir
from .images import DEFAULT_MAX_SIDE
from .precision import ALLOW_SLOW_FLAG, EMULATED_CPU_FACTOR, PRECISION_CHOICES, resolve_precision

# The paper's backbone, every command's default model.
DEFAULT_MODEL = "ViT-B/16"
# The smallest --max_side: one 16-pixel patch.
MIN_MAX_SIDE = 16
ON_ERROR_CHOICES = ("stop", "skip")
ALLOW_CODE_FLAG = "--allow_checkpoint_code"


# ----------------------------------------------------------------------------- help


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's ``--help``: each option that takes a value shows its default (``none``
    where there is none) unless its help text already speaks of it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or action.required \
                or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


# ----------------------------------------------------------------------------- value types

def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
max_side_value = int_at_least(MIN_MAX_SIDE)


def layers_value(text: str) -> tuple[int, ...]:
    """An argparse type: a block list, ``8,9,10`` or ``16-21``."""
    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


# ----------------------------------------------------------------------------- flag groups

def add_model_arguments(p: argparse.ArgumentParser, names: Sequence[str] = ("--model_path",)) -> None:
    """The model flags of every command that loads one: ``--model_path`` (``names``: its
    spellings), ``--device``, ``--precision`` and ``--allow_slow_precision``
    (:mod:`toolkit.precision`), ``--model_cache``, ``--allow_checkpoint_code``."""
    p.add_argument(*names, dest="model_path", default=DEFAULT_MODEL,
                   help="OpenAI model name (downloaded to the cache, SHA256 checked), a checkpoint file "
                        "(TorchScript archive, state dict, .safetensors or .npz) or a Hugging Face CLIPModel "
                        "folder; default %(default)s")
    p.add_argument("--arch", default=None,
                   help="what the weights cannot show (activation, head width), as an OpenCLIP model name such as "
                        "ViT-B-16 or ViT-H-14 (default: open_clip_config.json beside the file, else OpenAI's CLIP, "
                        "with a warning unless the file is one of OpenAI's releases)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                   help="model weights in float32 (default, the paper's setting, on every device), float16 or "
                        "bfloat16; attention maps, LayerNorms and every step after the forwards stay float32; "
                        "auto: bf16 where this device multiplies it natively, else fp16 on a GPU, else fp32 "
                        "(README 'Precision': what each mode changes, and by how much)")
    p.add_argument(ALLOW_SLOW_FLAG, action="store_true",
                   help="run a --precision that is slower than fp32 on this device (bf16 or fp16 emulated on a "
                        f"CPU: bf16 on AVX2 is about {EMULATED_CPU_FACTOR['bf16']:.0f}x slower); without it such a "
                        "run stops before the model loads, with one line saying by how much")
    p.add_argument("--model_cache", default=None, help="checkpoint cache folder (default ~/.cache/clip)")
    p.add_argument(ALLOW_CODE_FLAG, action="store_true",
                   help="load a TorchScript checkpoint with TorchScript itself, which RUNS CODE stored in the file; "
                        "only for a file you trust (default: its tensors are read as data; OpenAI's releases and "
                        "state-dict files never need this)")


def settle_precision(args, device=None, announce: bool = True) -> None:
    """``args.precision`` made concrete for the run's device (default: ``--device`` resolved),
    before anything is keyed by it or the model loads: ``auto`` resolved, a precision slower
    than fp32 there stopped unless ``--allow_slow_precision`` (:func:`toolkit.precision.resolve_precision`).
    ``announce``: print its stderr line (one process of a sharded run does)."""
    device = resolve_device(args.device) if device is None else device
    args.precision = resolve_precision(args.precision, device, args.allow_slow_precision, announce)


def add_on_error_argument(p: argparse.ArgumentParser, what: str = "an image that cannot be read") -> None:
    p.add_argument("--on_error", choices=ON_ERROR_CHOICES, default="stop",
                   help=f"on {what}: stop at once (default) or skip it and report at the end (exit status "
                        f"{EXIT_SKIPPED_IMAGES})")


def add_max_side_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_side", type=max_side_value, default=DEFAULT_MAX_SIDE,
                   help="downscale larger images to this longest side before the model (default %(default)s: "
                        "leaves every VOC/COCO image untouched); outputs keep the file's own size")


def add_workers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="image-decoding worker processes (default 0: one background thread)")


def add_vis_argument(p: argparse.ArgumentParser, pictures: str) -> None:
    """``--vis_dir``; ``pictures`` says what goes into it."""
    p.add_argument("--vis_dir", default=None, help=f"also draw pictures into this folder: {pictures} (default: none)")


# ----------------------------------------------------------------------------- how a run ends

def check_outputs(*folders, vis_dir=None) -> None:
    """Every output folder of a run checked writable before the model loads: one InputError
    line naming the first that cannot be written (a file in the way, read-only, ...)."""
    for folder in folders:
        if folder is not None:
            writable_dir(folder)
    if vis_dir:
        writable_dir(vis_dir, "picture folder")


def report_failures(failures: Sequence) -> int:
    """List the images a ``--on_error skip`` run skipped; the exit status (1 if any, else 0)."""
    if not failures:
        return 0
    print(f"{len(failures)} image(s) failed and were skipped:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_SKIPPED_IMAGES


def guarded(run: Callable, args) -> int:
    """Run a command. Bad input (:class:`InputError`: unreadable or malformed files, bad
    arguments, checkpoint and device problems) becomes one ``error:`` line and exit status 2.
    Ctrl-C (SIGINT) becomes one ``interrupted:`` line saying what was kept for resuming, status
    130; SIGTERM stops the run the same way (the stages' clean-up runs: pools end, journals
    stay), status 143. Anything else is a bug: its traceback, one line saying so, and
    EXIT_INTERNAL_ERROR."""
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        return run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt as stop:
        kept = stop.kept if isinstance(stop, Interrupted) else "nothing of this run is kept"
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - reported in full, never disguised as bad input
        traceback.print_exc()
        print(f"internal error: the traceback above is a bug in the toolkit, not a problem with your input; "
              f"please report it (exit status {EXIT_INTERNAL_ERROR})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
