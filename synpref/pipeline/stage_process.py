"""A stage's process: its own process group, output streamed and teed to its log, signals forwarded, nothing left running."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from synpref.core.secrets import StreamRedactor


class Interrupted(Exception):
    """reproduce received SIGINT/SIGTERM while a stage ran; the stage has exited."""


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(src, sink, log_file, lock: threading.Lock) -> None:
    """Copy a stage's stream to our own stream and to its log as it arrives (progress bars included),
    remembered secrets redacted (synpref.core.secrets: the pipeline remembers its stages' API keys)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    redactor = StreamRedactor()
    while True:
        raw = os.read(src.fileno(), 1 << 16)
        chunk = redactor.feed(raw) if raw else redactor.flush()  # b"": the end, release what was held
        with lock:
            log_file.write(chunk)
            log_file.flush()
        sink.write(decoder.decode(chunk, final=not raw))
        sink.flush()
        if not raw:
            return


def run_process(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run `cmd` in its own process group, its output streamed and teed to `log_path`; its exit code.

    SIGINT/SIGTERM sent to this process are forwarded to the stage's group (a second one kills it),
    and we wait for it to exit before raising Interrupted: nothing is left running.
    """
    received: list[int] = []
    proc: Optional[subprocess.Popen] = None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            _signal_group(proc.pid, signum if len(received) == 1 else signal.SIGKILL)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log_file:
            # Own session: a terminal's Ctrl-C reaches only us, so the stage gets it exactly once.
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
            )
            if received:
                _signal_group(proc.pid, received[0])
            lock = threading.Lock()
            pumps = [
                threading.Thread(target=_pump, args=(src, sink, log_file, lock), daemon=True)
                for src, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
            ]
            for t in pumps:
                t.start()
            # Wait without reaping, so the group id stays ours while we clear what the stage left in it.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            _signal_group(proc.pid, signal.SIGKILL)
            code = proc.wait()
            for t in pumps:
                t.join()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(signal.Signals(received[0]).name, code)
    return code


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a stage log, a progress bar's `\\r` updates reduced to their final state."""
    text = path.read_bytes()[-(1 << 16) :].decode("utf-8", "replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]
