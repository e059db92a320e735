"""One shard writer for sampling and evaluation: per-process jsonl parts, fsynced, resumable by index, merged in index order."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import lightning as L

from synpref.core.fingerprints import config_changes, flatten
from synpref.core.outputs import OutputError, OutputLock, ResumeMismatchError, atomic_file, check_writable

log = logging.getLogger(__name__)

# Part of every run.json: bump it when a release changes what a record holds or how it is computed
# from the same inputs, so records written by the older code are never resumed into newer ones.
RECORDS_VERSION = 2
OnMismatch = Literal["error", "set_aside"]


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(byte offset, record) for every complete line of a shard; a torn last line is ignored."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                try:
                    yield offset, json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: unreadable line at byte %d ignored", path, offset)
            offset += len(line)


def repair_tail(path: Path) -> None:
    """Cut a line torn by a kill, so appending continues on a line boundary."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)


def prompt_settings(datamodule) -> Optional[dict]:
    """What of the prompt data fixes the records: the prompt set's content and the batch plan.

    None for prompts that come from elsewhere (a plain DataLoader): their content is unknown, so
    their records are never resumed.
    """
    from synpref.data import PromptDataModule

    if not isinstance(datamodule, PromptDataModule):
        return None
    return {
        "prompts_sha256": datamodule.fingerprint(),
        "batch_size": datamodule.batch_size,
        "group_by_length": datamodule.group_by_length,
    }


def record_key(record: dict) -> tuple[int, int]:
    """Where a record sits: its prompt index and, with several answers per prompt, its sample."""
    return int(record["index"]), int(record.get("sample", 0))


class ShardWriter:
    """The records of one output folder, one jsonl shard per process (`parts/part-<world>-<rank>.jsonl`).

    `open` (every rank, before any work): rank 0 checks the folder is writable, takes its lock
    (`.lock`, naming its PID), and either starts afresh (`overwrite`, or no record on disk) or
    checks that `run.json` matches `settings` (plus RECORDS_VERSION): records of other settings are
    never resumed, they are an error or, with `on_mismatch="set_aside"`, moved to
    `stale/<time>/` and computed afresh; each rank cuts a torn last line off its own shard;
    the indices already on disk are returned, so their prompts are not computed again.
    `write` appends whole records, flushed and fsynced; `run.json` is written just before the
    first record, so a run that never wrote one leaves nothing that blocks a rerun.
    `records` yields every record once, in index order, reading by offset (little memory).

    Args:
        output_dir: the folder.
        settings: what fixes the records (JSON-able); a resumed run must match it. None: never resume.
        overwrite: delete what an earlier run left (parts, run.json and `outputs`) and start afresh
            (with `on_mismatch="set_aside"`: move it to `stale/<time>/`, deleting nothing).
        on_mismatch: records on disk made from other settings are an `error` (ResumeMismatchError
            naming what changed) or `set_aside` (moved, then computed afresh).
        outputs: the merged files this folder holds (deleted by `overwrite`).
        per_index: records per prompt index (evaluation with `samples_per_prompt: n` writes n, told
            apart by their `sample` field); a prompt counts as done once all of them are on disk.
    """

    def __init__(
        self,
        output_dir: str | Path,
        settings: Optional[dict],
        overwrite: bool = False,
        outputs: Sequence[str] = (),
        per_index: int = 1,
        on_mismatch: OnMismatch = "error",
    ):
        self.output_dir, self.outputs = Path(output_dir), tuple(outputs)
        self.overwrite = overwrite or settings is None
        self.on_mismatch = on_mismatch
        self.settings = json.loads(json.dumps({**(settings or {}), "records_version": RECORDS_VERSION}))
        self.parts = self.output_dir / "parts"
        self.per_index = per_index
        self.done: set[tuple[int, int]] = set()  # (index, sample) of every record on disk
        self._lock = OutputLock(self.output_dir)
        self._file = None
        self._recorded = False

    def _shards(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.jsonl"))

    def _prepare(self) -> None:
        """Rank 0: writable, locked, and either empty or holding records of these settings."""
        check_writable(self.output_dir)
        self._lock.acquire()
        run_json = self.output_dir / "run.json"
        on_disk = any(True for shard in self._shards() for _ in read_records(shard))
        if on_disk and not self.overwrite:
            saved = json.loads(run_json.read_text()) if run_json.exists() else None
            if saved is None:
                self._mismatch("holds records but no run.json saying what made them")
            elif saved != self.settings:
                changed = config_changes(flatten(saved), flatten(self.settings), limit=4)
                self._mismatch(f"holds records made from other inputs or settings ({changed})")
        elif on_disk and self.on_mismatch == "set_aside":
            self._set_aside("overwrite: true")
        elif on_disk:
            log.info("overwrite: deleting the earlier run's records in %s", self.output_dir)
        if self.overwrite or not on_disk:
            for name in ("parts", "run.json", *self.outputs):
                target = self.output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)

    def _mismatch(self, problem: str) -> None:
        """Records that must not be resumed: an error, or set aside so the run computes afresh."""
        if self.on_mismatch == "error":
            raise ResumeMismatchError(f"{self.output_dir} {problem}; use another output_dir or set overwrite: true")
        self._set_aside(problem)
        self.overwrite = True

    def _set_aside(self, why: str) -> None:
        """Move the parts, run.json and merged outputs to `stale/<time>/` (kept, never deleted)."""
        dest = self.output_dir / "stale" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        dest.mkdir(parents=True)
        for name in ("parts", "run.json", *self.outputs):
            if (self.output_dir / name).exists():
                os.replace(self.output_dir / name, dest / name)
        log.warning("%s %s: moved to %s; computing afresh", self.output_dir, why, dest)

    def open(self, trainer: L.Trainer) -> set[int]:
        problem: Optional[Exception] = None
        if trainer.is_global_zero:
            try:
                self._prepare()
            except OutputError as e:
                problem = e
        # Every rank raises the same error rather than waiting at a barrier rank 0 never reaches.
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            self.release()
            raise problem
        own = self.parts / f"part-{trainer.world_size:03d}-{trainer.global_rank:03d}.jsonl"
        repair_tail(own)
        trainer.strategy.barrier()
        self.done = {record_key(rec) for shard in self._shards() for _, rec in read_records(shard)}
        self._recorded = bool(self.done)
        if self.done:
            log.info("resuming: %d prompts already in %s", len({i for i, _ in self.done}), self.parts)
        self._file = open(own, "a", encoding="utf-8")
        return {index for index, _ in self.done}

    def has_all(self, indices: Sequence[int]) -> bool:
        return all((int(i), k) in self.done for i in indices for k in range(self.per_index))

    def write(self, records: Sequence[dict]) -> list[dict]:
        """Append the records not yet on disk (fsynced); returns them."""
        new = [r for r in records if record_key(r) not in self.done]
        if not new:
            return new
        if not self._recorded:
            with atomic_file(self.output_dir / "run.json") as f:
                f.write(json.dumps(self.settings, indent=1, sort_keys=True))
            self._recorded = True
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(record_key(r) for r in new)
        return new

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def release(self) -> None:
        self.close()
        self._lock.release()

    def records(self) -> Iterator[dict]:
        """Every record on disk once, in (index, sample) order (only keys, shard and offset are held in memory)."""
        shards = self._shards()
        where = sorted(
            {
                record_key(rec): (record_key(rec), s, off)
                for s, shard in enumerate(shards)
                for off, rec in read_records(shard)
            }.values()
        )
        handles = [open(shard, "rb") for shard in shards]
        try:
            for _, s, off in where:
                handles[s].seek(off)
                yield json.loads(handles[s].readline())
        finally:
            for h in handles:
                h.close()

    def merge(self, name: str) -> tuple[Path, int]:
        """The records, in index order, as `<output_dir>/<name>` (written whole or not at all)."""
        path, n = self.output_dir / name, 0
        with atomic_file(path) as f:
            for rec in self.records():
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        return path, n
