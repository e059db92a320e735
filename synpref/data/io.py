"""Read rows from the HF hub or local jsonl/json/parquet files, with located errors and counted skips."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import datasets

from synpref.chat import DataError, FieldError

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_local(path: str) -> bool:
    """A path (not a hub name) when it exists or looks like a file or a relative/absolute path."""
    p = Path(path)
    return p.exists() or p.suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~"))


def load_rows(
    path: str, split: str = "train", config_name: Optional[str] = None, max_rows: Optional[int] = None
) -> datasets.Dataset:
    """A hub dataset (`path` = repo id, `config_name`, `split`) or a local file/folder of jsonl/parquet."""
    if is_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data path {path!r} does not exist (resolved: {p.resolve()})")
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no .jsonl/.json/.parquet files under {path!r}")
        builders = {LOCAL_SUFFIXES[f.suffix] for f in files}
        if len(builders) > 1:
            raise ValueError(f"{path!r} mixes json and parquet files; point at one kind")
        ds = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    else:
        ds = datasets.load_dataset(path, config_name, split=split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds


def source_name(path: str, split: str, config_name: Optional[str]) -> str:
    """How errors name where a row came from: the file, or hub id[config]:split."""
    return path if is_local(path) else f"{path}[{config_name or 'default'}]:{split}"


def map_rows(
    ds: datasets.Dataset,
    fn: Callable[[dict], dict],
    source: str,
    columns: Iterable[str],
    on_bad_row: OnBadRow = "error",
    what: str = "rows",
    num_proc: Optional[int] = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Apply `fn` to each row into an Arrow dataset with `columns` (cached by `datasets`).

    `fn` raises FieldError for bad input: a DataError naming source, row and field, or with
    on_bad_row='skip' a counted drop. It raises Dropped for a valid row dropped by policy
    (truncated away, a tie): always counted. Nothing is dropped silently; the counts come back
    and are logged.
    """
    columns = list(columns)

    def apply(row: dict, index: int) -> dict:
        try:
            return {**fn(row), "_drop": ""}
        except Dropped as d:
            reason = d.reason
        except FieldError as e:
            if on_bad_row == "error":
                raise DataError(source, index, e.field, e.problem) from None
            reason = f"bad {e.field.split('[')[0]}: {e.problem}"
        return {**{c: None for c in columns}, "_drop": reason}

    out = ds.map(apply, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc=f"preparing {what}")
    counts = dict(Counter(r for r in out["_drop"] if r))
    kept = out.filter(lambda r: not r, input_columns="_drop").remove_columns("_drop")
    if counts:
        log.warning("%s: kept %d of %d %s; dropped %s", source, len(kept), len(ds), what, counts)
    if len(kept) == 0:
        raise DataError(source, "*", "*", f"no usable {what} left (dropped: {counts})")
    return kept, counts


class Dropped(Exception):
    """A valid row dropped by policy (truncation, ties, ...); counted, never silent."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def require(row: dict, fields: Iterable[str]) -> None:
    for field in fields:
        if row.get(field) in (None, "", []):
            raise FieldError(field, "missing or empty")
