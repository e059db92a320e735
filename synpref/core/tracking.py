"""MLflow at the bottom of the stack: the tracking URI, the run's MLflow loggers, artifact logging."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from synpref.core.errors import SynprefError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "synpref"
# On a pipeline's parent run: {stage: run id} of the earlier runs it reuses (stages that were up to
# date). They stay children of the parent that made them: history is never re-parented.
REUSED_RUNS_TAG = "synpref.reused_runs"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingError(SynprefError):
    """The MLflow store cannot be used: where it is, what failed, what to do."""


@contextlib.contextmanager
def store_errors(uri: str, hint: str = "") -> Iterator[None]:
    """Around the first contact with the MLflow store: its failure becomes a TrackingError naming
    the store (and its file, for sqlite), the problem and a fix; `hint` adds a command's own way out."""
    try:
        yield
    except SynprefError:
        raise
    except Exception as e:
        raise TrackingError(store_problem(uri, e) + (f", {hint}" if hint else "")) from e


def store_problem(uri: str, error: BaseException) -> str:
    text = " ".join(str(error).split())
    where = f"MLflow store {uri}"
    if uri.startswith("sqlite:///"):
        where += f" ({Path(uri[len('sqlite:///') :]).resolve()})"
    elsewhere = "or point MLFLOW_TRACKING_URI at another store"
    if "locked" in text:
        problem = "the database is locked by another process (waited for it)"
        fix = f"wait for the other run to end, {elsewhere}"
    elif "readonly" in text or "read-only" in text or isinstance(error, PermissionError):
        problem = "read-only: cannot write there"
        fix = f"make the file and its folder writable, {elsewhere}"
    elif "unable to open database file" in text or isinstance(error, (FileExistsError, NotADirectoryError)):
        problem = "cannot open or create the database file"
        fix = f"make its folder a writable directory, {elsewhere}"
    else:
        problem = f"{type(error).__name__}: {text[:300]}"
        fix = f"check that the store is reachable, {elsewhere}"
    return f"{where}: {problem}; {fix}"


# MLflow's default artifact places, as absolute paths: <folder>/mlruns/<experiment>[/<run>/artifacts].
_ABSOLUTE_ARTIFACTS = re.compile(r"^(?:file://)?(/.*)/mlruns/(\d+(?:/[0-9a-f]+/artifacts)?)$")


def relative_store(uri: str) -> Optional[Path]:
    """The sqlite file of a store named relative to the working directory (the default
    `sqlite:///mlflow.db`); None for any other store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return Path(uri[len("sqlite:///") :])
    return None


def keep_artifacts_relative(uri: str) -> None:
    """In a relative sqlite store, make MLflow's absolute default artifact paths relative
    (`mlruns/<experiment>/<run>/artifacts`), resolved like the store itself against the working
    directory: a moved or copied project folder then reads and writes its own artifacts.

    MLflow writes absolute paths when it creates an experiment or run; this runs before each
    synpref command logs anything. A path is left alone unless it is this folder's or the folder
    has an `mlruns/` of its own (a moved or copied project), so artifacts a user put elsewhere stay.
    """
    db = relative_store(uri)
    if db is None or not db.is_file():
        return
    here, own = Path.cwd().resolve(), Path("mlruns").is_dir()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        for table, key, column in (
            ("experiments", "experiment_id", "artifact_location"),
            ("runs", "run_uuid", "artifact_uri"),
        ):
            query = f"SELECT {key}, {column} FROM {table} WHERE {column} LIKE '%/mlruns/%'"
            for row_key, location in con.execute(query).fetchall():
                match = _ABSOLUTE_ARTIFACTS.match(location or "")
                if match and (own or Path(match.group(1)).resolve() == here):
                    con.execute(
                        f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (f"mlruns/{match.group(2)}", row_key)
                    )


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if new, its artifact paths kept relative (keep_artifacts_relative):
    runs created in it afterwards inherit relative paths, so no second rewrite is needed."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    keep_artifacts_relative(uri)
    return exp_id


def mlflow_loggers(trainer) -> list:
    """The trainer's MLflow loggers ([] when the run logs elsewhere or not at all)."""
    # Imported here: the commands that only read MLflow (compare) need no Lightning.
    from lightning.pytorch.loggers import MLFlowLogger

    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def log_artifacts(trainer, paths: Iterable[str | Path], artifact_path: Optional[str] = None) -> None:
    """Each file into every MLflow run of the trainer, under `artifact_path` (None: the run's root)."""
    paths = list(paths)
    for logger in mlflow_loggers(trainer):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


@dataclass
class RunTracking:
    """Where a plain-function command (`synpref pairs`) logs its MLflow run; `synpref reproduce` fills it in.

    Args:
        experiment: MLflow experiment name.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db.
        run_name: the run's name.
        tags: run tags (the pipeline's parent run id and stage name).
    """

    experiment: str = "synpref"
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)

    def start(self, client) -> str:
        """Create the run (and the experiment if new); its id. An unusable store is a TrackingError."""
        with store_errors(client.tracking_uri):
            exp_id = experiment_id(client, self.experiment, self.tracking_uri or tracking_uri())
            run_id = client.create_run(exp_id, run_name=self.run_name, tags=self.tags).info.run_id
        return run_id


def pipeline_runs(client, parent_run_id: str, query: str = "") -> list:
    """A pipeline's runs, oldest first: the parent's children and the earlier runs it reuses
    (REUSED_RUNS_TAG), those matching `query` (an MLflow filter string) where one is given."""
    import json

    parent = client.get_run(parent_run_id)
    own = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and {query}" if query else "")
    runs = client.search_runs([parent.info.experiment_id], own, max_results=5000)
    reused = list(json.loads(parent.data.tags.get(REUSED_RUNS_TAG, "{}")).values())
    if reused:
        ids = ", ".join(f"'{r}'" for r in reused)
        filter_ = f"attributes.run_id IN ({ids})" + (f" and {query}" if query else "")
        runs += client.search_runs([parent.info.experiment_id], filter_, max_results=5000)
    return sorted(runs, key=lambda r: r.info.start_time)
