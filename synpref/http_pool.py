"""Pooled keep-alive HTTP connections whose every socket call ends by the calling thread's attempt deadline."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from typing import Iterator, Optional

import httpcore
import httpx

# The wall-clock end of the attempt this thread is making. httpx's timeouts bound one blocking call
# each, so a server dripping a byte per call would hold an attempt for ever; the pool's sockets clip
# every call's timeout to what is left of this instead (sync httpcore does its I/O in the caller).
_attempt_end = threading.local()


def _left(timeout: Optional[float]) -> Optional[float]:
    until = getattr(_attempt_end, "at", None)
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the attempt's time ran out")
    return left if timeout is None else min(timeout, left)


class _ClippedStream(httpcore.NetworkStream):
    """A socket stream whose reads and writes end by the attempt's deadline. Writes wait for the next
    read, so a request's headers and body leave in one send: one wake-up of the server, not two."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream
        self._unsent: list[bytes] = []

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        if self._unsent:
            data, self._unsent = b"".join(self._unsent), []
            self._stream.write(data, _left(timeout))
        return self._stream.read(max_bytes, _left(timeout))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        _left(timeout)  # out of time: fail now, not at the read
        if buffer:
            self._unsent.append(buffer)

    def close(self) -> None:
        self._unsent = []
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _ClippedStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _ClippedBackend(httpcore.SyncBackend):
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _ClippedStream(super().connect_tcp(host, port, _left(timeout), local_address, socket_options))


class _PooledTransport(httpx.BaseTransport):
    """httpx over a keep-alive httpcore pool of clipped sockets; each reply is read whole (small JSON)."""

    def __init__(self, connections: int):
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=connections,
            max_keepalive_connections=connections,
            network_backend=_ClippedBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            request.method,
            httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            reply = self._pool.handle_request(core)
            try:
                content = reply.read()
            finally:
                reply.close()
        except httpcore.TimeoutException as e:
            raise httpx.TimeoutException(str(e), request=request) from None
        except (httpcore.NetworkError, httpcore.ProtocolError) as e:
            raise httpx.TransportError(f"{type(e).__name__}: {e}") from None
        return httpx.Response(reply.status, headers=reply.headers, content=content, request=request)

    def close(self) -> None:
        self._pool.close()


def pooled_client(connections: int) -> httpx.Client:
    """An httpx client keeping up to `connections` keep-alive connections per host (one per thread
    in flight). Environment proxies go through httpx's own transport (per-call timeouts only)."""
    return httpx.Client(transport=_PooledTransport(connections), timeout=None)


@contextlib.contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Every socket call this thread makes inside ends within `seconds` of now (httpx.TimeoutException)."""
    _attempt_end.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _attempt_end.at = None
