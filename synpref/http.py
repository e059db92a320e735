"""The one HTTP client for OpenAI-compatible servers: HttpSettings, Endpoint, post_json, map_concurrent."""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import random
import signal
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import httpx

from synpref.core.errors import SynprefError
from synpref.core.secrets import redact, remember
from synpref.http_pool import attempt_deadline, pooled_client

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


def _attempt(client: httpx.Client, url: str, body: bytes, headers: dict, timeout: float) -> httpx.Response:
    """One POST, finished (status, headers, body) within `timeout` seconds of wall clock, or _Retryable."""
    try:
        with attempt_deadline(timeout):
            return client.post(url, content=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise _Retryable(f"timed out after {timeout:g} s") from None
    except httpx.TransportError as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from None


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
    url: str | httpx.URL,
    payload: dict,
    *,
    api_key_env: Optional[str] = None,
    timeout: float = 60.0,
    deadline: Optional[float] = None,
    max_retries: int = 6,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    retries: Optional[Counter] = None,
    client: Optional[httpx.Client] = None,
) -> dict:
    """POST `payload` as JSON to `url`; the reply's JSON object.

    `timeout` bounds each ATTEMPT end to end (connect, send, headers and every byte of the body: a
    server that drips one byte a second fails the attempt at `timeout`); `deadline` bounds the whole
    call across attempts and backoff waits. 408/409/429/5xx, timeouts and connection errors are
    retried with exponential backoff and jitter (`backoff`·2^attempt, capped at `max_backoff`; a
    `Retry-After` header wins); `retries` counts them by kind ("timeout", "HTTP 429", ...). The key
    is read from the environment variable NAMED by `api_key_env` and sent as a bearer token; it never
    reaches logs or messages (synpref.core.secrets). `client`: a pooled_client to reuse (None: one for
    this call). SIGTERM/SIGINT end a backoff wait at once with SystemExit (see _interruptible).
    """
    with _interruptible():
        if client is not None:
            return _post_json(
                client, url, payload, api_key_env, timeout, deadline, max_retries, backoff, max_backoff, retries
            )
        with pooled_client(1) as own:
            return _post_json(
                own, url, payload, api_key_env, timeout, deadline, max_retries, backoff, max_backoff, retries
            )


def _post_json(client, url, payload, api_key_env, timeout, deadline, max_retries, backoff, max_backoff, retries):
    headers = auth_headers(api_key_env, url)
    body = json.dumps(payload).encode()
    give_up_at = None if deadline is None else time.monotonic() + deadline
    for attempt in range(max_retries + 1):
        _check_stop()
        budget = timeout if give_up_at is None else min(timeout, give_up_at - time.monotonic())
        try:
            if budget <= 0:
                raise _Retryable(f"deadline of {deadline:g} s passed")
            reply = _attempt(client, url, body, headers, budget)
            if reply.status_code in RETRY_STATUS:
                raise _Retryable(f"HTTP {reply.status_code}", reply.headers.get("Retry-After"))
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
        return _decode(url, reply.status_code, reply.content, api_key_env)
    raise AssertionError("unreachable")


def _decode(url: str, status: int, raw: bytes, api_key_env: Optional[str]) -> dict:
    """The JSON object of a final reply, or the EndpointError that says what came instead."""
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


@dataclass(frozen=True)
class HttpSettings:
    """How a client reaches its OpenAI-compatible server (EndpointReward, PairwiseLLMJudge, OpenAIGenerator).

    Args:
        base_url: the API root, e.g. http://127.0.0.1:8000/v1.
        api_key_env: NAME of the environment variable holding the API key (None: no key); the key
            itself is never an argument, so it never reaches configs, MLflow params or logs.
        timeout: seconds one attempt may take end to end (connect, send, every byte of the reply);
            a slower or dripping reply counts as a timeout and is retried.
        deadline: seconds one request may take across all attempts and backoff (None: bounded by
            `max_retries` only).
        max_concurrency: requests in flight at once (threads, each on a pooled keep-alive connection).
        max_retries: retries after a 408/409/429, a 5xx, a timeout or a connection error.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at
            `max_backoff`; a `Retry-After` header wins when present.
        max_backoff: longest delay between retries.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: Optional[str] = None
    timeout: float = 60.0
    deadline: Optional[float] = None
    max_concurrency: int = 8
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0


class Endpoint:
    """An API root (`settings.base_url`) POSTed to over one pool of keep-alive connections, reused
    by every request and thread; the pool opens on first use and closes with `close()` or the object."""

    def __init__(self, settings: HttpSettings):
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        # post_json's keywords, worked out once: asdict per request cost as much as parsing the reply.
        self._knobs = {k: v for k, v in asdict(settings).items() if k not in ("base_url", "max_concurrency")}
        self._parsed: dict[str, httpx.URL] = {}  # by path: httpx parses a string URL on every request
        self._lock = threading.Lock()
        self._client: Optional[httpx.Client] = None

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def check_key(self) -> None:
        """EndpointError naming the variable when the key is missing (before any request)."""
        auth_headers(self.settings.api_key_env, self.base_url)

    def post(self, path: str, payload: dict, retries: Optional[Counter] = None) -> dict:
        """post_json to `{base_url}/{path}` with these settings, on the pool."""
        url = self._parsed.get(path) or self._parsed.setdefault(path, httpx.URL(self.url(path)))
        return post_json(url, payload, retries=retries, client=self._pool(), **self._knobs)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """map_concurrent at `max_concurrency`."""
        return map_concurrent(fn, items, self.settings.max_concurrency)

    def _pool(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = pooled_client(max(1, self.settings.max_concurrency))
                weakref.finalize(self, self._client.close)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self) -> dict:  # copies and pickles open their own pool
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])


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
