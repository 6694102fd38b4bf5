"""Refuse request bodies over a size limit, whether announced (Content-Length) or streamed in chunks.

A check of the Content-Length header alone lets a client that sends `Transfer-Encoding: chunked` upload
any amount; this ASGI middleware also counts the bytes as the application reads them and stops the
request with 413 once the limit is passed, so the server never holds more than the limit in memory.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class BodySizeLimit:
    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is larger than {max_bytes} bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)  # answered as {"error": ...} by the app's handler
            return message

        await self.app(scope, counting_receive, send)
