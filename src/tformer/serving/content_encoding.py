"""Refuse a request body sent compressed (`Content-Encoding: gzip`, `br`, ...), which the app cannot read.

FastAPI parses the body as it comes: a gzip body failed as JSON that "is not valid UTF-8: byte 0x8B at
offset 1 ... send the JSON encoded as UTF-8", which sent the client looking at its text instead of its
compression. As RFC 9110 (15.5.16) asks, the answer is a 415 whose Accept-Encoding says what is taken.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from tformer.serving.errors import shown

IDENTITY = (b"", b"identity")  # no coding at all


class IdentityEncodingOnly:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        encoding = dict(scope.get("headers", ())).get(b"content-encoding", b"").strip().lower()
        if scope["type"] == "http" and encoding not in IDENTITY:
            name = encoding.decode("latin-1")
            message = f"the request body is compressed (content-encoding: {shown(name)}); send it uncompressed"
            response = JSONResponse({"error": message}, status_code=415, headers={"Accept-Encoding": "identity"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
