"""The HTTP API: `POST /translate`, `GET /health` (liveness), `GET /ready` (readiness), docs at /docs.

Every user error is a 4xx with one JSON field, `error`, holding one line: malformed JSON (or not UTF-8)
400, a body not sent as JSON 415, a body of the wrong shape or impossible decode settings 422, too many
sentences, a sentence too long (in characters or in tokens), a body too large or a worst-case decode over
`max_decode_tokens` 413; 503 while shutting down, and 503 with `Retry-After` when `max_queue` requests
are waiting already. A request whose client disconnects before its decoding window starts is dropped from
the queue (its answer, 499, goes nowhere). An unexpected failure while decoding is a 500 for the requests
of that window only; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tformer import __version__
from tformer.config import DecodeConfig
from tformer.decoding.constraints import check_banned_ids
from tformer.decoding.lengths import max_output_lengths
from tformer.decoding.pipeline import TokenizerLike
from tformer.serving.batcher import BATCHER_FAILED, Batcher, BatcherBusyError, BatcherClosedError
from tformer.serving.body_limit import BodySizeLimit


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Limits on what one request may ask, and the batching window."""

    max_sentences: int = 64
    max_chars: int = 1000
    max_beam: int = 8
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_decode_tokens: int = 65536

    def __post_init__(self) -> None:
        # each limit is also the `tformer serve` flag of the same name
        for name in ("max_sentences", "max_chars", "max_beam", "max_batch_tokens", "max_queue", "max_decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms < math.inf:  # written so that NaN fails too; inf: no window would ever close
            raise ValueError(f"max_wait_ms (--max-wait-ms) must be >= 0 and finite, got {self.max_wait_ms}")

    @property
    def max_body_bytes(self) -> int:
        """Room for max_sentences sentences of max_chars characters at their longest in JSON (12 bytes: a
        character outside the Basic Multilingual Plane escaped as a surrogate pair, "\\ud83d\\ude00", as
        Python's json.dumps writes emoji by default), quotes and commas, and the options."""
        return self.max_sentences * (self.max_chars * 12 + 8) + 4096


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sentences: list[str] = Field(description="the sentences to translate, one string each")
    # strict: pydantic would otherwise read true as 1 and "2" as 2, hiding a client's mistake
    beam: int | None = Field(
        None, ge=1, strict=True, description="beam size (1: greedy); default: the run's, at most the server's limit"
    )
    nbest: int | None = Field(None, ge=1, strict=True, description="translations returned per sentence (at most beam)")
    max_length: int | None = Field(None, ge=1, strict=True, description="at most this many output tokens per sentence")


class Candidate(BaseModel):
    text: str
    score: float


class SentenceTranslation(BaseModel):
    text: str = Field(description="the best translation")
    score: float = Field(description="its score: log-probability over the length penalty")
    nbest: list[Candidate] = Field(description="the n best, best first (the first is `text`)")


class TranslateResponse(BaseModel):
    translations: list[SentenceTranslation]


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


T = TypeVar("T")
log = logging.getLogger(__name__)  # on stderr in `tformer serve`, through logging's last-resort handler
RETRY_AFTER_S = 1  # what a busy server asks a client (or a load balancer) to wait before trying again


def create_app(
    model: Any,
    tokenizer: TokenizerLike,
    decode: DecodeConfig,
    *,
    config: ServeConfig | None = None,
    device: str | torch.device = "cpu",
    name: str = "tformer",
) -> FastAPI:
    """A FastAPI app serving `model`; its lifespan starts and stops the batcher."""
    config = config or ServeConfig()
    check_banned_ids(decode, model.config.tgt_vocab_size)  # refused now, not by every request
    batcher = Batcher(
        model,
        tokenizer,
        device=device,
        max_batch_tokens=config.max_batch_tokens,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
    )
    max_positions = model.config.max_positions

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()  # after the server stopped taking requests: in-flight ones finish first

    app = FastAPI(
        title="tformer translation",
        version=__version__,
        description="Translate sentences with a tformer model; concurrent requests are decoded together.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
        for problem in problems:
            if tuple(problem.get("loc", ())) == ("body",):  # the body as a whole, not one of its fields
                status, message = _whole_body_problem(problem, request.headers.get("content-type"))
                return JSONResponse({"error": message}, status_code=status)
        parts = []
        for problem in problems[:3]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (404, 405, a body over the limit) in the API's one-field format."""
        message = _unreadable_body(error.__cause__) if error.status_code == 400 else None
        detail = message or str(error.detail)
        return JSONResponse({"error": detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """A bug outside decoding (whose failures are caught in `translate`): Starlette answered a plain-text
        "Internal Server Error". Starlette re-raises the error after this answer, so uvicorn logs it."""
        return JSONResponse(
            {"error": f"internal error ({type(error).__name__}); see the server's log"}, status_code=500
        )

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some load balancers probe with
    async def health() -> dict[str, Any]:
        """Liveness and load: the model's name, the jobs waiting and the windows decoded so far."""
        return {"status": "ok", "model": name, "pending": batcher.pending, "windows": batcher.windows}

    @app.api_route(
        "/ready", methods=["GET", "HEAD"], responses={503: {"description": "not ready: starting or shutting down"}}
    )
    async def ready() -> dict[str, str]:
        """Readiness, for a load balancer: 200 once the model is loaded and the batcher takes requests,
        503 before that and while shutting down (/health is liveness: 200 whenever the process answers)."""
        if batcher.failed:
            raise ApiError(503, f"not ready: {BATCHER_FAILED}")
        if not batcher.accepting:
            raise ApiError(503, "not ready: the server is starting or shutting down")
        return {"status": "ready"}

    @app.post(
        "/translate",
        response_model=TranslateResponse,
        responses={status: {"description": text} for status, text in _ERRORS.items()},
    )
    async def translate(request: TranslateRequest, http: Request) -> TranslateResponse:
        """Translate every sentence; the response lists them in request order."""
        _check_limits(request.sentences, config)
        settings = _decode_config(decode, request, config, max_positions)
        lengths = []
        for index, sentence in enumerate(request.sentences):
            length = len(tokenizer.encode_source(sentence)) + 1  # + eos
            if length > max_positions:
                raise ApiError(413, f"sentence {index} has {length} tokens; the model accepts at most {max_positions}")
            lengths.append(length)
        _check_decode_budget(lengths, settings, config, max_positions)
        n_tokens = sum(lengths)
        try:
            work = batcher.translate(request.sentences, settings, n_tokens=n_tokens)
            results = await _unless_client_leaves(work, http.receive)
        except ClientGoneError:
            raise ApiError(499, "the client closed the connection before its request was decoded") from None
        except BatcherClosedError as error:
            raise ApiError(503, str(error)) from None
        except BatcherBusyError as error:
            raise ApiError(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --graceful-timeout runs out; uncaught, the
            # cancellation reached uvicorn, which answered with a plain-text 500. The API's 503 instead.
            raise ApiError(503, "the server shut down before this request was decoded") from None
        except ValueError as error:  # a DecodingError: the request cannot be decoded as asked
            raise ApiError(422, str(error).splitlines()[0]) from None
        except Exception as error:  # a failure while decoding (out of memory, a bug): still the API's format
            reason = str(error).splitlines()[0] if str(error) else ""
            # the client gets one line; the operator, who saw nothing at all before, the traceback
            log.error("decoding failed (a request of %d sentences)", len(request.sentences), exc_info=error)
            raise ApiError(500, f"decoding failed: {type(error).__name__}: {reason}") from None
        return TranslateResponse(
            translations=[
                SentenceTranslation(
                    text=nbest[0].text,
                    score=nbest[0].score,
                    nbest=[Candidate(text=t.text, score=t.score) for t in nbest],
                )
                for nbest in results
            ]
        )

    return app


_ERRORS = {
    400: "the body is not valid JSON, or not UTF-8",
    413: "too many sentences, a sentence too long, a body too large, or a worst case over --max-decode-tokens",
    415: "the body is not sent as JSON (content-type: application/json)",
    422: "a body of the wrong shape, text that is not valid Unicode, or decode settings that cannot be honoured",
    500: "decoding failed (the requests decoded with the same settings in that window get it too)",
    503: "the server is shutting down, or busy: --max-queue requests waiting (with Retry-After)",
}


EXAMPLE_BODY = '{"sentences": ["..."]}'


def _whole_body_problem(problem: dict[str, Any], content_type: str | None) -> tuple[int, str]:
    """Status and message for a body that is not a JSON object: pydantic's "body: Input should be a valid
    dictionary or object to extract fields from" did not tell `curl -d` users (whose body goes as a form)
    to add the JSON content type, nor a client sending a list what to send instead."""
    value = problem.get("input")
    if isinstance(value, bytes):  # FastAPI parses JSON only under a JSON content type; it passed the bytes on
        got = f"content-type: {content_type}" if content_type else "no content-type"
        return 415, f"send the body as JSON with the header content-type: application/json (got {got})"
    if problem.get("type") == "missing":
        return 422, f"the request body is empty; send a JSON object such as {EXAMPLE_BODY}"
    kinds = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
    }
    kind = kinds.get(type(value), "not an object")
    return 422, f"the request body must be a JSON object such as {EXAMPLE_BODY}, not {kind}"


def _unreadable_body(cause: BaseException | None) -> str | None:
    """What is wrong with a body that FastAPI could not parse as JSON for a reason other than its syntax
    (it answers all of them "There was an error parsing the body"); None for a cause not known here."""
    if isinstance(cause, UnicodeDecodeError):  # json.loads reads bytes as UTF-8 (or UTF-16/32 by their BOM)
        byte = cause.object[cause.start]
        encoding = cause.encoding.upper()
        return (
            f"the request body is not valid {encoding}: byte 0x{byte:02X} at offset {cause.start} "
            f"({cause.reason}); send the JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON for this API: it is nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"the request body holds a number of over {sys.get_int_max_str_digits()} digits; send small integers"
    return None


class ClientGoneError(Exception):
    """The client disconnected while its request waited."""


async def _unless_client_leaves(work: Awaitable[T], receive: Callable[[], Awaitable[dict]]) -> T:
    """`work`'s result, or ClientGoneError once the client disconnects first: `work` is then cancelled, which
    drops its job from the queue, so that a request nobody waits for any more is not decoded."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this request was cancelled itself (the shutdown's --graceful-timeout)
        job.cancel()
        raise
    finally:
        gone.cancel()
    if not job.done():
        job.cancel()
        raise ClientGoneError
    return job.result()


async def _disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client disconnects: once the body is read, the server's next message is that."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _check_limits(sentences: list[str], config: ServeConfig) -> None:
    if not sentences:
        raise ApiError(422, "sentences: give at least one sentence")
    if len(sentences) > config.max_sentences:
        raise ApiError(413, f"{len(sentences)} sentences in one request; the limit is {config.max_sentences}")
    for index, sentence in enumerate(sentences):
        if len(sentence) > config.max_chars:
            raise ApiError(413, f"sentence {index} has {len(sentence)} characters; the limit is {config.max_chars}")
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError as error:  # valid JSON ("\ud800") but not text: a lone surrogate
            code = ord(sentence[error.start])
            message = f"sentence {index} holds an unpaired surrogate (U+{code:04X}); send valid Unicode"
            raise ApiError(422, message) from None


def _check_decode_budget(src_lengths: list[int], settings: DecodeConfig, config: ServeConfig, limit: int) -> None:
    """Refuse a request whose worst case (every hypothesis of every sentence reaching its maximum length)
    would hold the one decoding worker, and every other client, for too long."""
    max_lengths = max_output_lengths(torch.tensor(src_lengths), settings, limit=limit)
    if settings.sampling:  # nbest samples of each sentence
        paths, per_sentence, fewer = settings.nbest, f"{settings.nbest} samples", "fewer samples (nbest)"
    else:
        paths, per_sentence, fewer = settings.beam_size, f"beam {settings.beam_size}", "a smaller beam"
    worst = paths * int(max_lengths.sum())
    if worst > config.max_decode_tokens:
        raise ApiError(
            413,
            f"this request may decode up to {worst} tokens ({len(src_lengths)} sentences x {per_sentence} "
            f"x up to {int(max_lengths.max())} output tokens); the limit is {config.max_decode_tokens} "
            f"(--max-decode-tokens): send fewer sentences, {fewer} or a max_length",
        )


def _decode_config(base: DecodeConfig, request: TranslateRequest, config: ServeConfig, limit: int) -> DecodeConfig:
    """The run's decode settings with the request's beam, nbest and max_length applied."""
    beam = _beam(base, request, config)
    changes: dict[str, Any] = {"beam_size": beam, "nbest": base.nbest if base.sampling else min(base.nbest, beam)}
    if request.nbest is not None:
        # a sampling server draws nbest samples, whatever the beam; DecodeConfig's own message names beam_size
        if request.nbest > beam and not base.sampling:
            where = "the request's" if request.beam is not None else "the server's"
            raise ApiError(422, f"nbest: at most beam ({beam}, {where}), got {request.nbest}; send a larger beam")
        changes["nbest"] = request.nbest
    if request.max_length is not None:
        if request.max_length > limit:
            raise ApiError(422, f"max_length: at most {limit} (the model's max_positions), got {request.max_length}")
        changes.update(max_len_a=0.0, max_len_b=request.max_length)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as error:  # e.g. nbest > beam_size
        raise ApiError(422, str(error).splitlines()[0]) from None


def _beam(base: DecodeConfig, request: TranslateRequest, config: ServeConfig) -> int:
    """The request's beam, else the run's capped at max_beam: the limit bounds the decoding cost of every
    request, including those that leave the beam to the server."""
    if request.beam is None:
        return min(base.beam_size, config.max_beam)
    if request.beam > config.max_beam:
        raise ApiError(422, f"beam: at most {config.max_beam}, got {request.beam}")
    return request.beam
