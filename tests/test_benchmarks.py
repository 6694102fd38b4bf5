"""The decoding benchmark runs end to end (a --quick run): every system, CTranslate2 in its worker
process, produces the fixed output length, and the JSON lines carry the ratios against both rivals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("ctranslate2")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_quick_decoding_benchmark_reports_ratios_against_both_rivals() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode.py"), "--device", "cpu", "--quick", "--beams", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    rates = {line["system"]: line["value"] for line in lines if line["metric"] == "target_tokens_per_s"}
    assert set(rates) == {"tformer", "hf", "ctranslate2"} and all(rate > 0 for rate in rates.values())
    ratios = {line["metric"]: line["value"] for line in lines if line["metric"].startswith("ratio_vs_")}
    assert ratios["ratio_vs_hf"] == pytest.approx(rates["tformer"] / rates["hf"], rel=1e-2)
    assert ratios["ratio_vs_ctranslate2"] == pytest.approx(rates["tformer"] / rates["ctranslate2"], rel=1e-2)
