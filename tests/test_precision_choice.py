"""Issue 15: what ``--precision`` does on the device a run uses (``toolkit.precision``).

The rule (:func:`toolkit.precision.decide`) is tested for every kind of device with the
facts given and the timed probe stubbed; the probe's disk cache, the flag reader and the
commands end to end follow. The command tests make this machine a CPU without native bf16
where it is not one (the flag reader stubbed), so they run, and can fail, everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from clip_es.cli import generate_cams_main, generate_cams_parser
from pipelines.command import main as tagclip_main
from pipelines.command import parser as tagclip_parser
from tagclip import cli as tagclip_cli
from tagclip.cli import classify_main
from toolkit import precision as P
from toolkit.errors import EXIT_INPUT_ERROR

AVX2_FLAGS = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2".split())
AVX512_BF16_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS_FLAGS = AVX512_BF16_FLAGS | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}
GRANITE_RAPIDS_FLAGS = SAPPHIRE_RAPIDS_FLAGS | {"amx_fp16"}
NEOVERSE_V1_FEATURES = frozenset("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp "
                                 "sve i8mm bf16".split())
NEOVERSE_N1_FEATURES = frozenset("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp".split())
EXPECTED_BF16_FACTOR_TEXT = "9.7x"  # 27.7 s / 2.87 s per image (issue 15)
SLOW_PROBE, FAST_PROBE = 6.0, 0.4


def no_probe(precision: str) -> float:
    raise AssertionError(f"the facts decide here; the probe must not run ({precision})")


def probe_of(factor: float):
    calls = []

    def probe(precision: str) -> float:
        calls.append(precision)
        return factor
    probe.calls = calls
    return probe


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("capability,flags,native_bf16,native_fp16", [
    ("AVX2", AVX2_FLAGS, False, False),                 # issue 15's machine kind
    ("AVX512", AVX512_BF16_FLAGS, True, False),         # Zen 4 / Cooper Lake: AVX512-BF16
    ("AVX512", SAPPHIRE_RAPIDS_FLAGS, True, True),      # AMX-BF16, AVX512-FP16
    ("AVX512", GRANITE_RAPIDS_FLAGS, True, True),       # AMX-FP16 too
    ("AVX512", AVX2_FLAGS | {"avx512f", "avx512bw"}, False, False),  # Skylake-X: no bf16 instructions
    ("SVE256", NEOVERSE_V1_FEATURES, True, True),       # aarch64 with the bf16 feature
    ("DEFAULT", NEOVERSE_N1_FEATURES, False, True),     # aarch64 with fp16 (asimdhp) only
])
def test_cpu_with_readable_flags(capability, flags, native_bf16, native_fp16):
    for precision, native in (("bf16", native_bf16), ("fp16", native_fp16)):
        plan = P.decide(precision, "cpu", capability, flags, no_probe)
        assert plan.precision == precision
        assert plan.slow is not native
        assert plan.measured is False
        if native:
            assert plan.factor is None and "has native" in plan.reason
        else:
            assert plan.factor == P.EMULATED_CPU_FACTOR[precision]
            assert f"CPU {capability} has no native {precision}" in plan.reason
    auto = P.decide("auto", "cpu", capability, flags, no_probe)
    assert auto.precision == ("bf16" if native_bf16 else "fp32")  # never fp16 on a CPU
    assert not auto.slow


def test_avx2_bf16_is_refused_with_the_measured_expectation():
    plan = P.decide("bf16", "cpu", "AVX2", AVX2_FLAGS, no_probe)
    assert plan.slow and math.isclose(plan.factor, 27.7 / 2.87)
    assert f"{plan.factor:.1f}x" == EXPECTED_BF16_FACTOR_TEXT
    assert "avx512_bf16" in plan.reason and "amx_bf16" in plan.reason
    auto = P.decide("auto", "cpu", "AVX2", AVX2_FLAGS, no_probe)
    assert auto.precision == "fp32"
    assert auto.reason == "CPU AVX2 has no native bf16/fp16 matrix products"


def test_fp32_needs_no_facts():
    for device_type in ("cpu", "cuda", "mps", "xpu"):
        plan = P.decide("fp32", device_type, "", None, no_probe)
        assert (plan.precision, plan.factor, plan.slow) == ("fp32", None, False)


@pytest.mark.parametrize("factor,slow,auto", [(SLOW_PROBE, True, "fp32"), (FAST_PROBE, False, "bf16")])
def test_cpu_without_readable_flags_uses_the_probe(factor, slow, auto):
    probe = probe_of(factor)
    plan = P.decide("bf16", "cpu", "DEFAULT", None, probe)
    assert (plan.precision, plan.factor, plan.measured, plan.slow) == ("bf16", factor, True, slow)
    assert probe.calls == ["bf16"]
    chosen = P.decide("auto", "cpu", "DEFAULT", None, probe)
    assert chosen.precision == auto and probe.calls == ["bf16", "bf16"]  # auto probes bf16 only on CPUs


def test_a_probe_is_needed_where_the_facts_do_not_say():
    with pytest.raises(ValueError, match="probe"):
        P.decide("bf16", "cpu", "DEFAULT", None)
    with pytest.raises(ValueError, match="unknown precision"):
        P.decide("fp8", "cpu", "AVX2", AVX2_FLAGS, no_probe)


def test_cuda_with_native_bf16():
    flags = frozenset({P.CUDA_BF16_FLAG})
    for precision in ("bf16", "fp16"):
        plan = P.decide(precision, "cuda", "sm_90", flags, no_probe)
        assert (plan.precision, plan.slow) == (precision, False)
    assert P.decide("auto", "cuda", "sm_80", flags, no_probe).precision == "bf16"


def test_cuda_without_native_bf16():
    assert P.decide("fp16", "cuda", "sm_75", frozenset(), no_probe).slow is False
    auto = P.decide("auto", "cuda", "sm_75", frozenset(), no_probe)
    assert auto.precision == "fp16" and "bf16 not known to be native" in auto.reason
    slow = P.decide("bf16", "cuda", "sm_75", frozenset(), probe_of(SLOW_PROBE))
    assert slow.slow and slow.measured


def test_mps():
    assert P.decide("fp16", "mps", "", None, no_probe).slow is False
    assert P.decide("auto", "mps", "", None, no_probe).precision == "fp16"
    probe = probe_of(FAST_PROBE)
    assert P.decide("bf16", "mps", "", None, probe).measured and probe.calls == ["bf16"]


# ----------------------------------------------------------------------------- the probe and its cache

def test_the_probe_runs_once_and_is_kept_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    facts = P.DeviceFacts("cpu", "DEFAULT", None, "Test CPU")
    measure = probe_of(SLOW_PROBE)
    first = P.decide("bf16", facts.device_type, facts.capability, facts.flags, P.cached_probe(measure, facts))
    again = P.decide("bf16", facts.device_type, facts.capability, facts.flags, P.cached_probe(measure, facts))
    assert first == again and first.factor == SLOW_PROBE
    assert measure.calls == ["bf16"]  # the second decision read the disk
    files = list((tmp_path / "cache" / P.PROBE_CACHE_DIR).glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["name"] == "Test CPU"

    P.cached_probe(measure, P.DeviceFacts("cpu", "DEFAULT", None, "Another CPU"))("bf16")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    P.cached_probe(measure, facts)("bf16")
    assert measure.calls == ["bf16"] * 3  # another CPU model, another torch: measured again


def test_an_unreadable_probe_cache_is_measured_again(tmp_path, caplog):
    facts = P.DeviceFacts("cpu", "DEFAULT", None, "Test CPU")
    measure = probe_of(FAST_PROBE)
    P.cached_probe(measure, facts, tmp_path)("bf16")
    (cached,) = tmp_path.glob("*.json")
    cached.write_text("{not json")
    assert P.cached_probe(measure, facts, tmp_path)("bf16") == FAST_PROBE
    assert measure.calls == ["bf16", "bf16"] and "measuring again" in caplog.text
    assert json.loads(cached.read_text())["factor"] == FAST_PROBE


def test_the_real_probe_times_this_cpu():
    factor = P.measure_factor(torch.device("cpu"), "bf16")
    assert math.isfinite(factor) and factor > 0


def test_resolving_twice_probes_once(tmp_path, monkeypatch, capsys):
    """The commands' resolver on a CPU whose flags cannot be read: one probe, then the disk."""
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "read_cpu_flags", lambda: None)
    calls = []
    monkeypatch.setattr(P, "measure_factor", lambda device, name: calls.append(name) or SLOW_PROBE)
    for _ in range(2):
        assert P.resolve_precision("bf16", torch.device("cpu"), allow_slow=True) == "bf16"
    assert calls == ["bf16"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: --precision bf16: about 6.0x slower") for w in warnings)
    assert "measured" in warnings[0]


# ----------------------------------------------------------------------------- the flag reader

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme avx avx2 fma
processor\t: 1
flags\t\t: fpu vme avx avx2 fma avx512_bf16
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes fphp asimdhp bf16
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text,flags,name", [
    (X86_CPUINFO, {"fpu", "vme", "avx", "avx2", "fma"}, "AMD EPYC 7B13"),  # the first processor's line
    (ARM_CPUINFO, {"fp", "asimd", "evtstrm", "aes", "fphp", "asimdhp", "bf16"}, None),
    ("processor\t: 0\ncpu\t\t: POWER9\n", None, None),                     # no flags line: unreadable
])
def test_cpu_flags_from_cpuinfo(tmp_path, monkeypatch, text, flags, name):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    monkeypatch.setattr(P, "CPUINFO", cpuinfo)
    assert P.read_cpu_flags() == (None if flags is None else frozenset(flags))
    assert P.cpu_name() == name or (name is None and P.cpu_name())


def test_no_cpuinfo_means_unreadable_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "CPUINFO", tmp_path / "absent")
    assert P.read_cpu_flags() is None
    facts = P.device_facts(torch.device("cpu"))
    assert facts.flags is None and "flags unreadable" in facts.describe()


def test_this_cpus_facts():
    facts = P.device_facts(torch.device("cpu"))
    assert facts.capability == torch.backends.cpu.get_cpu_capability()
    assert facts.describe().startswith(f"CPU {facts.name}, torch CPU capability {facts.capability}")


# ----------------------------------------------------------------------------- the commands

def without_native_bf16(monkeypatch) -> None:
    """This machine as a CPU without native bf16: as it is where the flag reader says so,
    else with the reader stubbed (AVX2 flags), so the command tests run on every machine."""
    facts = P.device_facts(torch.device("cpu"))
    if facts.flags is None or not P.decide("bf16", "cpu", facts.capability, facts.flags, no_probe).slow:
        monkeypatch.setattr(P, "read_cpu_flags", lambda: AVX2_FLAGS)
        monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    facts = P.device_facts(torch.device("cpu"))
    assert P.decide("bf16", "cpu", facts.capability, facts.flags, no_probe).slow


def with_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(P, "read_cpu_flags", lambda: AVX512_BF16_FLAGS)
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX512")


@pytest.fixture
def voc(tmp_path, monkeypatch):
    """Two golden VOC images, a split file naming them, private caches; classify argv."""
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))
    ids = ["2007_000107", "2007_000121"]
    lines = [ln for ln in helpers.golden_split_path("voc2007").read_text(encoding="utf-8").splitlines()
             if ln.split() and ln.split()[0] in ids]
    split = tmp_path / "split.txt"
    split.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def argv(run: str, *extra: str) -> list[str]:
        return ["--img_root", str(helpers.golden_image_path("voc2007", ids[0]).parent), "--split_file", str(split),
                "--model_path", str(helpers.TINY_CHECKPOINT), "--device", "cpu", "--model_cache",
                str(tmp_path / "mc"), "--output_dir", str(tmp_path / run), "--scores_out",
                str(tmp_path / f"{run}.npy"), *extra]
    return argv


def test_classify_refuses_a_slow_precision_with_one_line(voc, tmp_path, monkeypatch, capsys):
    without_native_bf16(monkeypatch)
    capsys.readouterr()
    rc = classify_main(voc("out", "--precision", "bf16"))
    out, err = capsys.readouterr()
    assert rc == EXIT_INPUT_ERROR
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: --precision bf16: about 9.7x slower than fp32")
    assert "--precision fp32" in line and P.ALLOW_SLOW_FLAG in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.npy").exists()
    assert not (tmp_path / "mc").exists() and not (tmp_path / "cache").exists()  # the model never loaded
    assert out == ""


def test_classify_runs_a_slow_precision_when_confirmed_and_says_so(voc, tmp_path, monkeypatch, capsys):
    without_native_bf16(monkeypatch)
    rc = classify_main(voc("out", "--precision", "bf16", P.ALLOW_SLOW_FLAG))
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if "precision" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --precision bf16: about 9.7x slower")
    assert (tmp_path / "out" / "voc2007_val_tagclip.txt").is_file()


def _runs(voc, tmp_path, monkeypatch, capsys, concrete: str) -> str:
    """An auto run and a run in ``concrete``: the same label file, scores and journal key;
    the auto run's stderr."""
    keys = []
    real_run_key = tagclip_cli.run_key
    monkeypatch.setattr(tagclip_cli, "run_key", lambda **kw: keys.append(kw) or real_run_key(**kw))
    capsys.readouterr()
    assert classify_main(voc("auto", "--precision", "auto")) == 0
    auto_err = capsys.readouterr().err
    assert classify_main(voc("concrete", "--precision", concrete)) == 0
    label = "voc2007_val_tagclip.txt"
    assert (tmp_path / "auto" / label).read_bytes() == (tmp_path / "concrete" / label).read_bytes()
    assert np.array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / "concrete.npy"))
    assert len(keys) == 2 and keys[0]["precision"] == concrete
    assert {k: v for k, v in keys[0].items()} == {k: v for k, v in keys[1].items()}  # one journal key
    return auto_err


def test_auto_is_fp32_without_native_bf16(voc, tmp_path, monkeypatch, capsys):
    without_native_bf16(monkeypatch)
    err = _runs(voc, tmp_path, monkeypatch, capsys, "fp32")
    lines = [ln for ln in err.splitlines() if ln.startswith("precision auto")]
    assert lines == [f"precision auto: fp32 (CPU {P.cpu_capability()} has no native bf16/fp16 matrix products)"]
    assert "warning" not in err


def test_auto_is_bf16_where_it_is_native(voc, tmp_path, monkeypatch, capsys):
    with_native_bf16(monkeypatch)
    err = _runs(voc, tmp_path, monkeypatch, capsys, "bf16")
    assert "precision auto: bf16 (CPU AVX512 has native bf16 matrix products)" in err.splitlines()
    text_files = list((tmp_path / "cache" / "text").glob("*.npy"))
    assert len(text_files) == 1  # the auto run's text features served the bf16 run: one key


def test_every_command_refuses_before_writing(tmp_path, monkeypatch, capsys):
    without_native_bf16(monkeypatch)
    tiny = str(helpers.TINY_CHECKPOINT)
    images = str(helpers.golden_image_path("voc2007", "2007_000121").parent)
    split = tmp_path / "labels.txt"
    split.write_text("2007_000121 14\n", encoding="utf-8")
    runs = {
        "generate_cams.py": (generate_cams_main, ["--dataset", "voc2012", "--img_root", images, "--split_file",
                                                  str(split), "--cam_out_dir", str(tmp_path / "out"),
                                                  "--model", tiny, "--device", "cpu", "--precision", "bf16"]),
        "tagclip tag": (tagclip_main, ["tag", images, "--classes", "cat,dog", "--model_path", tiny, "--device",
                                       "cpu", "--output_dir", str(tmp_path / "out"), "--precision", "bf16"]),
        "tagclip segment": (tagclip_main, ["segment", images, "--classes", "cat,dog", "--model_path", tiny,
                                           "--device", "cpu", "--out", str(tmp_path / "out"), "--precision", "bf16"]),
        "tagclip demo": (tagclip_main, ["demo", "--model_path", tiny, "--device", "cpu", "--precision", "bf16"]),
    }
    for name, (run, argv) in runs.items():
        capsys.readouterr()
        assert run(argv) == EXIT_INPUT_ERROR, name
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "slower than fp32" in lines[0] and P.ALLOW_SLOW_FLAG in lines[0], (name, lines)
        assert not (tmp_path / "out").exists(), name


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = tagclip_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"classify.py": tagclip_cli.classify_parser(), "generate_cams.py": generate_cams_parser(),
            "tagclip tag": subs["tag"], "tagclip segment": subs["segment"], "tagclip demo": subs["demo"]}


def test_every_command_with_precision_takes_auto_and_the_confirm_flag():
    for name, parser in _parsers().items():
        actions = parser._option_string_actions
        assert actions["--precision"].choices == ("fp32", "fp16", "bf16", "auto"), name
        assert actions["--precision"].default == "fp32", name  # never auto by default
        assert actions[P.ALLOW_SLOW_FLAG].default is False, name


def test_load_model_refuses_an_unresolved_auto(tmp_path):
    from clip.loading import load_model

    with pytest.raises(ValueError, match="auto is resolved"):
        load_model(Path(helpers.TINY_CHECKPOINT), "cpu", "auto", tmp_path)
