"""Output paths: writability checked before work starts, files and model folders replaced atomically, one writer per folder."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from synpref.core.errors import SynprefError

log = logging.getLogger(__name__)


class OutputError(SynprefError, ValueError):
    """An output path that cannot be used; the message names the path and what to do about it."""


class ResumeMismatchError(OutputError):
    """An output folder holds results made from other inputs or settings than this run's."""


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and write (and fsync) a probe file in it; OutputError naming it if that fails.

    Run before any work, so an unusable path costs seconds, not a training run.
    """
    folder = Path(folder)
    probe = folder / f".synpref-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(
            f"{folder}: cannot write there ({e.strerror or e}); "
            f"fix its permissions or free space, or choose another path"
        ) from None
    return folder


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to fill; on success it becomes `target` whole.

    An existing `target` is moved aside, the new folder renamed into place, then the old one
    deleted: a reader sees the old folder, the new one, or none, never a mix or a half-written
    model. On any error the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            old.unlink() if old.is_symlink() else shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[str]]:
    """A text file written to a temporary sibling, fsynced, then renamed over `path` (removed on error)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class OutputLock:
    """`<folder>/.lock` names the one process (PID and host) writing the folder.

    A second process fails naming the holder; a lock whose holder is no longer running on this
    host (killed, crashed) is taken over with a warning. `user` and `advice` word the refusal
    (what holds the folder, what to do instead).
    """

    def __init__(
        self, folder: str | Path, user: str = "process", advice: str = "wait for it to end, or use another output_dir"
    ):
        self.path = Path(folder) / ".lock"
        self.user, self.advice = user, advice
        self.held = False

    def _holder(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None  # vanished, or torn by a kill while it was being written

    def acquire(self) -> None:
        me = (os.getpid(), socket.gethostname())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != me and (holder[1] != me[1] or _alive(holder[0])):
                    raise OutputError(
                        f"{self.path.parent} is in use by {self.user} {holder[0]} on {holder[1]} "
                        f"(lock file {self.path}); {self.advice}"
                    ) from None
                log.warning("%s: taking over the lock of process %s, which is no longer running", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{me[0]} {me[1]}\n")
            self.held = True
            return
        raise OutputError(f"{self.path}: could not take the lock (another process keeps taking it)")

    def release(self) -> None:
        if self.held and self._holder() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False
