"""``benchmarks/gpu_check.py`` (the correctness part of the GPU check) works, on the CPU: its
checks pass on correct code and report FAIL, with exit status 1, when a result is off."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def _lines(text: str, status: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(status + " ")]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGCLIP_CACHE", str(tmp_path / "cache"))  # gpu_check.main points it at its work folder


def test_gpu_check_passes_on_the_cpu(capsys, tmp_path):
    assert gpu_check.main(["--device", "cpu", "--skip_torchrun", "--only", "coco2017", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    passed = _lines(out, "PASS")
    assert len(passed) == 6 and not _lines(out, "FAIL"), out  # CAMs of 2 variants, mIoU of each with/without CRF
    assert "# 6 of 6 checks passed" in out


def test_gpu_check_reports_a_wrong_result(capsys, monkeypatch, tmp_path):
    want = gpu_check.eh.expected_score

    def shifted(variant, kind):
        score = dict(want(variant, kind))
        score["Mean IoU"] = gpu_check.eh.as_float(score["Mean IoU"]) + 0.01
        return score

    monkeypatch.setattr(gpu_check.eh, "expected_score", shifted)
    assert gpu_check.main(["--device", "cpu", "--skip_torchrun", "--only", "coco2017_gtlabels",
                           "--work", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert len(_lines(out, "FAIL")) == 2 and len(_lines(out, "PASS")) == 1, out
    assert all("mIoU" in ln for ln in _lines(out, "FAIL"))
