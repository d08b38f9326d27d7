"""What a low ``--precision`` does on the device a run uses, decided before the run starts.

A bfloat16 or float16 model is only faster where the device multiplies matrices in that dtype
natively. Elsewhere torch emulates the dtype and a run gets slower, not faster (issue 15:
bf16 on a 2-core AVX2 CPU took 27.7 s per image against 2.87 s in fp32). So every command
resolves ``--precision`` once, from facts about the device, before anything is keyed by it
(resume journals, text-feature cache, CAM run keys) and before the model loads:

* CPUs: torch's CPU capability and the CPU's flags (Linux ``/proc/cpuinfo``: ``avx512_bf16``
  or ``amx_bf16`` for bf16, ``avx512_fp16`` or ``amx_fp16`` for fp16; on aarch64 the
  ``Features`` line: ``bf16``, ``asimdhp`` / ``fphp``). Where the flags cannot be read (another
  OS, an unknown architecture) a short timed probe of one matrix product in fp32 and in the
  low dtype decides; it runs once and is cached on disk.
* CUDA: fp16 is native; bf16 where ``torch.cuda.is_bf16_supported()`` holds without
  emulation (compute capability 8.0 or newer, or ROCm), else the probe.
* MPS: fp16 is native; bf16 is not assumed (the probe).

A requested precision slower than fp32 stops the run with one line (the factor, and the flags
that keep fp32 or confirm) unless :data:`ALLOW_SLOW_FLAG` is given; with it the same line is
a warning. ``--precision auto`` picks the fastest mode within the README's documented drift:
bf16 where it is native (CPUs, CUDA), else fp16 on GPUs, else fp32. It is never the default.

:func:`decide` is the pure rule (tests give it facts and a stub probe); :func:`resolve_precision`
gathers the facts of a device and applies the rule for the commands.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .devices import DEFAULT_PRECISION, PRECISIONS, precision_dtype
from .errors import InputError, short_reason
from .files import cache_dir, read_json_object, write_text_atomic

log = logging.getLogger(__name__)

AUTO = "auto"
# --precision's choices: the concrete precisions, then auto (resolved by resolve_precision).
PRECISION_CHOICES = (*PRECISIONS, AUTO)
ALLOW_SLOW_FLAG = "--allow_slow_precision"

# Linux /proc/cpuinfo flags (x86 "flags", aarch64 "Features") of native matrix products per
# low precision. The names of the two architectures do not overlap, so one table serves both.
CPU_NATIVE_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "fp16": ("avx512_fp16", "amx_fp16", "asimdhp", "fphp"),
}
CPUINFO = Path("/proc/cpuinfo")
CPUINFO_FLAG_KEYS = ("flags", "Features")       # x86, aarch64
CPUINFO_NAME_KEYS = ("model name", "Hardware")  # x86 (and some aarch64 kernels), older ARM kernels
# The flag CUDA facts carry where bf16 is native (CUDA compute capability 8.0 or newer, ROCm).
CUDA_BF16_FLAG = "bf16"
CUDA_NATIVE_BF16_MAJOR = 8

# Expected time of an emulated low precision on a CPU, relative to fp32, where no probe ran
# (the flags said "not native"). bf16: issue 15, classify.py on a 2-core AVX2 CPU (no
# AVX512-BF16, no AMX), full-size random ViT-B/16, 8 images 500x375: 27.7 s per image in bf16
# against 2.87 s in fp32. fp16: README 'Precision', "about 3x slower than fp32" on CPUs.
AVX2_FP32_S_PER_IMAGE = 2.87
AVX2_BF16_S_PER_IMAGE = 27.7
README_CPU_FP16_FACTOR = 3.0
EMULATED_CPU_FACTOR = {"bf16": AVX2_BF16_S_PER_IMAGE / AVX2_FP32_S_PER_IMAGE, "fp16": README_CPU_FP16_FACTOR}

# A factor above this is "slower than fp32", and auto takes a probed (not known-native)
# precision only at AUTO_MAX_PROBED_FACTOR or below. The probe is noisy on a shared machine but
# the two cases lie far apart: on 2 busy cores of an AVX512-BF16 CPU, six probes gave native
# bf16 0.10-0.50x and emulated fp16 8.6-51x.
SLOWER_THAN_FP32 = 1.25
AUTO_MAX_PROBED_FACTOR = 0.8
# The low precisions auto considers, best first: on CPUs bf16 only (fp16 is for GPUs, README
# 'Precision'); on GPUs bf16 (float32's range), then fp16.
AUTO_CANDIDATES = {"cpu": ("bf16",)}
AUTO_GPU_CANDIDATES = ("bf16", "fp16")

# The timed probe: one square matrix product of this side (0.27 GFLOP, a few milliseconds in
# fp32 on two cores) in fp32 and in the low dtype, alternately PROBE_REPEATS times after one
# warm-up round; the fastest of each counts (a busy machine only ever adds time). About 2 s.
PROBE_SIDE = 512
PROBE_REPEATS = 10
PROBE_CACHE_DIR = "precision"
PROBE_SEED = 0

Probe = Callable[[str], float]


@dataclass(frozen=True)
class DeviceFacts:
    """What the rule reads about a device. ``capability``: torch's CPU capability (AVX2,
    AVX512, ...) or a GPU's ``sm_XY``; ``flags``: the CPU's flags (None: unreadable), or for
    CUDA ``{"bf16"}`` where bf16 is native; ``name``: the CPU model or GPU name."""
    device_type: str
    capability: str
    flags: Optional[frozenset]
    name: str

    def describe(self) -> str:
        """One line for benchmarks and messages: the device, its capability, its low-precision flags."""
        if self.device_type == "cpu":
            if self.flags is None:
                flags = "flags unreadable"
            else:
                known = sorted(f for names in CPU_NATIVE_FLAGS.values() for f in names if f in self.flags)
                flags = "low-precision flags: " + (", ".join(known) if known else "none")
            return f"CPU {self.name}, torch CPU capability {self.capability}, {flags}"
        if self.device_type == "cuda":
            bf16 = "native" if CUDA_BF16_FLAG in (self.flags or ()) else "not native"
            return f"GPU {self.name} ({self.capability}), bf16 {bf16}"
        return f"{self.device_type} device {self.name}".rstrip()


@dataclass(frozen=True)
class PrecisionPlan:
    """The outcome for one request: the concrete ``precision``; ``factor``, its time relative
    to fp32 (None where it is native or fp32); ``measured``: the factor comes from the probe
    rather than a documented expectation; ``reason``: why, in a few words."""
    precision: str
    factor: Optional[float]
    measured: bool
    reason: str

    @property
    def slow(self) -> bool:
        return self.factor is not None and self.factor > SLOWER_THAN_FP32


# The low precisions, best first (bfloat16 keeps float32's range).
LOW_PRECISIONS = tuple(CPU_NATIVE_FLAGS)


def _native(precision: str, device_type: str, flags: Optional[frozenset]) -> Optional[bool]:
    """Whether the device multiplies ``precision`` natively: True, False (a CPU whose flags
    say it is emulated), or None where the facts do not say (the probe decides)."""
    if device_type == "cpu":
        return None if flags is None else any(f in flags for f in CPU_NATIVE_FLAGS[precision])
    if device_type in ("cuda", "mps") and precision == "fp16":
        return True
    if device_type == "cuda" and CUDA_BF16_FLAG in (flags or ()):
        return True
    return None


def _where(device_type: str, capability: str) -> str:
    """``CPU AVX2``, ``CUDA sm_86``, ``MPS``: the device as the lines name it."""
    return f"{device_type.upper()} {capability}".rstrip()


def _plan_for(precision: str, device_type: str, capability: str, flags: Optional[frozenset],
              probe: Optional[Probe], native_reason: Optional[str] = None) -> PrecisionPlan:
    """The plan of one concrete precision on the device (``native_reason``: what a native
    plan says instead of the plain fact)."""
    where = _where(device_type, capability)
    if precision == DEFAULT_PRECISION:
        return PrecisionPlan(precision, None, False, "float32, the paper's setting")
    native = _native(precision, device_type, flags)
    if native:
        return PrecisionPlan(precision, None, False,
                             native_reason or f"{where} has native {precision} matrix products")
    if native is False:  # a CPU whose flags say emulated: the documented expectation
        return PrecisionPlan(precision, EMULATED_CPU_FACTOR[precision], False,
                             f"{where} has no native {precision} matrix products: "
                             f"no {' or '.join(CPU_NATIVE_FLAGS[precision][:2])} flag")
    if probe is None:
        raise ValueError(f"the facts of {where} do not say whether {precision} is native; a probe is needed")
    factor = probe(precision)
    return PrecisionPlan(precision, factor, True,
                         f"on {where} a {PROBE_SIDE}x{PROBE_SIDE} matrix product in {precision} took "
                         f"{factor:.2f}x the time of fp32")


def decide(requested: str, device_type: str, capability: str, flags: Optional[frozenset],
           probe: Optional[Probe] = None) -> PrecisionPlan:
    """What ``--precision requested`` becomes on a device with these facts (see the module
    docstring). ``probe(precision)`` -> its time relative to fp32; called only where the
    facts do not say, so tests pass a stub."""
    if requested != AUTO:
        precision_dtype(requested)  # an unknown name is a ValueError
        return _plan_for(requested, device_type, capability, flags, probe)
    candidates = AUTO_CANDIDATES.get(device_type, AUTO_GPU_CANDIDATES)
    where = _where(device_type, capability)
    for rank, precision in enumerate(candidates):  # known-native first: no probe needed
        if _native(precision, device_type, flags):
            passed = "/".join(candidates[:rank])
            reason = f"{where}: {passed} not known to be native, {precision} is" if passed else None
            return _plan_for(precision, device_type, capability, flags, probe, reason)
    too_slow = []
    for precision in candidates:  # then what the facts leave open, by the probe
        if _native(precision, device_type, flags) is None:
            plan = _plan_for(precision, device_type, capability, flags, probe)
            if plan.factor <= AUTO_MAX_PROBED_FACTOR:
                return plan
            too_slow.append(plan.reason)
    if too_slow:
        reason = "; ".join(too_slow)
    elif device_type == "cpu":
        missing = "/".join(p for p in LOW_PRECISIONS if not _native(p, device_type, flags))
        reason = f"{where} has no native {missing} matrix products" + (
            "" if "fp16" in missing else " (auto takes fp16 on GPUs only)")
    else:
        reason = f"{where}: no low precision known to be faster"
    return PrecisionPlan(DEFAULT_PRECISION, None, False, reason)


# ----------------------------------------------------------------------------- facts of a device

def _cpuinfo_value(keys: tuple) -> Optional[str]:
    """The value of the first ``/proc/cpuinfo`` line whose key is one of ``keys`` (None: no such
    line, or no such file)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return None


def read_cpu_flags() -> Optional[frozenset]:
    """The CPU's flags (x86) or features (aarch64) from ``/proc/cpuinfo``; None where they
    cannot be read (another OS, an architecture without such a line)."""
    value = _cpuinfo_value(CPUINFO_FLAG_KEYS)
    return None if value is None else frozenset(value.split())


def cpu_capability() -> str:
    """torch's CPU capability: the widest vector ISA its own kernels use (AVX2, AVX512, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_name() -> str:
    return _cpuinfo_value(CPUINFO_NAME_KEYS) or platform.processor() or platform.machine() or "unknown CPU"


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts :func:`decide` reads, gathered from ``device`` (already checked to exist)."""
    if device.type == "cpu":
        return DeviceFacts("cpu", cpu_capability(), read_cpu_flags(), cpu_name())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        # torch.cuda.is_bf16_supported()'s native rule, for this device rather than the
        # current one, and without the emulation newer torch versions count in by default
        native_bf16 = bool(torch.version.hip) or props.major >= CUDA_NATIVE_BF16_MAJOR
        return DeviceFacts("cuda", f"sm_{props.major}{props.minor}",
                           frozenset({CUDA_BF16_FLAG}) if native_bf16 else frozenset(), props.name)
    return DeviceFacts(device.type, "", None, platform.machine())


# ----------------------------------------------------------------------------- the timed probe

def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if sync is not None and device.type != "cpu":
        sync()


def _seconds(device: torch.device, a: torch.Tensor, b: torch.Tensor) -> float:
    _synchronize(device)
    start = time.perf_counter()
    torch.matmul(a, b)
    _synchronize(device)
    return time.perf_counter() - start


def measure_factor(device: torch.device, precision: str) -> float:
    """Time of one matrix product in ``precision`` relative to fp32 on ``device`` (the two
    timed in alternation, the fastest of each kept). A device that cannot multiply in that
    dtype at all is an InputError."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    pair = [torch.randn(PROBE_SIDE, PROBE_SIDE, generator=gen).to(device) for _ in range(2)]
    fastest = {torch.float32: math.inf, precision_dtype(precision): math.inf}
    try:
        operands = {dtype: [m.to(dtype) for m in pair] for dtype in fastest}
        for round_ in range(PROBE_REPEATS + 1):  # round 0 warms up
            for dtype, (a, b) in operands.items():
                seconds = _seconds(device, a, b)
                if round_:
                    fastest[dtype] = min(fastest[dtype], seconds)
    except RuntimeError as err:
        raise InputError(f"--precision {precision}", f"this {device.type} device cannot run {precision} "
                                                     f"matrix products ({short_reason(err)})") from None
    return fastest[precision_dtype(precision)] / fastest[torch.float32]


def cached_probe(measure: Probe, facts: DeviceFacts, folder: Optional[Path] = None) -> Probe:
    """``measure`` run at most once per precision and device kind: its factor is kept in
    ``<cache>/precision/`` (:func:`toolkit.files.cache_dir`), keyed by the torch version, the
    device's capability and name and the probe's size. An unreadable cache file is measured
    again; a cache that cannot be written only costs the next run another probe."""
    def probe(precision: str) -> float:
        key = {"torch": torch.__version__, "device": facts.device_type, "capability": facts.capability,
               "name": facts.name, "precision": precision, "probe": [PROBE_SIDE, PROBE_REPEATS]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        path = Path(folder or cache_dir() / PROBE_CACHE_DIR) / f"{digest}.json"
        if path.is_file():
            try:
                stored = read_json_object(path, "precision probe cache")
                if stored.get("key") == key and isinstance(stored.get("factor"), (int, float)):
                    return float(stored["factor"])
            except InputError as err:
                log.warning("measuring again: %s", err)
        factor = measure(precision)
        try:
            write_text_atomic(path, json.dumps({"key": key, "factor": factor}, sort_keys=True) + "\n")
        except InputError as err:
            log.warning("could not write the precision probe cache: %s", err)
        return factor
    return probe


# ----------------------------------------------------------------------------- the commands' resolver

def slow_message(requested: str, plan: PrecisionPlan) -> str:
    """What a slow plan's one line says (the part after ``--precision X:``)."""
    how = "measured" if plan.measured else "expected"
    return (f"about {plan.factor:.1f}x slower than fp32 here ({how}: {plan.reason}); --precision fp32 "
            f"(the default) keeps float32, {ALLOW_SLOW_FLAG} runs {requested} anyway")


def resolve_precision(requested: str, device: torch.device, allow_slow: bool = False,
                      announce: bool = True) -> str:
    """The concrete precision a command runs in, settled before anything is keyed by it or
    loaded. ``auto`` becomes what :func:`decide` picks (one stderr line saying what and why);
    a precision slower than fp32 on this device is an InputError naming the factor unless
    ``allow_slow``, then the same line is a warning. ``announce``: print the lines (one
    process of a sharded run does)."""
    if requested == DEFAULT_PRECISION:
        return requested
    facts = device_facts(device)
    plan = decide(requested, facts.device_type, facts.capability, facts.flags,
                  cached_probe(lambda name: measure_factor(device, name), facts))
    if requested == AUTO:
        if announce:
            print(f"precision auto: {plan.precision} ({plan.reason})", file=sys.stderr)
        return plan.precision
    if plan.slow:
        if not allow_slow:
            raise InputError(f"--precision {requested}", slow_message(requested, plan))
        if announce:
            print(f"warning: --precision {requested}: {slow_message(requested, plan)}", file=sys.stderr)
    return plan.precision
