"""The HTTP API: `POST /translate`, `GET /health` (liveness), `GET /ready` (readiness), docs at /docs.

Every user error is a 4xx with one JSON field, `error`, holding one line: malformed JSON (or not UTF-8)
400, a body not sent as JSON or sent compressed 415, a body of the wrong shape or impossible decode
settings 422, too many sentences, a sentence too long (in characters or in tokens), a body too large or
a worst-case decode over `max_decode_tokens` 413; 503 while shutting down, and 503 with `Retry-After`
when `max_queue` requests are waiting already. A request whose client disconnects before its decoding
call starts is not decoded (its answer, 499, goes nowhere). An unexpected failure while
decoding is a 500 for the requests of that window only; the server keeps serving.

The request checks and their limits are in `limits.py`, the error format in `errors.py`, the bodies in
`schema.py`; this module wires them into routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tformer import __version__
from tformer.config import DecodeConfig
from tformer.decoding.constraints import check_banned_ids
from tformer.decoding.memory import SearchTooLargeError
from tformer.decoding.pipeline import NotANumberError, TokenizerLike, Translation
from tformer.serving.batcher import BATCHER_FAILED, Batcher, BatcherBusyError, BatcherClosedError
from tformer.serving.body_limit import BodySizeLimit
from tformer.serving.content_encoding import IdentityEncodingOnly
from tformer.serving.errors import ERRORS, ApiError, add_error_handlers, shown
from tformer.serving.limits import (
    ServeConfig,
    check_decode_budget,
    check_limits,
    check_memory,
    decode_config,
    source_lengths,
)
from tformer.serving.schema import Candidate, SentenceTranslation, TranslateRequest, TranslateResponse

T = TypeVar("T")
log = logging.getLogger(__name__)  # on stderr in `tformer serve`, through logging's last-resort handler
RETRY_AFTER_S = 1  # what a busy server asks a client (or a load balancer) to wait before trying again
SHUT_DOWN = "the server shut down before this request was decoded"


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
    app = FastAPI(
        title="tformer translation",
        version=__version__,
        description="Translate sentences with a tformer model; concurrent requests are decoded together.",
        lifespan=_lifespan(batcher),
        redirect_slashes=False,  # `POST /translate/` is a 404 saying what to send (errors.py), not a 307
    )
    app.state.batcher = batcher
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(IdentityEncodingOnly)
    _add_probes(app, batcher, name=name)
    _add_translate(app, batcher, tokenizer, decode, config, max_positions=model.config.max_positions)
    return app


def _lifespan(batcher: Batcher) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()  # after the server stopped taking requests: in-flight ones finish first

    return lifespan


def _add_probes(app: FastAPI, batcher: Batcher, *, name: str) -> None:
    """`/health` and `/ready`, for people and load balancers."""

    weights = next(batcher.model.parameters())
    where = {"device": str(weights.device), "dtype": str(weights.dtype).removeprefix("torch.")}  # fixed at start

    async def health() -> dict[str, Any]:
        """Liveness and load: the model's name, device and dtype, the jobs waiting and the windows decoded so far."""
        return {"status": "ok", "model": name, **where, "pending": batcher.pending, "windows": batcher.windows}

    async def ready() -> dict[str, str]:
        """Readiness, for a load balancer: 200 once the model is loaded and the batcher takes requests,
        503 before that and while shutting down (/health is liveness: 200 whenever the process answers)."""
        if batcher.failed:
            raise ApiError(503, f"not ready: {BATCHER_FAILED}")
        if not batcher.accepting:
            raise ApiError(503, "not ready: the server is starting or shutting down")
        return {"status": "ready"}

    _add_probe(app, "/health", health)
    _add_probe(app, "/ready", ready, responses={503: {"description": "not ready: starting or shutting down"}})


PROBE_METHODS = ("GET", "HEAD")  # HEAD: what some load balancers probe with


class _ProbeRoute(APIRoute):
    """One method of a probe's path. Each method is a route of its own, so that each gets its own OpenAPI
    operation id (FastAPI gives a route one id, however many methods it answers: GET and HEAD in one
    route had the same id, and FastAPI warned "Duplicate Operation ID"). Starlette answers a method that
    no route of a path takes from the first of them, so this 405 lists every method of the path."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in PROBE_METHODS:
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(PROBE_METHODS)})
        await super().handle(scope, receive, send)


def _add_probe(app: FastAPI, path: str, endpoint: Callable, **options: Any) -> None:
    for method in PROBE_METHODS:
        app.router.add_api_route(path, endpoint, methods=[method], route_class_override=_ProbeRoute, **options)


def _add_translate(
    app: FastAPI,
    batcher: Batcher,
    tokenizer: TokenizerLike,
    decode: DecodeConfig,
    config: ServeConfig,
    *,
    max_positions: int,
) -> None:
    """`POST /translate`: the request checked against `config`, then decoded in the batcher's windows."""

    @app.post(
        "/translate",
        response_model=TranslateResponse,
        responses={status: {"description": text} for status, text in ERRORS.items()},
    )
    async def translate(request: TranslateRequest, http: Request) -> TranslateResponse:
        """Translate every sentence; the response lists them in request order."""
        if http.query_params:  # ignored, `?beam=5` left the client believing it had beam 5
            names = ", ".join(dict.fromkeys(http.query_params.keys()))
            got = f"got {shown(names)}"
            message = f"POST /translate reads no query parameters ({got}); send the options in the JSON body"
            raise ApiError(422, message)
        check_limits(request.sentences, config)
        settings = decode_config(decode, request, config, max_positions)
        lengths = source_lengths(request.sentences, tokenizer, max_positions)
        check_decode_budget(lengths, settings, config, max_positions)
        check_memory(lengths, settings, batcher.model, batcher.device)  # per request: not a call's longest
        work = batcher.translate(request.sentences, settings, n_tokens=sum(lengths))
        results = await _decoded(work, http, n_sentences=len(request.sentences))
        return _response(results)


async def _decoded(
    work: Awaitable[list[list[Translation]]], http: Request, *, n_sentences: int
) -> list[list[Translation]]:
    """`work`'s translations, or the ApiError that says why there are none."""
    try:
        return await _unless_client_leaves(work, http.receive)
    except ClientGoneError:
        raise ApiError(499, "the client closed the connection before its request was decoded") from None
    except BatcherClosedError as error:
        raise ApiError(503, str(error)) from None
    except BatcherBusyError as error:
        raise ApiError(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except asyncio.CancelledError:
        # uvicorn cancels the requests still running when --graceful-timeout runs out; uncaught, the
        # cancellation reached uvicorn, which answered with a plain-text 500. The API's 503 instead.
        raise ApiError(503, SHUT_DOWN) from None
    except SearchTooLargeError as error:  # named by the request's field, not translate's flag
        raise ApiError(422, error.named("nbest" if error.setting == "nbest" else "beam")) from None
    except NotANumberError as error:  # the model's fault, not the request's (whose line numbers it does not hold)
        log.error("decoding failed (a request of %d sentences): %s", n_sentences, error.reason)
        raise ApiError(500, f"decoding failed: {error.reason}") from None
    except ValueError as error:  # a DecodingError: the request cannot be decoded as asked
        raise ApiError(422, str(error).splitlines()[0]) from None
    except Exception as error:  # a failure while decoding (out of memory, a bug): still the API's format
        reason = str(error).splitlines()[0] if str(error) else ""
        # the client gets one line; the operator, who saw nothing at all before, the traceback
        log.error("decoding failed (a request of %d sentences)", n_sentences, exc_info=error)
        raise ApiError(500, f"decoding failed: {type(error).__name__}: {reason}") from None


def _response(results: list[list[Translation]]) -> TranslateResponse:
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
