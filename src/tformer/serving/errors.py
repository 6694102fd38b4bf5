"""Every error as the API's one JSON field, `error`, holding one line.

`ApiError` is what the routes raise; `add_error_handlers` turns it, pydantic's validation errors,
Starlette's own errors (404, 405, a body over the limit, a body it could not parse) and unexpected
exceptions into that format, with messages that say what to send instead.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


# what `POST /translate` may answer besides 200, as its OpenAPI schema documents it
ERRORS = {
    400: "the body is not valid JSON, or not UTF-8",
    413: "too many sentences, a sentence too long, a body too large, or a worst case over --max-decode-tokens",
    415: "the body is not sent as JSON (content-type: application/json), or is sent compressed",
    422: "a body of the wrong shape, a query string, text that is not valid Unicode, or decode settings that "
    "cannot be honoured",
    500: "decoding failed (the requests decoded with the same settings in that window get it too)",
    503: "the server is shutting down, or busy: --max-queue requests waiting (with Retry-After)",
}


EXAMPLE_BODY = '{"sentences": ["..."]}'
SHOWN_CHARS = 40  # the most of a value the client sent that an error message quotes


def shown(value: object) -> str:
    """`value` as an error message quotes it: cut to its first SHOWN_CHARS characters and its length, so that
    an answer stays one short line whatever the client sent (a 4,000-digit beam came back in full)."""
    text = str(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error `app` meets in the API's one-field format."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
    for problem in problems:
        if tuple(problem.get("loc", ())) == ("body",):  # the body as a whole, not one of its fields
            status, message = _whole_body_problem(problem, request.headers.get("content-type"))
            return JSONResponse({"error": message}, status_code=status)
    parts = []
    for problem in problems[:3]:
        where = ".".join(shown(part) for part in problem.get("loc", ()) if part != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(parts)}, status_code=422)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, a body over the limit) in the API's one-field format."""
    message = _unreadable_body(error.__cause__) if error.status_code == 400 else None
    if error.status_code == 404:
        message = _no_such_path(request)
    if error.status_code == 405 and error.headers and "Allow" in error.headers:  # "Method Not Allowed" named none
        allowed = " or ".join(sorted(error.headers["Allow"].split(", ")))
        message = f"{request.method} {request.url.path}: method not allowed; use {allowed}"
    detail = message or str(error.detail)
    return JSONResponse({"error": detail}, status_code=error.status_code, headers=error.headers)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """A bug outside decoding (whose failures are caught in `translate`): Starlette answered a plain-text
    "Internal Server Error". Starlette re-raises the error after this answer, so uvicorn logs it."""
    return JSONResponse({"error": f"internal error ({type(error).__name__}); see the server's log"}, status_code=500)


def _no_such_path(request: Request) -> str:
    """What to send instead of a path no route takes: the path without its trailing slash, when that is one
    of the API's (the app does not redirect: a 307 left a client that does not follow redirects with an
    empty answer), else the API's paths, which Starlette's "Not Found" did not list."""
    path = request.url.path
    methods: dict[str, list[str]] = {}
    for route in request.app.routes:
        if isinstance(route, APIRoute):
            methods.setdefault(route.path, []).extend(sorted(route.methods - {"HEAD"}))
    if path.endswith("/") and path.rstrip("/") in methods:
        return f"no such path: {shown(path)}; send it to {path.rstrip('/')}, without the trailing slash"
    api = ", ".join(f"{method} {route}" for route, names in methods.items() for method in names)
    docs = f" (docs at {request.app.docs_url})" if request.app.docs_url else ""
    return f"no such path: {shown(path)}; the API has {api}{docs}"


def _whole_body_problem(problem: dict[str, Any], content_type: str | None) -> tuple[int, str]:
    """Status and message for a body that is not a JSON object: pydantic's "body: Input should be a valid
    dictionary or object to extract fields from" did not tell `curl -d` users (whose body goes as a form)
    to add the JSON content type, nor a client sending a list what to send instead."""
    value = problem.get("input")
    if isinstance(value, bytes):  # FastAPI parses JSON only under a JSON content type; it passed the bytes on
        got = f"content-type: {shown(content_type)}" if content_type else "no content-type"
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
