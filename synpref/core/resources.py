"""`synpref://` paths name files shipped inside the package (the sample data, the configs) from any directory."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Optional, Sequence

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


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with each `--config synpref://...` replaced by the installed file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config=" + SCHEME):
            out[i] = "--config=" + resolve(arg[len("--config=") :])
        elif i and out[i - 1] == "--config":
            out[i] = resolve(arg)
    return out


def config_path(path: str, pipeline_file: Optional[str]) -> str:
    """Where a pipeline file's `config:` entry is. A relative entry is looked for next to the pipeline
    file, then in each folder above it (so `configs/tiny/sft.yaml` inside `<root>/configs/tiny/paper.yaml`
    is `<root>/configs/tiny/sft.yaml`, in a checkout or in the installed package), and is otherwise
    left relative to the working directory. Found in the working directory's tree, it stays relative
    to it; `synpref://` entries become the installed file."""
    if path.startswith(SCHEME):
        return resolve(path)
    if Path(path).is_absolute() or not pipeline_file:
        return path
    here = Path(resolve(pipeline_file)).absolute().parent
    found = next((folder / path for folder in (here, *here.parents) if (folder / path).is_file()), None)
    if found is None:
        return path
    try:
        return str(found.relative_to(Path.cwd()))
    except ValueError:
        return str(found)
