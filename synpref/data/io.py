"""Read rows from the HF hub or local jsonl/json/parquet files, with located errors and counted skips."""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import datasets

from synpref.core.errors import DataError, FieldError
from synpref.core.resources import SCHEME, resolve

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_local(path: str) -> bool:
    """A path (not a hub name) when it exists or looks like a file, a relative/absolute path or a
    packaged `synpref://` file."""
    p = Path(path)
    return p.exists() or p.suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~", SCHEME))


def is_hub_layout(folder: Path) -> bool:
    """A folder laid out as a hub data set (a downloaded snapshot, or `synpref mirror`): its README.md
    opens with YAML front matter that names its `configs:` and their data files."""
    readme = folder / "README.md"
    if not (folder.is_dir() and readme.is_file()):
        return False
    head = readme.read_text(encoding="utf-8", errors="replace")[:65536]
    return head.startswith("---") and "\nconfigs:" in head.split("\n---", 1)[0]


def load_rows(
    path: str, split: str = "train", config_name: Optional[str] = None, max_rows: Optional[int] = None
) -> datasets.Dataset:
    """A hub dataset (`path` = repo id, `config_name`, `split`), a local folder in the hub's layout (the
    same `config_name` and `split`), or a local file/folder of jsonl/parquet."""
    if is_local(path) and is_hub_layout(Path(resolve(path)).expanduser()):
        # The path a downloaded snapshot takes: datasets reads the README's configs and splits.
        try:
            ds = datasets.load_dataset(str(Path(resolve(path)).expanduser()), config_name, split=split)
        except Exception as e:  # a config or split the folder lacks
            raise DataError(path, None, "split", f"cannot load config {config_name!r}, split {split!r}: {e}") from e
    elif is_local(path):
        p = Path(resolve(path)).expanduser()
        if not p.exists():
            raise DataError(path, None, "path", f"data path does not exist (resolved: {p.resolve()})")
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise DataError(path, None, "path", "no .jsonl/.json/.parquet files here")
        builders = {LOCAL_SUFFIXES[f.suffix] for f in files}
        if len(builders) > 1:
            raise DataError(path, None, "path", "mixes json and parquet files; point at one kind")
        builder = builders.pop()
        if builder == "json":
            for f in files:
                check_text(f)
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # Arrow's errors name neither the file nor the line
            if builder == "json":
                for f in files:
                    check_json_lines(f)
            raise DataError(path, None, "*", f"cannot be read as a table: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(path, config_name, split=split)
        except Exception as e:  # offline, a typo, a missing split: name it, not 30 frames of datasets
            raise DataError(
                path,
                None,
                "path",
                f"not a local file and cannot be loaded from the hub ({type(e).__name__}: "
                f"{e}); for a local file give its path with its .jsonl/.json/.parquet suffix",
            ) from e
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds


def check_text(path: Path, chunk: int = 1 << 24) -> None:
    """Raise a DataError if a json/jsonl file cannot be read, is not UTF-8 (naming the row; Arrow
    would load the bytes and fail later, unlocated) or holds no rows."""
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                try:
                    blank = not decoder.decode(block).strip() and blank
                except UnicodeDecodeError as e:
                    f.seek(0)
                    before = f.read(offset + e.start)
                    line_start = before.rfind(b"\n") + 1
                    row = sum(1 for line in before[:line_start].split(b"\n") if line.strip())
                    raise DataError(
                        str(path),
                        row,
                        "*",
                        f"not valid UTF-8 (byte 0x{block[e.start]:02x} at column "
                        f"{len(before) - line_start + 1}); re-save the file as UTF-8",
                    ) from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except OSError as e:
        raise DataError(str(path), None, "path", f"cannot be read ({e.strerror or e})") from None
    if blank:
        raise DataError(str(path), None, "*", "the file is empty; expected one JSON object per line")


def check_json_file(path: Path) -> None:
    """A DataError at the first problem of a json/jsonl file: unreadable, not UTF-8, empty, a bad line."""
    check_text(path)
    check_json_lines(path)


def check_json_lines(path: Path) -> None:
    """Raise a DataError at the first line of a jsonl file that is not a JSON object."""
    if path.suffix != ".jsonl":
        return
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(l for l in f if l.strip()):
            try:
                ok = isinstance(json.loads(line), dict)
            except json.JSONDecodeError as e:
                raise DataError(str(path), row, "*", f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not ok:
                raise DataError(str(path), row, "*", "not a JSON object")


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

    `fn` raises FieldError for bad input: a DataError naming source, row (0-based) and field, or
    with on_bad_row='skip' a drop counted as `bad/<field>` (e.g. `bad/messages.role`), the first
    few logged in full. It raises Dropped for a valid row dropped by policy (truncated away, a
    tie): always counted. Nothing is dropped silently; the counts come back and are logged.
    """
    columns = list(columns)

    def apply(row: dict, index: int) -> dict:
        try:
            return {**fn(row), "_drop": "", "_why": ""}
        except Dropped as d:
            reason, why = d.reason, ""
        except FieldError as e:
            error = DataError(source, index, e.field, e.problem)
            if on_bad_row == "error":
                raise error from None
            # One count per field, whatever the row: keys stay few and valid MLflow metric names.
            reason, why = "bad/" + re.sub(r"\[\d+\]", "", e.field), str(error)
        return {**{c: None for c in columns}, "_drop": reason, "_why": why}

    # datasets >= 4 forks a pool for num_proc=1 too (seconds per call, pickling the tokenizer): one
    # process means this one.
    num_proc = num_proc if num_proc and num_proc > 1 else None
    out = ds.map(apply, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc, desc=f"preparing {what}")
    counts = dict(Counter(r for r in out["_drop"] if r))
    examples = [w for w in out["_why"] if w]
    kept = out.filter(lambda r: not r, input_columns="_drop").remove_columns(["_drop", "_why"])
    for why in examples[:5]:
        log.warning("skipped (on_bad_row=skip): %s", why)
    if counts:
        log.warning("%s: kept %d of %d %s; dropped %s", source, len(kept), len(ds), what, counts)
    if len(kept) == 0:
        raise DataError(source, None, "*", f"no usable {what} left (dropped: {counts})")
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


def samples_by_prompt(rows: Iterable[dict]) -> dict[int, dict]:
    """samples.jsonl's rows (one per sample, as `synpref predict` writes them) grouped by prompt index in
    file order: {index: {"prompt_id", "prompt", "samples": {sample number: (response, score)}}}."""
    prompts: dict[int, dict] = {}
    for row in rows:
        entry = prompts.setdefault(
            int(row["index"]), {"prompt_id": row.get("prompt_id"), "prompt": row["prompt"], "samples": {}}
        )
        entry["samples"][int(row["sample"])] = (row["response"], row["score"])
    return prompts
