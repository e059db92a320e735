"""Content digests (files, folders, what a model is: stored beside an export) and what changed between two settings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# Written into a model folder by the HF export (and by the first reader of a folder without one),
# so a 0.5B model's gigabytes are hashed once, not by every stage that reads it.
DIGEST_FILE = "synpref_digest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every file under `folder` (links followed), in a stable order, without names in `skip`."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        out += [Path(root) / name for name in sorted(files) if name not in skip]
    return out


def tree_digest(folder: Path, file_digest: Callable[[Path], str], skip: tuple[str, ...] = ()) -> str:
    """sha256 over (relative name, file digest) of every file: renames and edits both change it."""
    h = hashlib.sha256()
    for f in tree_files(folder, skip):
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def _stamps(folder: Path) -> dict[str, list[int]]:
    return {
        f.relative_to(folder).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns]
        for f in tree_files(folder, (DIGEST_FILE,))
    }


def write_model_digest(folder: str | Path) -> str:
    """Hash a model folder's files and store the digest in it with each file's (size, mtime)."""
    folder = Path(folder)
    stamps, digest = _stamps(folder), tree_digest(folder, file_sha256, (DIGEST_FILE,))
    tmp = folder / f".{DIGEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"sha256": digest, "files": stamps}, indent=1, sort_keys=True))
    tmp.replace(folder / DIGEST_FILE)
    return digest


def model_digest(name_or_path: str) -> str:
    """What a model is, as a string that changes whenever its weights, config or tokenizer do.

    A local folder: the sha256 of its files, read from DIGEST_FILE when every file still has the
    size and mtime recorded there, else computed (and stored, where the folder is writable). A hub
    id: `hub:<id>@<commit>` of the cached snapshot (a commit names its content), or `hub:<id>` when
    nothing is cached. Anything else (a served model's name): the name itself.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        try:
            saved = json.loads((folder / DIGEST_FILE).read_text())
            if saved["files"] == _stamps(folder):
                return saved["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            return write_model_digest(folder)
        except OSError:  # a read-only folder: hash it every time
            return tree_digest(folder, file_sha256, (DIGEST_FILE,))
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(name_or_path, local_files_only=True))
        return f"hub:{name_or_path}@{snapshot.name}"
    except Exception:  # not a hub id, or not cached: all that is known is the name
        return f"hub:{name_or_path}" if "/" in name_or_path else name_or_path


def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def config_changes(old: dict, new: dict, limit: int = 3) -> str:
    """`key: old → new` for the first `limit` changed keys (added/removed keys show as absent)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    shown = [f"{k}: {_show(old.get(k, '<absent>'))} → {_show(new.get(k, '<absent>'))}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
