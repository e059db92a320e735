"""The one HTTP client for OpenAI-compatible servers (reward endpoints, judges, generation servers).

Standard library only. Two functions:

- `post_json(url, payload, *, api_key_env=None, timeout=60, deadline=None, max_retries=6, backoff=1,
  max_backoff=60, retries=None) -> dict`: POST `payload` as JSON, return the decoded JSON object.
  `timeout` bounds each ATTEMPT end to end (connect, send, headers and every byte of the body; a
  server that drips one byte a second fails the attempt at `timeout`, like any timeout); `deadline`
  bounds the whole call across attempts and backoff sleeps. 408/409/429/5xx, timeouts and
  connection errors are retried with exponential backoff and jitter (`backoff`·2^attempt, capped at
  `max_backoff`; a `Retry-After` header wins). `retries`, a Counter, counts retried failures by kind
  ("timeout", "HTTP 429", ...). The key is read from the environment variable NAMED by
  `api_key_env` and sent as a bearer token; it never reaches logs or error messages (synpref.core.secrets).
- `map_concurrent(fn, items, max_concurrency) -> list`: `fn` over `items` on a thread pool, results
  in input order; the first failure is raised (calls not yet started are cancelled).

SIGTERM and SIGINT end every backoff wait at once, in worker threads too, with SystemExit(128 + signal):
while either function runs in the main thread its handler wakes the waits, then does what the
previous handler does (Lightning's only records SIGTERM and returns; the default exits).

Errors: `EndpointError` (a non-retryable status, retries or deadline exhausted, a missing key) and its
subclass `MalformedReply` (the body is not a JSON object; callers raise it for missing fields).
HTTP(S) proxies from the environment (`https_proxy`, `no_proxy`) are honoured.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar
from urllib.parse import urlsplit

from synpref.core.errors import SynprefError
from synpref.core.secrets import redact, remember

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
T, R = TypeVar("T"), TypeVar("R")


class EndpointError(SynprefError, RuntimeError):
    """The server failed for good: a non-retryable status, retries or deadline exhausted, a missing key."""

    exit_code = 1


class MalformedReply(EndpointError):
    """The server answered 200 with a body that is not what the caller expects."""


# Set by a SIGTERM/SIGINT while post_json or map_concurrent runs in the main thread: every retry
# wait, in any thread, ends at once. A plain sleep would run on under a handler that only records
# the signal and returns (Lightning's during fit and predict): 39 s were seen at a Retry-After.
_stop = threading.Event()
_received: list[int] = []
_installed = False


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """In the main thread (outermost call only): SIGTERM/SIGINT set `_stop`, then chain to the
    previous handler; the previous handlers are back on exit."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        _received.append(signum)
        _stop.set()
        if callable(before):
            before(signum, frame)
        else:  # SIG_DFL (or set outside Python): end the process as the signal would, cleanly
            raise SystemExit(128 + signum)

    for signum in previous:
        signal.signal(signum, on_signal)
    _installed = True
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, signal.SIG_DFL if before is None else before)
        _installed = False
        _stop.clear()
        _received.clear()


def _check_stop() -> None:
    if _stop.is_set():
        raise SystemExit(128 + (_received[0] if _received else signal.SIGTERM))


def _wait(seconds: float) -> None:
    """Sleep `seconds`, or until a signal arrives (then SystemExit)."""
    _stop.wait(seconds)
    _check_stop()


class _Retryable(Exception):
    def __init__(self, problem: str, retry_after: Optional[str] = None):
        super().__init__(problem)
        self.problem, self.retry_after = problem, retry_after


def snippet(raw: bytes, n: int = 200) -> str:
    """The start of a body, for error messages, secrets redacted (a reply may echo the key)."""
    text = redact(raw.decode("utf-8", "replace"))
    return repr(text[:n] + ("…" if len(text) > n else ""))


def auth_headers(api_key_env: Optional[str], url: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise EndpointError(
                f"environment variable {api_key_env} (api_key_env) is not set; export it with the API key for {url}"
            )
        remember(key)  # from now on redacted wherever text leaves the process (synpref.core.secrets)
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the URL's host (through the environment's proxy, if any) and the request target."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if https else 80)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if https:
            conn = http.client.HTTPSConnection(p.hostname, p.port or 80, timeout=timeout)
            conn.set_tunnel(host, port)
            return conn, target
        return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout), url
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    return cls(host, port, timeout=timeout), target


def _attempt(url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One POST, finished (status, headers, body) within `timeout` seconds of wall clock, or _Retryable."""
    until = time.monotonic() + timeout
    conn, target = _connection(url, timeout)
    watchdog = None
    try:
        conn.connect()
        sock = conn.sock
        # The socket timeout bounds one blocking call; the watchdog bounds them all (a server that
        # drips its headers), and the clock check below bounds a dripping body between reads.
        watchdog = threading.Timer(max(0.0, until - time.monotonic()), _shut, (sock,))
        watchdog.daemon = True
        watchdog.start()
        conn.request("POST", target, body=body, headers=headers)
        reply = conn.getresponse()
        chunks = []
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed while reading the body")
            sock.settimeout(left)
            chunk = reply.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
        if time.monotonic() >= until:  # the watchdog ended the body early
            raise TimeoutError("deadline passed while reading the body")
        if reply.length:  # the connection closed before Content-Length bytes came
            raise http.client.IncompleteRead(b"".join(chunks), reply.length)
        return reply.status, reply.headers, b"".join(chunks)
    except TimeoutError:  # socket.timeout is TimeoutError since 3.10
        raise _Retryable(f"timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() >= until:  # the watchdog cut the socket
            raise _Retryable(f"timed out after {timeout:g} s") from None
        raise _Retryable(f"{type(e).__name__}: {e}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _delay(attempt: int, retry_after: Optional[str], backoff: float, max_backoff: float) -> float:
    if retry_after:
        try:
            return min(max_backoff, max(0.0, float(retry_after)))
        except ValueError:
            when = email.utils.parsedate_to_datetime(retry_after) if retry_after.strip() else None
            if when is not None:
                return min(max_backoff, max(0.0, when.timestamp() - time.time()))
    return min(max_backoff, backoff * 2**attempt) * (0.5 + random.random() / 2)


def post_json(
    url: str,
    payload: dict,
    *,
    api_key_env: Optional[str] = None,
    timeout: float = 60.0,
    deadline: Optional[float] = None,
    max_retries: int = 6,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    retries: Optional[Counter] = None,
) -> dict:
    """POST `payload` to `url`; the reply's JSON object. See the module docstring for the semantics."""
    with _interruptible():
        return _post_json(url, payload, api_key_env, timeout, deadline, max_retries, backoff, max_backoff, retries)


def _post_json(url, payload, api_key_env, timeout, deadline, max_retries, backoff, max_backoff, retries) -> dict:
    headers = auth_headers(api_key_env, url)
    body = json.dumps(payload).encode()
    give_up_at = None if deadline is None else time.monotonic() + deadline
    for attempt in range(max_retries + 1):
        _check_stop()
        budget = timeout if give_up_at is None else min(timeout, give_up_at - time.monotonic())
        try:
            if budget <= 0:
                raise _Retryable(f"deadline of {deadline:g} s passed")
            status, reply_headers, raw = _attempt(url, body, headers, budget)
            if status in RETRY_STATUS:
                raise _Retryable(f"HTTP {status}", reply_headers.get("Retry-After"))
        except _Retryable as e:
            if retries is not None:
                retries["timeout" if e.problem.startswith("timed out") else e.problem.split(":")[0]] += 1
            out_of_time = give_up_at is not None and time.monotonic() >= give_up_at
            if attempt == max_retries or out_of_time:
                why = f"deadline of {deadline:g} s passed" if out_of_time else f"giving up after {attempt + 1} attempts"
                raise EndpointError(f"{url}: {why}; last error {e.problem}") from None
            delay = _delay(attempt, e.retry_after, backoff, max_backoff)
            if give_up_at is not None:
                delay = min(delay, max(0.0, give_up_at - time.monotonic()))
            log.warning("%s: %s; retry %d/%d in %.1fs", url, e.problem, attempt + 1, max_retries, delay)
            _wait(delay)
            continue
        if status in (401, 403) and api_key_env:
            # The key's name, never the key.
            raise EndpointError(
                f"{url} refused the API key from ${api_key_env} (HTTP {status}: {snippet(raw)}); "
                f"export a valid key in {api_key_env}"
            )
        if status != 200:
            raise EndpointError(f"{url} answered HTTP {status}: {snippet(raw)}")
        try:
            reply = json.loads(raw)
        except ValueError as e:
            raise MalformedReply(f"{url}: malformed reply (not JSON: {e}): {snippet(raw)}") from None
        if not isinstance(reply, dict):
            raise MalformedReply(f"{url}: malformed reply (expected a JSON object): {snippet(raw)}")
        return reply
    raise AssertionError("unreachable")


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], max_concurrency: int) -> list[R]:
    """`[fn(x) for x in items]` with up to `max_concurrency` calls in flight; results in input order."""
    items = list(items)
    with _interruptible():
        if max_concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=max_concurrency)
        try:
            return list(pool.map(fn, items))
        finally:  # after a failure or a signal, start nothing more; the running calls wake and end
            pool.shutdown(wait=True, cancel_futures=True)
