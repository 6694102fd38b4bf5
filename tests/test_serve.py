"""`tformer serve`: the HTTP API under concurrent load from another process (every response equal to the
offline translation with the same settings, so batching changes nothing), clear 4xx answers to bad input
without the server dying, a graceful shutdown that finishes the requests in flight, one startup line, and
one-line errors (exit 2) for a bad device, a busy port or an unknown host."""

from __future__ import annotations

import dataclasses
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from test_export_hf import SENTENCES, make_run

from tformer.cli.main import main
from tformer.decoding.pipeline import Translator
from tformer.serving.load import send_all, server_process
from tformer.training.checkpoint_load import load_run

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

OPTIONS = ["--max-sentences", "4", "--max-chars", "80", "--max-wait-ms", "20", "--max-beam", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(run):
    with server_process(run, options=OPTIONS) as (url, process):
        yield url, process


def offline(loaded, body: dict) -> list[list[tuple[str, float]]]:
    """What `tformer translate` gives for the body's sentences with the body's settings."""
    config = loaded.experiment.decode
    if "beam" in body:
        config = dataclasses.replace(config, beam_size=body["beam"], nbest=min(config.nbest, body["beam"]))
    if "nbest" in body:
        config = dataclasses.replace(config, nbest=body["nbest"])
    if "max_length" in body:
        config = dataclasses.replace(config, max_len_a=0.0, max_len_b=body["max_length"])
    results = Translator(loaded.model, loaded.tokenizer, config).translate(body["sentences"])
    return [[(t.text, t.score) for t in nbest] for nbest in results]


def bodies(count: int) -> list[dict]:
    settings = [{}, {"beam": 1}, {"beam": 3, "nbest": 2}, {"beam": 2, "max_length": 4}]
    return [
        {"sentences": [SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3)], **settings[i % len(settings)]}
        for i in range(count)
    ]


def test_concurrent_requests_are_batched_and_equal_offline_translation(run, server):
    url, _ = server
    windows_before = httpx.get(f"{url}/health").json()["windows"]
    report = send_all(url, bodies(32), concurrency=8, timeout_s=30)
    assert report.errors == 0
    loaded = load_run(run)
    for reply in report.replies:
        expected = offline(loaded, reply.body)
        got = [[(c["text"], c["score"]) for c in t["nbest"]] for t in reply.response["translations"]]
        assert [[text for text, _ in nbest] for nbest in got] == [[text for text, _ in nbest] for nbest in expected]
        for got_nbest, expected_nbest in zip(got, expected, strict=True):
            assert [s for _, s in got_nbest] == pytest.approx([s for _, s in expected_nbest], abs=1e-4)
        assert [t["text"] for t in reply.response["translations"]] == [nbest[0][0] for nbest in expected]
    windows = httpx.get(f"{url}/health").json()["windows"] - windows_before
    assert windows < len(report.replies), "concurrent requests should share decoding windows"
    assert 0 < report.latency_percentile(50) <= report.latency_percentile(99)


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        ('{"sentences": ["a"', 400, "not valid JSON"),
        ('{"sentences": "hello"}', 422, "sentences: Input should be a valid list"),
        ("{}", 422, "sentences: Field required"),
        # the body as a whole: "body: Field required" and "body: Input should be a valid dictionary" before
        ("", 422, 'the request body is empty; send a JSON object such as {"sentences": ["..."]}'),
        ("null", 422, 'the request body must be a JSON object such as {"sentences": ["..."]}, not null'),
        ('["a", "b"]', 422, 'must be a JSON object such as {"sentences": ["..."]}, not an array'),
        ('{"sentences": ["a"], "colour": 1}', 422, "colour: Extra inputs are not permitted"),
        ('{"sentences": []}', 422, "at least one sentence"),
        ('{"sentences": ["a", "b", "c", "d", "e"]}', 413, "5 sentences in one request; the limit is 4"),
        ('{"sentences": ["' + "x" * 81 + '"]}', 413, "sentence 0 has 81 characters; the limit is 80"),
        ('{"sentences": ["a"], "beam": 0}', 422, "beam: Input should be greater than or equal to 1"),
        ('{"sentences": ["a"], "beam": 9}', 422, "beam: at most 4"),
        ('{"sentences": ["a"], "beam": 2, "nbest": 3}', 422, "nbest: at most beam (2, the request's), got 3"),
        ('{"sentences": ["a"], "max_length": 100000}', 422, "max_length: at most 64"),
        # numbers are strict: no true -> 1, "2" -> 2 or 4.0 -> 4
        ('{"sentences": ["a"], "beam": true}', 422, "beam: Input should be a valid integer"),
        ('{"sentences": ["a"], "beam": "2"}', 422, "beam: Input should be a valid integer"),
        ('{"sentences": ["a"], "nbest": "1"}', 422, "nbest: Input should be a valid integer"),
        ('{"sentences": ["a"], "max_length": 4.0}', 422, "max_length: Input should be a valid integer"),
        # valid JSON, not text: a lone surrogate (the tokenizer could not take it: a plain-text 500 before)
        ('{"sentences": ["\\ud800 the cat"]}', 422, "sentence 0 holds an unpaired surrogate (U+D800)"),
        # a NUL, as translate refuses it in its input: UTF-16 text (or binary data) read as UTF-8
        (
            '{"sentences": ["t\\u0000h\\u0000e\\u0000"]}',
            422,
            "sentence 0 holds a NUL character (U+0000): it looks like UTF-16",
        ),
        # bodies FastAPI cannot parse for a reason other than JSON syntax: all "There was an error parsing
        # the body" before, which left a client guessing
        pytest.param(
            '{"sentences": ["caf\u00e9"]}'.encode("latin-1"),
            400,
            "the request body is not valid UTF-8: byte 0xE9 at offset 19 (invalid continuation byte); send the "
            "JSON encoded as UTF-8",
            id="latin-1-body",
        ),
        pytest.param('{"beam": ' + "9" * 5000 + "}", 400, "holds a number of over 4300 digits", id="5000-digits"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_lives_on(server, content, status, message):
    url, process = server
    response = httpx.post(f"{url}/translate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]
    assert "\n" not in response.json()["error"]
    assert httpx.get(f"{url}/health").status_code == 200 and process.poll() is None


@pytest.mark.parametrize(
    ("headers", "got"),
    [
        ({"content-type": "application/x-www-form-urlencoded"}, "content-type: application/x-www-form-urlencoded"),
        ({"content-type": "text/plain"}, "content-type: text/plain"),
        ({}, "no content-type"),
    ],
)
def test_a_body_not_sent_as_json_gets_415_saying_which_header_to_send(server, headers, got):
    """`curl -d BODY` sends a form's content type: the answer was a 422 saying the body "should be a valid
    dictionary or object to extract fields from", which did not point at the missing header."""
    url, _ = server
    response = httpx.post(f"{url}/translate", content=b'{"sentences": ["hello dog"]}', headers=headers)
    assert response.status_code == 415
    assert response.json() == {
        "error": f"send the body as JSON with the header content-type: application/json (got {got})"
    }


def test_oversized_body_is_refused_and_docs_are_served(server):
    url, _ = server
    response = httpx.post(f"{url}/translate", content=b"x" * 200_000, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]

    def chunks():  # no Content-Length: Transfer-Encoding chunked, 200 kB in 2 kB pieces
        for _ in range(100):
            yield b" " * 2000

    chunked = httpx.post(f"{url}/translate", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]
    assert httpx.get(f"{url}/nowhere").json()["error"].startswith("no such path: /nowhere; ")  # the one format
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/translate" in schema["paths"] and "/health" in schema["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200


def test_a_body_nested_too_deeply_for_json_gets_a_400_and_the_server_lives_on(run):
    """Python's json gives up on deep nesting (a RecursionError, answered 400) at a depth that depends on the
    version: 3000 levels were too many for 3.11 and 3.12.1, not for 3.13.0 (it parses 9999: the body got a 422
    instead). 100000 levels are too many for each, and fit the default body limit (the module's
    server, with --max-chars 80, takes 8 KB at most)."""
    depth = 100_000
    content = '{"sentences": ' + "[" * depth + "]" * depth + "}"
    with server_process(run) as (url, process):
        response = httpx.post(f"{url}/translate", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"] == "the request body is not valid JSON for this API: it is nested too deeply"
        assert httpx.get(f"{url}/health").status_code == 200 and process.poll() is None


def test_sigterm_finishes_requests_in_flight(run):
    # a 300 ms batching window keeps the requests in flight when the signal arrives
    with server_process(run, options=["--max-wait-ms", "300"]) as (url, process):
        results = {}

        def load() -> None:
            results["report"] = send_all(url, bodies(6), concurrency=6, timeout_s=30)

        sender = threading.Thread(target=load)
        sender.start()
        time.sleep(0.15)
        process.send_signal(signal.SIGTERM)
        sender.join(timeout=30)
        # uvicorn re-raises the signal once shut down, so the exit status says "terminated by SIGTERM"
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    report = results["report"]
    assert report.errors == 0 and len(report.replies) == 6
    loaded = load_run(run)
    for reply in report.replies:
        assert [t["text"] for t in reply.response["translations"]] == [n[0][0] for n in offline(loaded, reply.body)]


def test_default_beam_is_capped_by_max_beam(run):
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    decode = dataclasses.replace(loaded.experiment.decode, nbest=3)  # the run: beam 3, 3-best
    capped = dataclasses.replace(decode, beam_size=2, nbest=2)
    expected = Translator(loaded.model, loaded.tokenizer, capped).translate(SENTENCES[:2])
    app = create_app(loaded.model, loaded.tokenizer, decode, config=ServeConfig(max_beam=2))
    with TestClient(app) as client:
        response = client.post("/translate", json={"sentences": SENTENCES[:2]})
        too_many = client.post("/translate", json={"sentences": SENTENCES[:1], "nbest": 3})
    assert response.status_code == 200
    got = [[c["text"] for c in t["nbest"]] for t in response.json()["translations"]]
    assert got == [[t.text for t in nbest] for nbest in expected]  # 2 candidates each: beam 2, not 3
    assert too_many.status_code == 422 and "nbest: at most beam (2, the server's), got 3" in too_many.json()["error"]


def test_a_sampling_server_draws_nbest_samples_whatever_the_beam(run):
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    sampling = dataclasses.replace(loaded.experiment.decode, sampling=True, beam_size=1, nbest=1)
    app = create_app(loaded.model, loaded.tokenizer, sampling, config=ServeConfig(max_decode_tokens=200))
    with TestClient(app) as client:
        three = client.post("/translate", json={"sentences": SENTENCES[:2], "nbest": 3, "max_length": 8})
        too_many = client.post("/translate", json={"sentences": SENTENCES[:2], "nbest": 20, "max_length": 8})
    assert three.status_code == 200, three.json()
    assert [len(t["nbest"]) for t in three.json()["translations"]] == [3, 3]
    assert too_many.status_code == 413  # the decode budget counts samples: 2 x 20 x 8 > 200
    assert "2 sentences x 20 samples x up to 8 output tokens" in too_many.json()["error"]


def test_a_sampling_request_gets_the_samples_it_gets_alone_whatever_it_waited_with(run, monkeypatch):
    """Concurrent sampling requests decoded in one call got samples that depended on which other requests
    shared their window (a sample's draws depended on its sentence's row in the batch), not those of
    `tformer translate` on the same sentences. Sampling jobs were then decoded on their own; now a sentence's
    draws hash the sentence, not its row, and jobs of the same settings share a call again, as here."""
    import asyncio

    from tformer.serving import ServeConfig, create_app
    from tformer.serving.batcher import Batcher

    grouped, calls_of = [], Batcher._calls
    monkeypatch.setattr(Batcher, "_calls", lambda self, jobs: grouped.append(calls_of(self, jobs)) or grouped[-1])
    loaded = load_run(run)
    sampling = dataclasses.replace(loaded.experiment.decode, sampling=True, beam_size=1, nbest=2)
    app = create_app(loaded.model, loaded.tokenizer, sampling, config=ServeConfig(max_wait_ms=500))
    requests = [[SENTENCES[0]], [SENTENCES[1], SENTENCES[2]], [SENTENCES[3]]]

    async def together():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                posts = (client.post("/translate", json={"sentences": sentences}) for sentences in requests)
                responses = await asyncio.gather(*posts)
        return responses, app.state.batcher.windows  # counted once the window ended (its answers come sooner)

    responses, windows = asyncio.run(together())
    assert windows == 1  # all three waited in one window
    assert [len(calls) for calls in grouped] == [1]  # and, of the same settings, were decoded in one call
    translator = Translator(loaded.model, loaded.tokenizer, sampling)
    for sentences, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.json()
        got = response.json()["translations"]
        expected = list(translator.translate(sentences))
        assert [[c["text"] for c in t["nbest"]] for t in got] == [[t.text for t in nbest] for nbest in expected]
        scores = [c["score"] for t in got for c in t["nbest"]]
        assert scores == pytest.approx([t.score for nbest in expected for t in nbest], abs=1e-5)  # padding's rounding


def test_jobs_share_a_call_up_to_exactly_max_batch_tokens_and_only_with_their_own_settings() -> None:
    """A window's jobs of one decode setting share a Translator call while it holds at most max_batch_tokens
    source tokens (equal fits), cheapest first; jobs of other settings get calls of their own."""
    from tformer.config import DecodeConfig
    from tformer.serving.batcher import Batcher, _Job

    batcher = Batcher(torch.nn.Linear(1, 1), None, max_batch_tokens=10)
    beam, greedy = DecodeConfig(beam_size=2), DecodeConfig(beam_size=1)
    tokens = [(6, beam), (4, beam), (3, greedy), (1, beam)]
    jobs = [_Job([f"s{index}"], config, n, None) for index, (n, config) in enumerate(tokens)]
    calls = batcher._calls(jobs)
    assert [(call.config, call.members, call.tokens) for call in calls] == [
        (beam, [3, 1], 5), (greedy, [2], 3), (beam, [0], 6)
    ]  # fmt: skip
    two = batcher._calls(jobs[:2])
    assert [(call.members, call.tokens) for call in two] == [([1, 0], 10)]
    # cheapest by source tokens x rows per sentence: 3 tokens greedy before 2 tokens at beam 4
    wide = [_Job(["a"], DecodeConfig(beam_size=4), 2, None), _Job(["b"], greedy, 3, None)]
    assert [call.members for call in batcher._calls(wide)] == [[1], [0]]


def test_a_request_whose_worst_case_is_over_max_decode_tokens_is_refused_up_front(run):
    """Nothing bounded a request's decoding work: 16 long sentences at beam 8 held the one worker, and every
    other client, for minutes. Now its worst case (sentences x beam x max output length) must fit."""
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)  # decodes at beam 3, at most 10 output tokens per sentence
    config = ServeConfig(max_decode_tokens=60)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=config)
    with TestClient(app) as client:
        at_the_limit = client.post("/translate", json={"sentences": SENTENCES[:2]})  # 2 x 3 x 10
        over = client.post("/translate", json={"sentences": SENTENCES[:3]})  # 3 x 3 x 10
        smaller_beam = client.post("/translate", json={"sentences": SENTENCES[:3], "beam": 2})
        shorter = client.post("/translate", json={"sentences": SENTENCES[:4], "max_length": 5})
    assert at_the_limit.status_code == 200 and smaller_beam.status_code == 200 and shorter.status_code == 200
    assert over.status_code == 413
    assert over.json() == {
        "error": "this request may decode up to 90 tokens (3 sentences x beam 3 x up to 10 output tokens); "
        "the limit is 60 (--max-decode-tokens): send fewer sentences, a smaller beam or a max_length"
    }


def test_a_beam_too_large_for_the_memory_is_named_as_the_caller_set_it(run, monkeypatch, tmp_path, capsys):
    """The memory refusal names the request's field over HTTP and the flag on the command line (both came from
    one message naming translate's --beam)."""
    from fastapi.testclient import TestClient
    from test_decoding_memory import fake_memory

    from tformer.serving import ServeConfig, create_app

    fake_memory(monkeypatch, 2**30)
    loaded = load_run(run)
    app = create_app(
        loaded.model,
        loaded.tokenizer,
        loaded.experiment.decode,
        config=ServeConfig(max_beam=10**6, max_decode_tokens=10**12),
    )
    with TestClient(app) as client:
        response = client.post("/translate", json={"sentences": SENTENCES[:1], "beam": 500_000})
    assert response.status_code == 422
    assert re.search(r"with beam 500000 \(beam\) needs about .* use a smaller beam$", response.json()["error"])
    (tmp_path / "in.txt").write_text(SENTENCES[0] + "\n", encoding="utf-8")
    options = ["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")]
    assert main(["translate", str(run), *options, "--beam", "500000"]) == 2
    assert re.search(r"beam 500000 \(--beam\) needs about .* use a smaller --beam\n$", capsys.readouterr().err)


def test_ready_is_200_while_the_batcher_takes_requests_and_503_before_and_after(run):
    """/health was the only probe: a load balancer could not tell a live server from one ready to serve."""
    import asyncio

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())

    async def probe():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = await client.get("/ready")
            async with app.router.lifespan_context(app):
                serving = await client.get("/ready")
                await app.state.batcher.stop()  # what the lifespan's exit does once uvicorn shuts down
                stopping = await client.get("/ready")
                alive = await client.get("/health")
        return before, serving, stopping, alive

    before, serving, stopping, alive = asyncio.run(probe())
    assert serving.status_code == 200 and serving.json() == {"status": "ready"}
    for response in (before, stopping):
        assert response.status_code == 503
        assert response.json() == {"error": "not ready: the server is starting or shutting down"}
    assert alive.status_code == 200


@pytest.fixture
def no_server(monkeypatch):
    """Fail, instead of serving until killed, if a test that expects an error reaches uvicorn."""

    def refuse(*args, **kwargs):
        raise AssertionError("uvicorn was started")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)


def assert_one_error_line(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        pytest.param(["--device", "foo"], ["--device foo is not a device"], id="unknown-device"),
        pytest.param(
            ["--device", "cuda"],
            ["no CUDA device is available; use --device cpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
            id="cuda-without-cuda",
        ),
        pytest.param(
            ["--graceful-timeout", "-1"],
            ["--graceful-timeout must be at least 0 seconds, got -1.0"],
            id="negative-graceful-timeout",
        ),
        pytest.param(["--max-wait-ms", "nan"], ["max_wait_ms (--max-wait-ms) must be >= 0"], id="nan-max-wait"),
        # a request that fills no window waited for ever: the server started, and never answered
        pytest.param(["--max-wait-ms", "inf"], ["--max-wait-ms) must be >= 0 and finite, got inf"], id="inf-max-wait"),
        pytest.param(["--max-beam", "0"], ["max_beam (--max-beam) must be at least 1, got 0"], id="zero-max-beam"),
        pytest.param(
            ["--max-decode-tokens", "0"],
            ["max_decode_tokens (--max-decode-tokens) must be at least 1, got 0"],
            id="zero-max-decode-tokens",
        ),
        pytest.param(["--max-queue", "0"], ["max_queue (--max-queue) must be at least 1, got 0"], id="zero-max-queue"),
        pytest.param(
            ["--graceful-timeout", "nan"], ["--graceful-timeout must be at least 0"], id="nan-graceful-timeout"
        ),
        pytest.param(["--set", "model.d_model=8"], ["--set takes decoding settings"], id="set-not-decode"),
        pytest.param(["--set", "decode.topk=3"], ["unknown key(s) topk in [decode]"], id="set-unknown-key"),
        pytest.param(  # the server started, then answered every request with an error
            ["--set", "decode.banned_ids=[99999]"],
            ["decode.banned_ids holds 99999, outside this model's target vocabulary"],
            id="set-banned-id-outside-vocabulary",
        ),
    ],
)
def test_bad_options_are_one_line_errors(run, no_server, capsys, options, fragments):
    assert main(["serve", str(run), "--port", "0", *options]) == 2
    assert_one_error_line(capsys, *fragments)


def test_set_changes_the_decoding_settings_the_server_starts_with(run, monkeypatch):
    import tformer.serving

    started_with = []

    def capture(model, tokenizer, decode, **options):
        started_with.append(decode)
        raise OSError("stop here")  # instead of serving: an error the command reports in one line

    monkeypatch.setattr(tformer.serving, "create_app", capture)
    settings = ["--set", "decode.no_repeat_ngram_size=2", "--set", "decode.max_len_b=3"]
    assert main(["serve", str(run), "--port", "0", *settings]) != 0
    (decode,) = started_with
    assert decode.no_repeat_ngram_size == 2 and decode.max_len_b == 3
    assert decode.beam_size == load_run(run).experiment.decode.beam_size  # the rest is the run's


def test_a_sampling_setting_for_a_searching_server_is_named_in_one_startup_warning(run, monkeypatch):
    import tformer.serving

    monkeypatch.setattr(tformer.serving, "create_app", lambda *args, **options: (_ for _ in ()).throw(OSError("stop")))
    with pytest.warns(UserWarning, match=r"^--set decode.top_p is a sampling setting, which beam search \(beam 3\)"):
        assert main(["serve", str(run), "--port", "0", "--set", "decode.top_p=0.9"]) != 0


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (["--max-beam", "2"], "the run's decode.beam_size=3 is over --max-beam 2: {}beam 2"),
        (["--max-beam", "4", "--set", "decode.beam_size=6"], "--set decode.beam_size=6 is over --max-beam 4: {}beam 4"),
        (
            ["--max-beam", "2", "--set", "decode.nbest=3"],
            "decode.beam_size=3 is over --max-beam 2: {}beam 2 and nbest 2",
        ),
        (["--max-beam", "3"], None),
        (["--max-beam", "2", "--set", "decode.sampling=true"], None),  # samples: no beam to cap
    ],
)
def test_a_beam_over_max_beam_is_capped_with_one_startup_line(run, monkeypatch, capsys, options, line):
    """The cap was silent: a server started with --set decode.beam_size=16 decoded at --max-beam 8."""
    import tformer.serving

    def stop(*args, **kwargs):
        raise OSError("stop here")  # instead of serving: the startup lines are printed by now

    monkeypatch.setattr(tformer.serving, "create_app", stop)
    assert main(["serve", str(run), "--port", "0", *options]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "error: stop here"
    if line is None:
        assert lines == ["error: stop here"]
    else:
        (warned,) = lines[:-1]
        assert warned.startswith("warning: ") and warned.endswith(
            line.format("a request that sends no beam is decoded with ")
        )


def test_busy_port_and_unknown_host_are_one_line_errors(run, no_server, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 2
    assert_one_error_line(capsys, f"error: cannot listen on 127.0.0.1:{port}: ", "choose another --port")
    assert main(["serve", str(run), "--host", "999.1.1.1", "--port", "0"]) == 2
    assert_one_error_line(capsys, "error: cannot listen on 999.1.1.1:0: ", "check --host")


def test_an_ipv6_host_in_brackets_is_named_with_one_pair(run, no_server, capsys):
    """`--host [::1]`, as an address is written in a URL, was handed to getaddrinfo brackets and all, and the
    error doubled them: "cannot listen on [[::1]]:0"."""
    assert main(["serve", str(run), "--host", "[fe80::zz]", "--port", "0"]) == 2
    assert_one_error_line(capsys, "error: cannot listen on [fe80::zz]:0: ", "check --host")
    assert main(["serve", str(run), "--host", "fe80::zz", "--port", "0"]) == 2
    assert_one_error_line(capsys, "error: cannot listen on [fe80::zz]:0: ", "check --host")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_listens_with_or_without_brackets(run, monkeypatch, capsys, host):
    """Both spellings bind ::1, announce http://[::1]:PORT and warn of nothing (it is the loopback)."""
    import tformer.serving.server as server_module

    seen = []

    def record(app, listener, *, graceful_timeout, ready_line, on_force_exit):  # instead of serving until killed
        seen.append((listener.family, listener.getsockname()[:2], ready_line))

    monkeypatch.setattr(server_module, "serve", record)
    assert main(["serve", str(run), "--host", host, "--port", "0"]) == 0
    ((family, (address, port), ready_line),) = seen
    assert family == socket.AF_INET6 and address == "::1" and port > 0
    assert ready_line.startswith(f"serving {run} on http://[::1]:{port} (")
    assert capsys.readouterr().err == ""


def test_a_port_taken_between_bind_and_listen_is_a_one_line_error(run, monkeypatch, capsys):
    """Two servers started on one port at about the same time both bind it (SO_REUSEADDR lets sockets that
    do not listen yet share an address), and the one that listens second failed inside uvicorn, once its
    model was loaded: a traceback, then `error: [Errno 98] Address already in use`, with no hint."""
    import tformer.serving.server as server_module

    bind, others, ports = server_module.bind, [], []

    def bind_then_lose_the_race(host: str, port: int) -> socket.socket:
        listener = bind(host, port)
        other = socket.socket()  # another server on the port, ready first
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(listener.getsockname())
        other.listen()
        others.append(other)
        ports.append(other.getsockname()[1])
        return listener

    monkeypatch.setattr(server_module, "bind", bind_then_lose_the_race)
    try:
        assert main(["serve", str(run), "--port", "0"]) == 2
    finally:
        for other in others:
            other.close()
    (port,) = ports
    assert_one_error_line(capsys, f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another")


def read_line(stream, timeout_s: float) -> str:
    """The next line of a child's pipe, or "" if none comes within timeout_s (instead of blocking)."""
    readable, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if readable else ""


def test_startup_line_gives_the_url_and_the_real_port(run):
    command = [sys.executable, "-m", "tformer.cli.main", "serve", str(run), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(process.stderr, timeout_s=60)
        pattern = rf"serving {re.escape(str(run))} on (http://127\.0\.0\.1:(\d+)) "
        pattern += r"\(POST /translate, GET /health, GET /ready, /docs; Ctrl-C to stop\)\n"
        match = re.fullmatch(pattern, line)
        assert match is not None and int(match[2]) > 0, line
        assert httpx.get(f"{match[1]}/health").json()["status"] == "ok"  # ready when the line is printed
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


HELD_SERVER = """
import sys, threading, time
from pathlib import Path
import tformer.serving.batcher as batcher_module
from tformer.cli.main import program

class Held(batcher_module.Translator):  # each decoding call takes 3 s, and says when it starts
    def translate(self, lines):
        Path(sys.argv[1]).touch()
        time.sleep(3)
        return super().translate(lines)

batcher_module.Translator = Held
program(["serve", *sys.argv[2:]])
"""


def test_a_second_ctrl_c_exits_after_the_window_under_way_without_a_traceback(run, tmp_path):
    """A second Ctrl-C (uvicorn's forced exit) skipped the app's shutdown: the lifespan, cancelled as the event
    loop closed, logged the traceback of a CancelledError. The server now drops the requests still queued
    (a 503 each), finishes the window under way (a thread cannot be stopped) and exits with status 0."""
    started = tmp_path / "decoding"
    command = [sys.executable, "-c", HELD_SERVER, str(started), str(run), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    answers: dict[str, httpx.Response] = {}
    try:
        url = re.search(r"on (http://\S+) ", read_line(process.stderr, timeout_s=60))[1]

        def post(name: str, body: dict) -> None:
            answers[name] = httpx.post(f"{url}/translate", json=body, timeout=30)

        decoding = threading.Thread(target=post, args=("decoding", {"sentences": [SENTENCES[0]]}))
        decoding.start()
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the first request was never decoded"
            time.sleep(0.02)
        queued = threading.Thread(target=post, args=("queued", {"sentences": [SENTENCES[1]]}))
        queued.start()
        while httpx.get(f"{url}/health").json()["pending"] < 1:
            assert time.monotonic() < deadline, "the second request never waited"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=30)
        decoding.join(timeout=30)
        queued.join(timeout=30)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert status == 0
    assert answers["decoding"].status_code == 200
    assert answers["queued"].status_code == 503
    assert answers["queued"].json() == {"error": "the server shut down before this request was decoded"}


def http_answer(connection: socket.socket) -> bytes:
    """Everything the server sends on `connection` until it closes it."""
    connection.settimeout(30)
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


def test_a_body_still_arriving_when_the_graceful_timeout_runs_out_gets_a_json_503_without_a_traceback(run):
    """A client that sent its headers and half its body held the shutdown for --graceful-timeout; then uvicorn
    cancelled the request as it waited for the rest, which logged "Exception in ASGI application" with the
    traceback of a CancelledError and closed the connection without an answer. A request answered meanwhile
    logs nothing either (its wait for a disconnect is cancelled once it has its answer)."""
    with server_process(run, options=["--graceful-timeout", "0.5"]) as (url, process):
        body, json_type = b'{"sentences": ["hello dog"]}', {"content-type": "application/json"}
        head = "POST /translate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}"
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as connection:
            connection.sendall(head.encode() + b"\r\n\r\n" + body[:10])
            time.sleep(0.3)  # the request reaches the app and waits for the rest of its body
            assert httpx.post(f"{url}/translate", content=body, headers=json_type).status_code == 200
            process.send_signal(signal.SIGTERM)
            answer = http_answer(connection)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        log = process.stdout.read()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", answer
    assert rest.endswith(b'{"error":"the server shut down before this request\'s body was received"}'), answer
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


SHORT_HEAD_TIMEOUT_SERVER = """
import sys
import tformer.serving.server as server_module
from tformer.cli.main import program

server_module.REQUEST_HEAD_TIMEOUT_S = 0.5
program(["serve", *sys.argv[1:]])
"""


def test_a_connection_that_sends_no_whole_request_head_in_time_is_closed(run):
    """uvicorn has no time limit on a request's line and headers: a connection that sent nothing, headers a
    byte at a time (slowloris) or, after one answer, the first bytes of a next request was held open for
    ever (enough of them use up the server's file descriptors). Each is now closed; a request whose head is
    complete is answered, also on a kept-alive connection and when pipelined."""
    command = [sys.executable, "-c", SHORT_HEAD_TIMEOUT_SERVER, str(run), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+) ", read_line(process.stderr, timeout_s=60))[1])
        health = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
        connections = {name: socket.create_connection(("127.0.0.1", port)) for name in ("idle", "partial", "next")}
        connections["partial"].sendall(b"POST /translate HTTP/1.1\r\nHo")
        connections["next"].sendall(health + health)  # pipelined: both answered
        connections["next"].settimeout(30)
        answers = b""
        while answers.count(b"HTTP/1.1 200 OK") < 2:
            answers += connections["next"].recv(65536)
        connections["next"].sendall(b"GET /hea")  # then the start of a third request, never finished
        for name, connection in connections.items():
            with connection:
                rest = http_answer(connection)  # what comes until the server closes the connection
                assert b"HTTP/1.1" not in rest and (name == "next" or rest == b""), (name, rest)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
        log = process.stderr.read()
        process.stderr.close()
    assert "Traceback" not in log, log


def test_sentences_at_every_limit_fit_the_body_limit_however_json_escapes_them(run):
    """4 sentences of 80 emoji are within --max-sentences and --max-chars; json.dumps escapes each emoji as
    a 12-byte surrogate pair, which the body limit must allow (it allowed 8 bytes per character)."""
    import json

    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    config = ServeConfig(max_sentences=4, max_chars=80)
    body = json.dumps({"sentences": ["\U0001f600" * 80] * 4}).encode()
    assert len(body) > 4 * 80 * 8
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=config)
    with TestClient(app) as client:
        response = client.post("/translate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_a_failure_while_decoding_is_a_json_500_logged_with_its_traceback_and_the_server_goes_on(
    run, monkeypatch, caplog
):
    """The 500 was the only trace of a failure: the server's log said nothing, so an operator could not
    tell what failed nor where. It now logs the traceback."""
    import logging

    from fastapi.testclient import TestClient

    import tformer.serving.batcher as batcher_module
    from tformer.serving import ServeConfig, create_app

    class FailingOnBoom(batcher_module.Translator):
        def translate(self, lines):
            if any("boom" in line for line in lines):
                raise RuntimeError("simulated failure\nwith a second line")
            return super().translate(lines)

    monkeypatch.setattr(batcher_module, "Translator", FailingOnBoom)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        failed = client.post("/translate", json={"sentences": ["boom"]})
        fine = client.post("/translate", json={"sentences": [SENTENCES[0]]})
    assert failed.status_code == 500
    assert failed.json() == {"error": "decoding failed: RuntimeError: simulated failure"}
    assert fine.status_code == 200
    (record,) = [record for record in caplog.records if record.name.startswith("tformer.serving")]
    assert record.getMessage() == "decoding failed (a request of 1 sentences)"
    assert "simulated failure" in caplog.text and "in translate" in caplog.text  # the traceback, to its frame


def test_nan_scores_are_a_json_500_that_says_why_and_is_logged(run, caplog):
    """NaN weights (or bfloat16 arithmetic) left beam search without a hypothesis, and the response indexed the
    empty n-best list: "decoding failed: IndexError: list index out of range", which said nothing of why."""
    import logging

    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.fill_(float("nan"))
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        failed = client.post("/translate", json={"sentences": [SENTENCES[0]], "beam": 2})
    assert failed.status_code == 500
    assert failed.json()["error"].startswith("decoding failed: the model's scores are NaN (not a number)")
    assert "its weights hold NaN" in caplog.text


def test_an_unexpected_error_outside_decoding_is_a_json_500_and_the_server_goes_on(run):
    """An error before decoding (here the tokenizer failing) reached Starlette, whose answer was a plain-text
    "Internal Server Error", not the API's JSON."""
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)

    class Failing:
        def __getattr__(self, name):
            return getattr(loaded.tokenizer, name)

        def encode_source(self, text):
            if "boom" in text:
                raise KeyError("simulated")
            return loaded.tokenizer.encode_source(text)

    app = create_app(loaded.model, Failing(), loaded.experiment.decode, config=ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as client:
        failed = client.post("/translate", json={"sentences": ["boom"]})
        fine = client.post("/translate", json={"sentences": [SENTENCES[0]]})
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal error (KeyError); see the server's log"}
    assert fine.status_code == 200


class Held:
    """A Translator stand-in for batcher.py that holds the worker in `translate` until `release` is set."""

    def __init__(self, monkeypatch):
        import tformer.serving.batcher as batcher_module

        self.decoding, self.release = threading.Event(), threading.Event()
        self.lines: list[str] = []  # every line decoded, in order
        held = self

        class Slow(batcher_module.Translator):
            def translate(self, lines):
                held.lines.extend(lines)
                held.decoding.set()
                held.release.wait(30)
                return super().translate(lines)

        monkeypatch.setattr(batcher_module, "Translator", Slow)


async def until(condition, timeout_s: float = 10.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_request_beyond_max_queue_gets_a_json_503_with_retry_after(run, monkeypatch):
    """The queue had no bound: under overload requests piled up without limit instead of being refused."""
    import asyncio

    from tformer.serving import ServeConfig, create_app

    held = Held(monkeypatch)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig(max_queue=1))
    body = {"sentences": [SENTENCES[0]]}

    async def overload():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                decoding = asyncio.create_task(client.post("/translate", json=body))
                assert await asyncio.to_thread(held.decoding.wait, 30)
                waiting = asyncio.create_task(client.post("/translate", json=body))
                await until(lambda: app.state.batcher.pending == 1)
                refused = await client.post("/translate", json=body)
                held.release.set()
                return refused, await decoding, await waiting

    refused, decoded, waited = asyncio.run(overload())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "the server is busy (1 requests waiting); retry shortly"}
    assert decoded.status_code == 200 and waited.status_code == 200


class AsgiRequest:
    """One POST /translate driven at the ASGI level, as uvicorn drives it: the body, then nothing until the
    client disconnects (`leave()`); what the app sends is kept in `sent`."""

    def __init__(self, body: dict) -> None:
        import asyncio
        import json

        self.body = json.dumps(body).encode()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/translate", "raw_path": b"/translate", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        self.sent: list[dict] = []
        self.left = asyncio.Event()
        self.body_sent = False

    def leave(self) -> None:
        self.left.set()

    async def receive(self) -> dict:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def __call__(self, app):
        return app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int:
        return next(message for message in self.sent if message["type"] == "http.response.start")["status"]

    def json(self) -> dict:
        import json

        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def test_a_request_whose_client_left_while_queued_is_not_decoded(run, monkeypatch):
    """The batcher decoded every queued job, also those whose client had gone away; such a job is now
    dropped before its window, and its request ends as soon as the client leaves."""
    import asyncio

    from tformer.serving import ServeConfig, create_app

    held = Held(monkeypatch)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    gone = AsgiRequest({"sentences": [SENTENCES[1]]})

    async def leave_while_queued():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                decoding = asyncio.create_task(client.post("/translate", json={"sentences": [SENTENCES[0]]}))
                assert await asyncio.to_thread(held.decoding.wait, 30)
                leaving = asyncio.create_task(gone(app))
                await until(lambda: app.state.batcher.pending == 1)
                gone.leave()
                await asyncio.wait_for(leaving, 5)  # ends while the worker is still held
                assert app.state.batcher.pending == 0  # its job no longer counts against --max-queue
                held.release.set()
                staying = await client.post("/translate", json={"sentences": [SENTENCES[2]]})
                return await decoding, staying

    decoded, staying = asyncio.run(leave_while_queued())
    assert decoded.status_code == 200 and staying.status_code == 200
    assert held.lines == [SENTENCES[0], SENTENCES[2]]  # never SENTENCES[1]
    assert gone.status == 499 and "closed the connection" in gone.json()["error"]


def test_a_request_whose_client_left_after_its_window_started_is_not_decoded_if_its_call_had_not(run, monkeypatch):
    """A window's jobs were all decoded, also one whose client had gone while an earlier call of the window
    (other settings, cheaper) was decoding; such a job is now skipped when its own call comes."""
    import asyncio

    from tformer.serving import ServeConfig, create_app

    held = Held(monkeypatch)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig(max_wait_ms=500))
    gone = AsgiRequest({"sentences": [SENTENCES[2]], "beam": 2})  # costlier: decoded after the other

    async def leave_while_the_window_decodes():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                decoding = asyncio.create_task(client.post("/translate", json={"sentences": [SENTENCES[3]], "beam": 1}))
                leaving = asyncio.create_task(gone(app))
                await until(lambda: app.state.batcher.pending == 2)  # both in the window, still collecting
                assert await asyncio.to_thread(held.decoding.wait, 30)
                assert app.state.batcher.pending == 0  # the window under way holds both
                gone.leave()
                await asyncio.wait_for(leaving, 5)
                held.release.set()
                return await decoding

    decoded = asyncio.run(leave_while_the_window_decodes())
    assert decoded.status_code == 200 and gone.status == 499
    assert held.lines == [SENTENCES[3]]  # never SENTENCES[2]
    assert app.state.batcher.windows == 1


def test_a_request_cancelled_by_the_shutdown_gets_a_json_503(run, monkeypatch):
    """When --graceful-timeout runs out, uvicorn cancels the requests still decoding; the cancellation used
    to reach uvicorn, whose answer was a plain-text 500. Driven here at the ASGI level as uvicorn does it."""
    import asyncio

    from tformer.serving import ServeConfig, create_app

    held = Held(monkeypatch)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    request = AsgiRequest({"sentences": [SENTENCES[0]]})

    async def shutdown_while_decoding():
        async with app.router.lifespan_context(app):
            task = asyncio.create_task(request(app))
            assert await asyncio.to_thread(held.decoding.wait, 30)
            task.cancel()  # what uvicorn does to each request in flight when --graceful-timeout runs out
            await task
            held.release.set()  # the decode in the worker thread ends; the lifespan's exit waits for it

    asyncio.run(shutdown_while_decoding())
    assert request.status == 503
    assert request.json() == {"error": "the server shut down before this request was decoded"}


@pytest.mark.parametrize(
    ("first", "then"),
    [
        # same settings: the small request arrived first; the large one joined its window 0.5 s later
        ("small", {"beam": None}),
        # other settings: the large request arrived first, and the small one was decoded after it
        ("large", {"beam": 1}),
    ],
)
def test_a_small_request_is_answered_without_waiting_for_a_large_one_in_its_window(run, monkeypatch, first, then):
    """A window's requests were all answered when the whole window was decoded: a one-sentence request that
    shared its window with a large one (0.08 s alone, 64 sentences at beam 8 beside it) took the large one's
    0.55 s. The cheaper work of a window is now decoded first and each request answered as soon as its own
    sentences are. Here the large request's decoding is held until the small one has its answer."""
    import asyncio

    import tformer.serving.batcher as batcher_module
    from tformer.serving import ServeConfig, create_app

    large_lines = [f"{sentence} {sentence}" for sentence in SENTENCES]  # 10 to 30 tokens each
    release = threading.Event()

    class HoldingLarge(batcher_module.Translator):
        def translate(self, lines):
            lines = list(lines)
            if set(lines) & set(large_lines):
                release.wait(30)
            return super().translate(lines)

    monkeypatch.setattr(batcher_module, "Translator", HoldingLarge)
    loaded = load_run(run)
    config = ServeConfig(max_wait_ms=500, max_batch_tokens=40, max_decode_tokens=10**6)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=config)
    small = {"sentences": [SENTENCES[1]], **{k: v for k, v in then.items() if v is not None}}
    large = {"sentences": large_lines[:2] if first == "large" else large_lines}

    async def together():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                bodies = [small, large] if first == "small" else [large, small]
                first_post = asyncio.create_task(client.post("/translate", json=bodies[0]))
                await asyncio.sleep(0.05)
                second_post = asyncio.create_task(client.post("/translate", json=bodies[1]))
                small_post = first_post if first == "small" else second_post
                try:
                    small_answer = await asyncio.wait_for(asyncio.shield(small_post), 10)
                    windows = app.state.batcher.windows
                finally:
                    release.set()
                large_answer = await (second_post if first == "small" else first_post)
                return small_answer, large_answer, windows

    small_answer, large_answer, windows = asyncio.run(together())
    assert windows == 0  # answered while its window, shared with the large request, was still decoding
    assert small_answer.status_code == 200 and large_answer.status_code == 200
    for body, answer in ((small, small_answer), (large, large_answer)):
        expected = offline(loaded, body)
        got = answer.json()["translations"]
        assert [[c["text"] for c in t["nbest"]] for t in got] == [[text for text, _ in n] for n in expected]
        scores = [c["score"] for t in got for c in t["nbest"]]
        assert scores == pytest.approx([score for n in expected for _, score in n], abs=1e-5)  # padding's rounding


def test_a_failure_around_a_window_is_that_windows_500_and_the_next_request_is_served(run, monkeypatch):
    """An error outside the per-settings decoding (here the whole window's `_decode`) ended the scheduler,
    and every later request waited forever while /health and /ready still said 200."""
    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app
    from tformer.serving.batcher import Batcher

    decode = Batcher._decode
    calls = []

    def failing_once(self, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("simulated window failure")
        return decode(self, jobs)

    monkeypatch.setattr(Batcher, "_decode", failing_once)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as client:
        failed = client.post("/translate", json={"sentences": [SENTENCES[0]]})
        fine = client.post("/translate", json={"sentences": [SENTENCES[0]]})
        ready = client.get("/ready")
    assert failed.status_code == 500 and "simulated window failure" in failed.json()["error"]
    assert fine.status_code == 200 and ready.status_code == 200


def test_a_dead_scheduler_answers_its_waiting_jobs_and_makes_the_server_not_ready(run, monkeypatch, caplog):
    """If the scheduler itself ends on an error, its requests get a 503 saying so (not an endless wait),
    the error is logged, /ready turns 503 for the load balancer, and shutdown still completes."""
    import logging

    from fastapi.testclient import TestClient

    from tformer.serving import ServeConfig, create_app
    from tformer.serving.batcher import Batcher

    async def broken_collect(self, first):
        raise RuntimeError("simulated scheduler bug")

    monkeypatch.setattr(Batcher, "_collect", broken_collect)
    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        first = client.post("/translate", json={"sentences": [SENTENCES[0]]})
        later = client.post("/translate", json={"sentences": [SENTENCES[0]]})
        ready = client.get("/ready")
        health = client.head("/health")
    expected = {"error": "the server's batcher stopped after an internal error; restart the server"}
    assert first.status_code == 503 and first.json() == expected
    assert later.status_code == 503 and later.json() == expected
    assert ready.status_code == 503 and "restart the server" in ready.json()["error"]
    assert health.status_code == 200  # liveness: the process answers
    assert "simulated scheduler bug" in caplog.text


def test_probes_answer_head_as_well_as_get(server):
    """Some load balancers probe with HEAD, which was a 405."""
    url, _ = server
    for path in ("/health", "/ready"):
        response = httpx.head(url + path, timeout=10)
        assert response.status_code == 200 and response.content == b""


def test_the_api_s_routes_methods_documentation_and_405s_are_those_documented(run):
    """Pins what the other tests leave open: the routes with their methods, summaries, descriptions and
    documented error statuses in the OpenAPI schema, the app's title, the /health body, and a wrong
    method's JSON 405 with its Allow header."""
    from fastapi.testclient import TestClient

    from tformer import __version__
    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    app = create_app(loaded.model, loaded.tokenizer, loaded.experiment.decode, config=ServeConfig(), name="pinned")
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        health = client.get("/health")
        wrong_method = client.get("/translate")
        wrong_probe_method = client.put("/ready")
    assert schema["info"] == {
        "title": "tformer translation",
        "description": "Translate sentences with a tformer model; concurrent requests are decoded together.",
        "version": __version__,
    }
    operations = {
        (path, method): (operation["summary"], operation["description"].split("\n")[0], sorted(operation["responses"]))
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }
    health_doc = (
        "Health",
        "Liveness and load: the model's name, device and dtype, the jobs waiting and the windows decoded so far.",
    )
    ready_doc = (
        "Ready",
        "Readiness, for a load balancer: 200 once the model is loaded and the batcher takes requests,",
    )
    assert operations == {
        ("/health", "get"): (*health_doc, ["200"]),
        ("/health", "head"): (*health_doc, ["200"]),
        ("/ready", "get"): (*ready_doc, ["200", "503"]),
        ("/ready", "head"): (*ready_doc, ["200", "503"]),
        ("/translate", "post"): (
            "Translate",
            "Translate every sentence; the response lists them in request order.",
            ["200", "400", "413", "415", "422", "500", "503"],
        ),
    }
    translate_errors = schema["paths"]["/translate"]["post"]["responses"]
    assert translate_errors["415"] == {
        "description": "the body is not sent as JSON (content-type: application/json), or is sent compressed"
    }
    assert schema["paths"]["/ready"]["get"]["responses"]["503"] == {
        "description": "not ready: starting or shutting down"
    }
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": "pinned",
        "device": "cpu",
        "dtype": "float32",
        "pending": 0,
        "windows": 0,
    }
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "GET /translate: method not allowed; use POST"}
    assert wrong_probe_method.status_code == 405  # Starlette lists the methods of a set, in any order
    assert sorted(wrong_probe_method.headers["allow"].split(", ")) == ["GET", "HEAD"]


def test_a_request_sharing_a_call_with_one_too_large_for_the_memory_is_still_decoded(run, monkeypatch):
    """The memory check ran once per Translator call, on the longest sentence of all the requests sharing
    it: a one-word request that waited with a long sentence at the same beam got the long one's 422, though
    alone it was decoded. The check is now made for each request before it is queued."""
    import asyncio

    from test_decoding_memory import fake_memory

    from tformer.decoding.memory import decoding_bytes
    from tformer.serving import ServeConfig, create_app

    loaded = load_run(run)
    decode = loaded.experiment.decode
    short, long = [SENTENCES[3]], [SENTENCES[2]]
    length = len(loaded.tokenizer.encode_source(long[0])) + 1  # + eos
    # decoding may use one byte less than the long sentence needs at the run's beam; the short one fits
    fake_memory(monkeypatch, 2 * (decoding_bytes(loaded.model, decode, source_length=length) - 1))
    app = create_app(loaded.model, loaded.tokenizer, decode, config=ServeConfig(max_wait_ms=500))

    async def together():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                posts = (client.post("/translate", json={"sentences": sentences}) for sentences in (short, long))
                return await asyncio.gather(*posts)

    small, large = asyncio.run(together())
    assert large.status_code == 422 and "use a smaller beam" in large.json()["error"]
    assert small.status_code == 200, small.json()
    expected = Translator(loaded.model, loaded.tokenizer, decode).translate(short)
    assert [t["text"] for t in small.json()["translations"]] == [nbest[0].text for nbest in expected]
