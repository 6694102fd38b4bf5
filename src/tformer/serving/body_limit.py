"""Refuse request bodies over a size limit, whether announced (Content-Length) or streamed in chunks.

A check of the Content-Length header alone lets a client that sends `Transfer-Encoding: chunked` upload
any amount; this ASGI middleware also counts the bytes as the application reads them and stops the
request with 413 once the limit is passed, so the server never holds more than the limit in memory.

It also answers a body still arriving when the shutdown's --graceful-timeout runs out with a JSON 503:
uvicorn cancels the request then, and the cancellation, uncaught, logged "Exception in ASGI application"
with a traceback and left the client without an answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class BodySizeLimit:
    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is larger than {max_bytes} bytes"
        self.shut_down = "the server shut down before this request's body was received"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0
        body_done = False

        async def counting_receive() -> dict:
            nonlocal received, body_done
            try:
                message = await receive()
            except asyncio.CancelledError:
                if body_done:  # the app's own wait for a disconnect, which it cancels once answered
                    raise
                raise HTTPException(503, self.shut_down) from None  # only uvicorn's shutdown cancels it then
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)  # answered as {"error": ...} by the app's handler
            return message

        await self.app(scope, counting_receive, send)
