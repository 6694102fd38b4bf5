"""The decoding and training benchmarks run end to end (--quick runs): every system (CTranslate2 in its
worker process) runs, decoding produces the fixed output length, and the JSON lines carry the ratios."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("ctranslate2")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_lines(script: str, *flags: str) -> list[dict]:
    """The JSON lines a quick CPU run of benchmarks/`script` prints (it must succeed)."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--device", "cpu", "--quick", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_quick_decoding_benchmark_reports_ratios_against_both_rivals() -> None:
    lines = benchmark_lines("decode.py", "--beams", "4")
    rates = {line["system"]: line["value"] for line in lines if line["metric"] == "target_tokens_per_s"}
    assert set(rates) == {"tformer", "hf", "ctranslate2"} and all(rate > 0 for rate in rates.values())
    # the untimed warm-up (compilation with --compile-step) is reported apart (BENCHMARKS.md rule 2)
    first_calls = {line["system"]: line["value"] for line in lines if line["metric"] == "first_call_s"}
    assert set(first_calls) == set(rates) and all(seconds > 0 for seconds in first_calls.values())
    ratios = {line["metric"]: line["value"] for line in lines if line["metric"].startswith("ratio_vs_")}
    assert ratios["ratio_vs_hf"] == pytest.approx(rates["tformer"] / rates["hf"], rel=1e-2, abs=1e-3)
    assert ratios["ratio_vs_ctranslate2"] == pytest.approx(rates["tformer"] / rates["ctranslate2"], rel=1e-2, abs=1e-3)


def test_quick_training_benchmark_runs_every_system_in_bf16_on_the_cpu() -> None:
    lines = benchmark_lines("train.py", "--precision", "bf16")
    assert lines and all(line["dtype"] == "bf16-autocast" for line in lines)
    assert all(line["tformer_loss_chunk"] == 0 for line in lines)  # each line says how tformer's loss ran
    rates = {line["system"]: line["value"] for line in lines if line["metric"] == "tokens_per_s"}
    assert set(rates) == {"tformer", "hf", "torch"} and all(rate > 0 for rate in rates.values())
    ratios = {line["metric"]: line["value"] for line in lines if line["metric"].startswith("ratio_vs_")}
    assert ratios["ratio_vs_hf"] == pytest.approx(rates["tformer"] / rates["hf"], rel=1e-2, abs=1e-3)


def benchmark_common() -> ModuleType:
    """benchmarks/common.py, imported as the scripts import it (not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_common", BENCHMARKS / "common.py")
    assert spec is not None and spec.loader is not None
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_an_automatic_record_name_never_replaces_an_earlier_record(tmp_path: Path) -> None:
    import datetime as dt

    common = benchmark_common()
    today = dt.date.today().isoformat()
    names = []
    for _ in range(3):
        path = common.record_path("train", "cpu", "auto", results_dir=tmp_path)
        path.write_text("a record\n")
        names.append(path.name)
    assert names == [f"train_cpu_{today}.md", f"train_cpu_{today}_run2.md", f"train_cpu_{today}_run3.md"]
    base = common.record_path("decode", "cpu", "auto", preset="base", results_dir=tmp_path)
    assert base.name == f"decode_cpu_base_{today}.md"  # a base run's record is not named as a small one's run2
    assert common.record_path("train", "cpu", str(tmp_path / "x.md")) == tmp_path / "x.md"
    assert common.record_path("train", "cpu", None) is None


def test_a_record_names_the_tformer_it_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The scripts import whichever tformer is installed, but the record's git fields describe the checkout
    the scripts are in: a wheel, or another checkout's editable install, was measured under this commit."""
    import tformer

    common = benchmark_common()
    in_checkout = (BENCHMARKS.parent / "src" / "tformer").resolve() == Path(tformer.__file__).resolve().parent
    if in_checkout:  # the tests import this checkout's tformer (pip install -e . or PYTHONPATH=src)
        assert common.environment("cpu")["tformer"] == f"{tformer.__version__} from this checkout's src/tformer"
    installed = tmp_path / "site-packages" / "tformer"
    monkeypatch.setattr(tformer, "__file__", str(installed / "__init__.py"))
    assert common.environment("cpu")["tformer"] == (
        f"{tformer.__version__} from {installed}, not this checkout (its git fields do not describe it)"
    )


def training_benchmark_args(monkeypatch: pytest.MonkeyPatch, *flags: str) -> tuple[ModuleType, Any]:
    """benchmarks/train.py, imported as a script imports it, and its arguments for a CPU run with `flags`."""
    spec = importlib.util.spec_from_file_location("benchmark_train", BENCHMARKS / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setattr(sys, "argv", ["train.py", "--device", "cpu", *flags])
    return train, train.parse_args()


def test_a_training_record_says_how_each_system_is_compiled_and_times_every_compilation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With --rivals-compile layers and no --compile, Marian compiled at its first call, whose time a CPU
    record left out (first_call_s only with --compile); a tformer step compiled but not graphed was
    described as a plain train_step, its compilation named nowhere but the JSON lines."""
    train, args = training_benchmark_args(monkeypatch, "--rivals-compile", "layers")
    assert train.first_call_reported(args)
    assert train.tformer_notes(args) == "tformer: train_step (label smoothing 0.1, clip 1.0, AdamW). "
    assert train.rivals_notes(args).startswith("Marian and nn.Transformer compile each layer in place")
    train, args = training_benchmark_args(monkeypatch, "--compile", "--rivals-compile", "none")
    assert train.first_call_reported(args)
    assert train.tformer_notes(args).endswith(", its layers compiled (torch.compile per layer). ")
    assert train.rivals_notes(args) == "Marian and nn.Transformer run eagerly (not compiled). "
    train, args = training_benchmark_args(monkeypatch, "--compile", "model")
    assert "its model and loss compiled whole (runtime.compile_objective" in train.tformer_notes(args)
    assert "are compiled whole" in train.rivals_notes(args)
    train, args = training_benchmark_args(monkeypatch, "--compile", "model", "--graph")
    assert "compiled whole (torch.compile, no CUDA graphs of its own). " in train.tformer_notes(args)
    train, args = training_benchmark_args(monkeypatch)
    assert not train.first_call_reported(args) and "run eagerly" in train.rivals_notes(args)


def test_a_graphed_training_benchmark_refuses_a_chunked_loss_it_would_not_measure() -> None:
    """GraphedTrainStep computes the whole loss: `--graph --loss-chunk 8` measured an unchunked step, and its
    record (whose JSON lines do not carry the chunk) read as a chunked one."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train.py"), "--device", "cpu", "--graph", "--loss-chunk", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "--graph records the whole loss" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_nn_transformer_rival_drops_out_its_embeddings_as_tformer_and_marian_do() -> None:
    """tformer and Marian apply dropout to the embedded sum (embedding + positions); the rival must too,
    or it does less work per step than they do (BENCHMARKS.md rule 1)."""
    import importlib.util

    import torch

    from tformer.config import preset

    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_train", BENCHMARKS / "train.py")
        assert spec is not None and spec.loader is not None
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
    finally:
        sys.path.remove(str(BENCHMARKS))
    config = preset("tiny", src_vocab_size=50, tgt_vocab_size=50, dropout=0.1)
    model = train.TorchTransformer(config, 50)
    ids = torch.randint(4, 50, (4, 8))
    model.train()
    assert not torch.equal(model.embed(ids), model.embed(ids))
    model.eval()
    assert torch.equal(model.embed(ids), model.embed(ids))


def test_quick_decoding_benchmark_runs_in_bfloat16_on_the_cpu_when_asked() -> None:
    """--dtype bfloat16: tformer and Hugging Face decode in it on the CPU (the lines say so); CTranslate2,
    which has no bfloat16 on the CPU, is refused by name instead of being run in another dtype."""
    lines = benchmark_lines("decode.py", "--beams", "1", "--dtype", "bfloat16", "--systems", "tformer,hf")
    rates = {line["system"]: line["value"] for line in lines if line["metric"] == "target_tokens_per_s"}
    assert set(rates) == {"tformer", "hf"} and all(line["dtype"] == "bfloat16" for line in lines)
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode.py"), "--quick", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert refused.returncode == 2 and "CTranslate2 has no bfloat16 on the CPU" in refused.stderr
