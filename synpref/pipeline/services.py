"""Servers a pipeline's stages need (a generation server): started on demand, health-checked, always stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

from synpref.core.errors import ConfigError, SynprefError

log = logging.getLogger(__name__)


class ServiceError(SynprefError):
    """A service did not start: a missing command, a busy port, an early exit, no health in time."""


@dataclass
class Service:
    """A process some stages need, e.g. `transformers serve` on 127.0.0.1.

    Args:
        name: the service's name (its log is `<state_dir>/<name>.log`).
        command: the command line (a string, split like a shell would, or a list).
        health_url: polled until it answers 200 (`/health` of vLLM, SGLang, TGI and transformers serve).
        stages: names of the stages that need it: it runs while they run. It is started before
            one of them runs and stopped before a stage that does not need it (so a GPU server
            frees its memory for training in between), and when the pipeline ends, fails or is
            interrupted.
        startup_timeout: seconds to wait for health before giving up.
    """

    name: str
    command: Union[str, list[str]]
    health_url: str
    stages: list[str] = field(default_factory=list)
    startup_timeout: float = 300.0


def _argv(command: Union[str, Sequence[str]]) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    # A console script of this environment (transformers, vllm) also when the venv is not activated.
    if argv and not shutil.which(argv[0]) and (Path(sys.executable).parent / argv[0]).exists():
        argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


def _healthy(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, even by kill -9."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def running(service: Service, log_path: Union[str, Path]) -> Iterator[subprocess.Popen]:
    """Start `service`, wait until its health URL answers 200, yield the process; stop it on exit, whatever the exit."""
    argv = _argv(service.command)
    where = f"(command: {shlex.join(argv)}; log: {log_path})"
    if _healthy(service.health_url):
        raise ServiceError(
            f"service {service.name!r}: {service.health_url} already answers before it was started {where}; "
            f"stop whatever listens there or give the service another port"
        )
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        log.info("service %s: starting %s (log %s)", service.name, shlex.join(argv), log_path)
        try:
            # Its own session: a Ctrl-C in the terminal reaches us, and we stop it in order.
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )
        except OSError as e:  # not found, not executable
            problem = "command not found" if isinstance(e, FileNotFoundError) else e.strerror
            raise ServiceError(
                f"service {service.name!r} could not start {where}: {argv[0]}: {problem}; install it or fix its command"
            ) from None
    try:
        _wait_healthy(service, proc, log_path, where)
        yield proc
    finally:
        stop(proc, service.name)


def _wait_healthy(service: Service, proc: subprocess.Popen, log_path, where: str) -> None:
    start = time.monotonic()
    while not _healthy(service.health_url):
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise ServiceError(
                f"service {service.name!r} exited with code {proc.returncode} before "
                f"{service.health_url} answered {where}; end of the log:\n{tail}"
            )
        if time.monotonic() - start > service.startup_timeout:
            raise ServiceError(
                f"service {service.name!r}: {service.health_url} did not answer 200 within "
                f"{service.startup_timeout:g} s {where}; raise startup_timeout or read the log"
            )
        time.sleep(0.5)
    log.info("service %s: healthy after %.1f s", service.name, time.monotonic() - start)


def stop(proc: subprocess.Popen, name: str = "service", grace: float = 15.0) -> None:
    """SIGTERM to the service's process group, SIGKILL after `grace` seconds; waits for it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.info("service %s: stopped (exit code %s)", name, proc.returncode)


class Services:
    """The services of a pipeline run: `need(stage)` before each stage that runs."""

    def __init__(self, services: Sequence[Service], stage_names: Sequence[str], state_dir: Union[str, Path]):
        for i, svc in enumerate(services):
            unknown = sorted(set(svc.stages) - set(stage_names))
            if unknown:
                raise ConfigError(
                    f"services[{i}].stages", f"names stages that do not exist: {unknown} (stages: {list(stage_names)})"
                )
        self.services, self.state_dir = list(services), Path(state_dir)
        self.processes: dict[str, subprocess.Popen] = {}
        self._stacks: dict[str, contextlib.ExitStack] = {}

    def need(self, stage: str) -> None:
        """Start the services `stage` needs; stop the others."""
        for svc in self.services:
            if svc.name in self._stacks and stage not in svc.stages:
                self._stop(svc.name)
            elif stage in svc.stages and svc.name not in self._stacks:
                stack = contextlib.ExitStack()
                self.processes[svc.name] = stack.enter_context(running(svc, self.state_dir / f"{svc.name}.log"))
                self._stacks[svc.name] = stack

    def _stop(self, name: str) -> None:
        self.processes.pop(name, None)
        self._stacks.pop(name).close()

    def close(self) -> None:
        for name in list(self._stacks):
            self._stop(name)


@contextlib.contextmanager
def for_stages(
    services: Sequence[Service], stage_names: Sequence[str], state_dir: Union[str, Path]
) -> Iterator[Services]:
    """The pipeline's `Services`; every service still running is stopped on exit, including on an
    exception, Ctrl-C, or SIGTERM (turned into SystemExit(143) while this is active, unless a
    handler is already installed)."""
    pool = Services(services, stage_names, state_dir)
    previous = signal.getsignal(signal.SIGTERM)
    own_handler = bool(services) and previous in (signal.SIG_DFL, None)
    if own_handler:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield pool
    finally:
        try:
            pool.close()
        finally:
            if own_handler:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, previous)
