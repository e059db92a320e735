"""`synpref://` paths name files shipped inside the package (the sample data) from any directory."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SCHEME = "synpref://"


def resolve(path: str | Path) -> str:
    """A local filesystem path for `path`: `synpref://sample/x.jsonl` → the installed package file;
    anything else is returned unchanged (a local path or a hub id)."""
    path = str(path)
    if not path.startswith(SCHEME):
        return path
    return str(Path(str(files("synpref"))) / path[len(SCHEME) :])


def sample(name: str) -> str:
    """The installed path of a sample-data file, e.g. `sample("test_prefs.jsonl")`."""
    return resolve(f"{SCHEME}sample/{name}")
