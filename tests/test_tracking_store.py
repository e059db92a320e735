"""An MLflow store that cannot be used (not creatable, locked, read-only) is a named error saying where it is."""

from __future__ import annotations

import sqlite3

import mlflow
import pytest

from synpref.core.tracking import RunTracking, TrackingError, store_errors
from tests.test_cli import FAST
from tests.test_errors import fails


def test_fit_with_a_store_that_cannot_be_created_fails_before_training(in_tmp, capsys, monkeypatch):
    (in_tmp / "not-a-folder").write_text("a file where the store's folder should be\n")
    uri = f"sqlite:///{in_tmp / 'not-a-folder' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = fails(
        capsys, ["fit", "--config", "configs/tiny/sft.yaml", *FAST], f"MLflow store {uri}", "--trainer.logger=false"
    )
    assert "MLFLOW_TRACKING_URI" in line and "cannot open or create" in line
    assert not (in_tmp / "artifacts" / "tiny" / "sft").exists()  # nothing trained, nothing exported


def test_a_locked_store_is_named(tmp_path, monkeypatch):
    # MLflow waits out a locked sqlite store for 20 s (`PRAGMA busy_timeout = 20000` on each session);
    # what is checked here is the error after the wait, so the wait is cut to 0.2 s.
    import mlflow.store.db.utils as db_utils
    from sqlalchemy import sql

    class ShortBusyTimeout:
        def __getattr__(self, name):
            return getattr(sql, name)

        @staticmethod
        def text(statement):
            return sql.text(statement.replace("busy_timeout = 20000", "busy_timeout = 200"))

    monkeypatch.setattr(db_utils, "sql", ShortBusyTimeout())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("pairs")
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        with pytest.raises(TrackingError, match=rf"MLflow store {uri}.*locked by another process"):
            RunTracking(experiment="pairs").start(mlflow.MlflowClient(uri))
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_read_only_store_is_named(tmp_path):
    """A real read-only sqlite error (root ignores file modes, so it is opened read-only instead)."""
    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("CREATE TABLE runs (id TEXT)")
    uri = f"sqlite:///{db}"
    with pytest.raises(TrackingError, match=rf"MLflow store {uri} \({db}\): read-only"):
        with store_errors(uri):
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                con.execute("INSERT INTO runs VALUES ('x')")
