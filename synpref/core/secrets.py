"""The one redaction point: remembered secrets (API keys) become `***` wherever text leaves the process."""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings
from typing import Any, Optional

MASK = "***"
# Shorter values are not treated as secrets: masking "x" or "EMPTY" (keyless local servers) would
# mangle every line, and a key that short protects nothing.
MIN_LENGTH = 6

# Longest first (one may contain another); replaced whole under the lock, so readers in any thread
# iterate a snapshot.
_secrets: tuple[str, ...] = ()
_lock = threading.Lock()
_installed = False


def remember(value: Optional[str]) -> None:
    """Treat `value` as a secret from now on (and install the hooks that redact it)."""
    global _secrets
    if not value or len(value) < MIN_LENGTH or value in _secrets:
        return
    with _lock:
        _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))
    install()


def remember_env_keys(config: Any) -> list[str]:
    """Remember the value of every environment variable a config names under a `*api_key_env` key
    (at any depth); the names, for the caller's log."""
    names = []
    if isinstance(config, dict):
        for key, value in config.items():
            if str(key).endswith("api_key_env") and isinstance(value, str):
                names.append(value)
                remember(os.environ.get(value))
            else:
                names += remember_env_keys(value)
    elif isinstance(config, (list, tuple)):
        for item in config:
            names += remember_env_keys(item)
    return names


def redact(text: str) -> str:
    """`text` with every remembered secret replaced by `***`."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class StreamRedactor:
    """Redacts a byte stream read in chunks: a chunk's tail that may begin a secret is held back
    until the next chunk (or `flush`) shows whether it does."""

    def __init__(self):
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        data, secrets = self.held + data, [s.encode() for s in _secrets]
        for secret in secrets:
            data = data.replace(secret, MASK.encode())
        keep = max((_begun(data, s) for s in secrets), default=0)
        self.held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep]

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out


def _begun(data: bytes, secret: bytes) -> int:
    """The length of the longest end of `data` that is a proper start of `secret` (0: none)."""
    for k in range(min(len(secret) - 1, len(data)), 0, -1):
        if data.endswith(secret[:k]):
            return k
    return 0


# -- the hooks: every log record, uncaught tracebacks (main thread and others) --------------------
def install() -> None:
    """Redact every log record (a record factory: Lightning's own handlers included), printed
    warnings and the tracebacks Python prints for uncaught exceptions (any thread). Idempotent;
    an excepthook someone else installed is left in place."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _secrets:
                _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        if sys.excepthook is sys.__excepthook__:
            sys.excepthook = _excepthook
        if threading.excepthook is threading.__excepthook__:
            threading.excepthook = _thread_excepthook
        format_warning = warnings.formatwarning  # what warnings.showwarning prints

        def redacted_warning(*args, **kwargs) -> str:
            return redact(format_warning(*args, **kwargs))

        warnings.formatwarning = redacted_warning


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it itself when the record is emitted
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        if redact(text) != text:
            record.exc_text = redact(text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _excepthook(exc_type, exc, tb) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
    sys.stderr.flush()


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else threading.get_ident()
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))
    sys.stderr.flush()
