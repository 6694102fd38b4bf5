"""--dtype: translate, evaluate and serve decode a trained run in bfloat16 when asked (the dtype the GPU
speeds of docs/performance.md were measured in); float32 stays the default. Before, the commands always
decoded in float32, so the documented GPU speeds were reachable only through the Python API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_export_hf import SENTENCES, make_run

from tformer.cli.decode_options import DTYPE_NAMES
from tformer.cli.main import main
from tformer.config import ConfigError
from tformer.decoding.ensemble import EnsembleModel
from tformer.decoding.pipeline import Translator
from tformer.runtime import DECODE_DTYPES, resolve_decode_dtype
from tformer.training.checkpoint_load import load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("dtype") / "run")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("".join(sentence + "\n" for sentence in SENTENCES), encoding="utf-8")
    return path


def nbest_lines(model: torch.nn.Module, run: Path) -> list[str]:
    """What `translate --nbest 1` prints for SENTENCES, decoded by `model` with the run's tokenizer and settings."""
    loaded = load_run(run)
    translator = Translator(model, loaded.tokenizer, loaded.experiment.decode)
    return [f"{index} ||| {t[0].text} ||| {t[0].score:.4f}" for index, t in enumerate(translator.translate(SENTENCES))]


def test_load_run_gives_the_weights_and_tables_in_the_dtype_asked_for(run: Path) -> None:
    full = load_run(run).model
    half = load_run(run, dtype=torch.bfloat16).model
    assert not half.training
    full_state, half_state = full.state_dict(keep_vars=True), half.state_dict(keep_vars=True)
    for name, tensor in half_state.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full_state[name].to(torch.bfloat16)), name
    buffers = dict(half.named_buffers())  # the sinusoidal tables, which no checkpoint holds
    assert buffers and all(buffer.dtype == torch.bfloat16 for buffer in buffers.values())


def test_translate_decodes_in_bfloat16_with_dtype_and_in_float32_by_default(
    run: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, half = load_run(run).model, load_run(run).model.to(torch.bfloat16)
    assert nbest_lines(half, run) != nbest_lines(full, run)  # the two dtypes tell apart here
    for options, model in (([], full), (["--dtype", "float32"], full), (["--dtype", "bfloat16"], half)):
        assert main(["translate", str(run), "--input", str(source), "--nbest", "1", *options]) == 0
        assert capsys.readouterr().out.splitlines() == nbest_lines(model, run), options


def test_an_ensemble_decodes_every_member_in_the_dtype_asked_for(
    run: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = load_run(run).model.to(torch.bfloat16)
    ensemble = EnsembleModel([half, load_run(run).model.to(torch.bfloat16)])
    argv = ["translate", str(run), "--input", str(source), "--nbest", "1", "--ensemble", str(run)]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines() == nbest_lines(ensemble, run)


def test_evaluate_scores_the_bfloat16_translations_with_dtype(
    run: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = load_run(run, dtype=torch.bfloat16)
    expected = Translator(loaded.model, loaded.tokenizer, loaded.experiment.decode).translate_texts(SENTENCES)
    output = tmp_path / "hyp.txt"
    argv = ["evaluate", str(run), "--src", str(source), "--ref", str(source), "--device", "cpu"]
    assert main([*argv, "--dtype", "bfloat16", "--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8").splitlines() == expected
    capsys.readouterr()


def test_serve_starts_with_the_model_in_the_dtype_asked_for(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import tformer.serving

    started_with = []

    def capture(model, tokenizer, decode, **options):
        started_with.append({parameter.dtype for parameter in model.parameters()})
        raise OSError("stop here")  # instead of serving: an error the command reports in one line

    monkeypatch.setattr(tformer.serving, "create_app", capture)
    assert main(["serve", str(run), "--port", "0", "--dtype", "bfloat16"]) == 2
    assert main(["serve", str(run), "--port", "0"]) == 2
    assert started_with == [{torch.bfloat16}, {torch.float32}]


def test_a_bfloat16_server_answers_what_bfloat16_translation_gives(run: Path) -> None:
    """The server's batcher packs float32 weights for oneDNN; a bfloat16 model is decoded as it is."""
    pytest.importorskip("fastapi")
    import asyncio

    import httpx

    from tformer.serving import create_app

    loaded = load_run(run, dtype=torch.bfloat16)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode)

    async def ask() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                health = await client.get("/health")
                assert health.json()["dtype"] == "bfloat16" and health.json()["device"] == "cpu"
                return await client.post("/translate", json={"sentences": SENTENCES})

    answer = asyncio.run(ask())
    assert answer.status_code == 200
    got = [[(c["text"], c["score"]) for c in t["nbest"]] for t in answer.json()["translations"]]
    translator = Translator(loaded.model, loaded.tokenizer, loaded.experiment.decode)
    assert got == [[(t.text, t.score) for t in nbest] for nbest in translator.translate(SENTENCES)]


def test_the_dtype_names_are_the_runtime_s_and_bfloat16_is_refused_on_a_gpu_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tuple(DECODE_DTYPES) == DTYPE_NAMES
    assert resolve_decode_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla V100")
    with pytest.raises(ConfigError, match=r"^--dtype bfloat16: Tesla V100 has no bfloat16; use float32$"):
        resolve_decode_dtype("bfloat16", torch.device("cuda"))
    assert resolve_decode_dtype("float32", torch.device("cuda")) == torch.float32
