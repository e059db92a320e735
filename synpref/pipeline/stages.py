"""Pipeline stages, their fingerprints (resolved config, input contents, synpref version) and the rerun plan."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import synpref
from synpref.core.errors import ConfigError
from synpref.core.fingerprints import DIGEST_FILE, config_changes, file_sha256, flatten, tree_digest
from synpref.core.resources import resolve

# Where results are logged and which files were composed do not change what a stage computes.
NOT_FINGERPRINTED = ("config", "trainer.logger", "tracking")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Plain-function commands a stage may run (module:function); they log through a `tracking` argument.
FUNCTION_COMMANDS = {"pairs": "synpref.pipeline.pair_stage:build_pairs"}


@dataclass
class Stage:
    """One `synpref <command> --config ...` run.

    Args:
        name: stage name (markers, logs, `--force`, `needs`).
        command: the LightningCLI subcommand, or `pairs` (synpref.pipeline.pair_stage).
        config: config files, composed in order.
        args: extra command-line overrides (`--trainer.max_steps=10`).
        needs: earlier stages whose outputs this stage reads: their outputs are part of its
            fingerprint, and it reruns whenever one of them does.
        inputs: other files or folders it reads (e.g. a local data file); their content is part of
            its fingerprint.
        outputs: files or folders the stage writes (e.g. the export folder); they must exist for the
            stage to count as done, and they are what a stage that `needs` it reads.
        run_name: its MLflow run name, distinguishing part first (`synthetic·eval`); default `name`.
    """

    name: str
    command: Literal["fit", "validate", "test", "predict", "pairs"]
    config: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    run_name: Optional[str] = None


def check_graph(stages: list[Stage]) -> None:
    """Names are unique and every `needs` names an earlier stage (list order is a topological order)."""
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise ConfigError(f"stages[{i}].name", f"two stages are named {stage.name!r}")
        for need in stage.needs:
            if need not in seen:
                raise ConfigError(
                    f"stages[{i}].needs", f"stage {stage.name!r} needs {need!r}, which is not an earlier stage"
                )
        seen.add(stage.name)


def with_overlays(stages: list[Stage], overlays: dict[str, list[str]]) -> list[Stage]:
    """Each stage with the overlay files of every config it composes appended to its own, in order
    (an overlay for a file no stage composes is unused: one overlay serves several pipelines)."""
    return [replace(s, config=[*s.config, *(f for c in s.config for f in overlays.get(c, []))]) for s in stages]


def stage_argv(stage: Stage) -> list[str]:
    """`<command> --config a.yaml ... <args>`: the stage as `synpref` arguments."""
    return [stage.command, *(a for cfg in stage.config for a in ("--config", cfg)), *stage.args]


def tracking_args(stage: Stage, experiment: str, uri: str, tags: dict) -> list[str]:
    """The arguments that make a stage log to the pipeline's MLflow experiment, as a child run."""
    name = stage.run_name or stage.name
    if stage.command in LIGHTNING_COMMANDS:
        group = "--trainer.logger.init_args."
        return [f"{group}experiment_name={experiment}", f"{group}tracking_uri={uri}", f"{group}run_name={name}"] + [
            f"{group}tags=" + json.dumps(tags)
        ]
    return [
        f"--tracking.experiment={experiment}",
        f"--tracking.tracking_uri={uri}",
        f"--tracking.run_name={name}",
        "--tracking.tags=" + json.dumps(tags),
    ]


def owned_records_args(config: dict, forced: bool) -> list[str]:
    """The pipeline owns its stages' folders: records made from other inputs are set aside and
    recomputed, not an error, and a forced stage starts afresh (its old records set aside too)."""
    if "model.init_args.on_mismatch" not in config:  # not a resumable predict stage
        return []
    return ["--model.init_args.on_mismatch=set_aside"] + (["--model.init_args.overwrite=true"] if forced else [])


def function_command(command: str):
    """The function behind a FUNCTION_COMMANDS entry."""
    import importlib

    module, name = FUNCTION_COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), name)


class _Resolved(Exception):
    """Carries the parsed config out of the CLI before it seeds or instantiates anything."""


def resolve_config(stage: Stage) -> dict:
    """The stage's config after composition, overrides and defaults (what `--print_config` shows),
    flattened to dotted keys, without the keys in NOT_FINGERPRINTED. Parses only: loads no model."""
    import yaml

    if stage.command in FUNCTION_COMMANDS:
        flat = flatten(yaml.safe_load(_parse_function_stage(stage)))
        return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in NOT_FINGERPRINTED)}
    from synpref.pipeline.lightning_cli import SynprefCLI

    class Resolver(SynprefCLI):
        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            sub = self.config["subcommand"]
            raise _Resolved(self._parser(sub).dump(self.config[sub], skip_none=False, skip_validation=True))

    try:
        with warnings.catch_warnings():  # "args given and sys.argv too": we are `reproduce`, parsing a stage's args
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            Resolver(args=stage_argv(stage))
    except _Resolved as done:
        flat = flatten(yaml.safe_load(done.args[0]))
    except SystemExit as e:  # jsonargparse has printed why
        raise SystemExit(f"synpref: error: stage {stage.name!r}: its config does not parse (exit {e.code})") from None
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in NOT_FINGERPRINTED)}


def _parse_function_stage(stage: Stage) -> str:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(function_command(stage.command), as_group=False)
    try:
        return parser.dump(parser.parse_args(stage_argv(stage)[1:]), skip_none=False)
    except Exception as e:  # jsonargparse's ArgumentError: the message says which argument
        raise SystemExit(f"synpref: error: stage {stage.name!r}: its arguments do not parse: {e}") from None


class ContentHashes:
    """sha256 of files and folders, with a (size, mtime) shortcut cached in `cache_file` so unchanged
    big exports are not read again."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self.cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def _file(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        if self.cache.get(key, [None])[:2] != stamp:
            self.cache[key] = [*stamp, file_sha256(path)]
        return self.cache[key][2]

    def digest(self, path: str) -> Optional[str]:
        """Content digest of a file or of a folder (relative names + file digests); None if missing."""
        p = Path(resolve(path))
        if p.is_file():
            return self._file(p)
        # A model folder's stored digest records mtimes: it is a cache of the content, not content.
        return tree_digest(p, self._file, (DIGEST_FILE,)) if p.is_dir() else None

    def save(self) -> None:
        self.cache_file.write_text(json.dumps(self.cache))


def input_paths(stage: Stage, by_name: dict[str, Stage]) -> list[str]:
    """What the stage reads: the outputs of the stages it needs, then its own `inputs`."""
    return [out for need in stage.needs for out in by_name[need].outputs] + list(stage.inputs)


def fingerprint(config: dict, inputs: dict) -> dict:
    """The marker's record of what made a stage's outputs; `fingerprint` hashes all of it."""
    record = {"synpref_version": synpref.__version__, "config": config, "inputs": inputs}
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return record


def marker_path(state_dir: Path, stage: Stage) -> Path:
    return state_dir / f"{stage.name}.done.json"


def read_marker(state_dir: Path, stage: Stage) -> Optional[dict]:
    path = marker_path(state_dir, stage)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(state_dir: Path, stage: Stage) -> bool:
    """Finished: its marker was written after a zero exit and every declared output still exists."""
    return read_marker(state_dir, stage) is not None and all(Path(p).exists() for p in stage.outputs)


def why_stale(stage: Stage, marker: Optional[dict], current: dict, state_dir: Path) -> Optional[str]:
    """Why a stage must run, given its marker and its current fingerprint; None when it is up to date."""
    if marker is None:
        started_before = (state_dir / "logs" / f"{stage.name}.log").exists()
        return "last run did not finish" if started_before else "new"
    if "fingerprint" not in marker:
        return "marker has no fingerprint (written by an older synpref)"
    missing = [p for p in stage.outputs if not Path(p).exists()]
    if missing:
        return "output missing: " + ", ".join(missing)
    if marker["synpref_version"] != current["synpref_version"]:
        return f"synpref version changed: {marker['synpref_version']} → {current['synpref_version']}"
    if marker["config"] != current["config"]:
        return "config changed: " + config_changes(marker["config"], current["config"])
    changed = [p for p in current["inputs"] if marker["inputs"].get(p) != current["inputs"][p]]
    changed += [p for p in marker["inputs"] if p not in current["inputs"]]
    if changed:
        return "input changed: " + ", ".join(changed)
    return None


def plan(
    stages: list[Stage], state_dir: Path, force: list[str], hashes: ContentHashes
) -> list[tuple[Stage, Optional[str], dict]]:
    """For each stage: (stage, why it runs or None if up to date, its current fingerprint).

    A stage runs when forced, when it has no marker, when its fingerprint differs from its
    marker's, or when a stage it needs (directly or not) runs: by the graph, not the list order.
    """
    check_graph(stages)
    by_name = {s.name: s for s in stages}
    unknown = sorted(set(force) - set(by_name))
    if unknown:
        raise ConfigError("force", f"names unknown stages {unknown}; the stages are {list(by_name)}")
    runs: dict[str, Optional[str]] = {}
    out = []
    for stage in stages:
        current = fingerprint(resolve_config(stage), {p: hashes.digest(p) for p in input_paths(stage, by_name)})
        upstream = [n for n in stage.needs if runs[n]]
        reasons = ["forced"] if stage.name in force else []
        own = why_stale(stage, read_marker(state_dir, stage), current, state_dir)
        reasons.append(own)
        reasons.append("downstream of " + ", ".join(upstream) if upstream and own != "new" else None)
        why = runs[stage.name] = "; ".join(r for r in reasons if r) or None
        out.append((stage, why, current))
    hashes.save()
    return out
