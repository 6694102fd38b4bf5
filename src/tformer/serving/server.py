"""Run the app on uvicorn from a socket bound here, so that a bad --host or a busy port is one clear line.

Left to itself, uvicorn binds after the model is loaded and, when binding fails, logs
`ERROR: [Errno 98] ...` and exits with status 3, past the CLI's error handling. `bind` binds first and
raises an OSError whose message names the address and the option to change (the CLI prints it as
`error: ...` and exits 2); `serve` then hands that socket to uvicorn and prints one line once the server
accepts connections, with the real port (so `--port 0` is usable).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

# What to change when binding fails, by errno; anything else gets DEFAULT_HINT.
BIND_HINTS = {
    errno.EADDRINUSE: "choose another --port (another program is listening on it)",
    errno.EACCES: "choose a --port above 1023, or run with the rights to bind this one",
    errno.EADDRNOTAVAIL: "--host must be an address of this machine (127.0.0.1, or 0.0.0.0 for every interface)",
}
DEFAULT_HINT = "choose another --port (or --host)"
REQUEST_HEAD_TIMEOUT_S = 10.0  # for a request's line and headers, from the connection or the answer before
UNKNOWN_HOST_HINT = "check --host: give an address or name of this machine (127.0.0.1, 0.0.0.0, localhost)"


def plain_host(host: str) -> str:
    """An IPv6 address as the socket functions take it: `[::1]`, as written in a URL, is `::1`."""
    if host.startswith("[") and host.endswith("]") and ":" in host:
        return host[1:-1]
    return host


def host_port(host: str, port: int) -> str:
    """`host:port` as it goes in a URL: an IPv6 address needs brackets (one pair, given with them or not)."""
    host = plain_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening (uvicorn listens on it); OSError with an
    actionable one-line message when the host does not resolve or the address cannot be bound. An IPv6
    address may be given in brackets."""
    host = plain_host(host)
    where = host_port(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {where}: {error.strerror}; {UNKNOWN_HOST_HINT}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once after a stop
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise _cannot_listen(where, error) from None
    return listener


def _cannot_listen(where: str, error: OSError) -> OSError:
    reason = error.strerror or str(error)
    return OSError(f"cannot listen on {where}: {reason}; {BIND_HINTS.get(error.errno, DEFAULT_HINT)}")


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, printing `ready_line` on stderr once it accepts connections: uvicorn logs its own
    "running on" line neither for sockets passed in nor at log level warning, so users saw nothing.

    Listening may still fail after `bind`: two servers started on one port at about the same time both bind
    it (SO_REUSEADDR lets sockets that do not listen yet share an address), and the second to listen gets
    EADDRINUSE. uvicorn does not catch that for sockets passed in (a traceback, and the app's lifespan left
    running); here it is the same one-line OSError as `bind`'s."""

    def __init__(
        self, config: uvicorn.Config, *, ready_line: str, on_force_exit: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.ready_line = ready_line
        self.on_force_exit = on_force_exit
        self._forced = False  # on_force_exit was called

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except OSError as error:  # listen() failed: the port was taken since `bind`
            await self.lifespan.shutdown()  # stops the batcher; uvicorn left the app's lifespan running
            raise _cannot_listen(host_port(self.config.host, self.config.port), error) from None
        if self.started:
            print(self.ready_line, file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown; after a second Ctrl-C (a forced exit) also the app's: uvicorn skips it then, and
        the app's lifespan, cancelled as the event loop closed, logged a traceback of its CancelledError.
        `on_force_exit` first drops the work not yet started, so that only the work under way is waited for.

        It runs as soon as the second Ctrl-C comes, not once uvicorn's shutdown returns: from Python 3.12.1,
        uvicorn's last step (asyncio's `Server.wait_closed`) waits for every connection to close, so the
        requests still queued were all decoded (a 200 each) before the server could drop them."""
        watcher = asyncio.create_task(self._drop_waiting_on_force_exit())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            watcher.cancel()
        if self.force_exit and self.started:
            self._call_on_force_exit()  # in case the second Ctrl-C came after the watcher's last look
            await self.lifespan.shutdown()

    async def _drop_waiting_on_force_exit(self) -> None:
        while not self.force_exit:
            await asyncio.sleep(0.05)  # uvicorn looks at force_exit every 0.1 s as it waits
        self._call_on_force_exit()

    def _call_on_force_exit(self) -> None:
        if self.on_force_exit is not None and not self._forced:
            self._forced = True
            self.on_force_exit()


class _HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing a connection whose next request's line and headers have not all come
    within REQUEST_HEAD_TIMEOUT_S of the connection or of the answer before. uvicorn has no such limit: a
    connection that sent nothing, or headers a byte at a time (slowloris), was held open for ever, and its
    keep-alive timeout stopped at the first byte of the next request; enough of them use up the process's
    file descriptors. A body is not covered: the app reads it (docs/serving.md)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_request():  # not a pipelined request begun at once
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_head(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_request():
            self.transport.close()


def serve(
    app: Any,
    listener: socket.socket,
    *,
    graceful_timeout: float,
    ready_line: str,
    on_force_exit: Callable[[], None] | None = None,
) -> None:
    """Serve `app` on the bound `listener` until Ctrl-C or SIGTERM, then finish the requests in flight; a
    second Ctrl-C stops waiting for them, calls `on_force_exit` and shuts the app down at once."""
    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_HeadTimeoutProtocol,
        log_level="warning",
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = _AnnouncingServer(config, ready_line=ready_line, on_force_exit=on_force_exit)
    with contextlib.suppress(KeyboardInterrupt):  # the Ctrl-C uvicorn handled, re-raised once it shut down
        server.run(sockets=[listener])
