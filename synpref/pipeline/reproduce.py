"""`synpref reproduce`: run the paper's stages through the same CLI, rerunning exactly the stale ones."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from synpref.core.errors import SynprefError
from synpref.core.outputs import OutputLock
from synpref.core.resources import config_path, resolve
from synpref.core.secrets import remember_env_keys
from synpref.core.tracking import store_errors
from synpref.core.tracking import tracking_uri as default_tracking_uri
from synpref.pipeline.grid import ArmStage, Study, check_k, expand, label, select
from synpref.pipeline.invocation import INVOCATION
from synpref.pipeline.parent_run import (
    STAGE_TAG,
    end_parent,
    log_headline,
    parent_run,
    pipeline_config_paths,
    pipeline_params,
    previous_parent,
    same_params,
    verdict,
)
from synpref.pipeline.services import Service, ServiceError, Services, for_stages
from synpref.pipeline.stage_process import Interrupted, log_tail, run_process
from synpref.pipeline.stages import (
    ContentHashes,
    Stage,
    fingerprint,
    input_paths,
    is_done,
    marker_path,
    owned_records_args,
    plan,
    stage_argv,
    tracking_args,
    with_overlays,
)

__all__ = ["Stage", "is_done", "reproduce"]

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


def run_stage(
    stage: Stage, state: Path, client, parent: str, experiment: str, uri: str, extra: list[str] = []
) -> float:
    """Run one stage as `python -m synpref ... <extra>`, a child of the parent run; seconds taken. A
    failure or a signal ends the parent run and exits with a message (no traceback)."""
    tags = {"mlflow.parentRunId": parent, STAGE_TAG: stage.name}
    cmd = [sys.executable, "-m", "synpref", *stage_argv(stage), *tracking_args(stage, experiment, uri, tags), *extra]
    log_path = state / "logs" / f"{stage.name}.log"
    start = time.perf_counter()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", "SYNPREF_PIPELINE_STAGE": stage.name}
        code = run_process(cmd, log_path, env)
    except Interrupted as e:
        name, code = e.args
        end_parent(client, parent, "KILLED", f"interrupted by {name} in stage {stage.name!r}", stage.name)
        print(
            f"synpref: interrupted by {name}: stage {stage.name!r} stopped (exit {code}) and is not marked "
            f"done; run the same command again to redo it",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.Signals[name].value) from None
    if code != 0:
        client.log_artifact(parent, str(log_path), "logs")
        end_parent(client, parent, "FAILED", f"stage {stage.name!r} failed (exit {code})", stage.name)
        tail = "\n".join("  " + line for line in log_tail(log_path))
        resume = shlex.join(["synpref", *INVOCATION]) if INVOCATION[:1] == ["reproduce"] else "synpref reproduce ..."
        raise SystemExit(
            f"synpref: error: stage {stage.name!r} failed (exit {code})\n"
            f"last lines of {log_path}:\n{tail}\n"
            f"rerun it alone:  {shlex.join(['synpref', *stage_argv(stage)])}\n"
            f"or resume the pipeline (up-to-date stages are skipped):  {resume}"
        )
    missing = [p for p in stage.outputs if not Path(resolve(p)).exists()]
    if missing:  # a marker now would mark it done, and its absent outputs would rerun it forever
        end_parent(client, parent, "FAILED", f"stage {stage.name!r} did not write {missing}", stage.name)
        raise SynprefError(
            f"stage {stage.name!r} exited 0 but did not write its declared outputs {missing} (log: {log_path}); "
            f"fix the stage's `outputs:` in the pipeline file, or its config so that it writes them"
        )
    return time.perf_counter() - start


def arm_label(study: Study, spec: str) -> str:
    """The evaluated label of the arm `var=value,...` names: its last round."""
    arm = select(study, spec)
    return label(arm, "eval", arm["rounds"])


def log_arm_params(client, parent: str, stage_name: str, arm: ArmStage) -> None:
    """The arm's variables (`arm.k`, `arm.rule`, ..., `arm.synthetic_pairs`) as params of the stage's
    latest run, so the MLflow UI can plot win rate against them."""
    from mlflow.entities import Param

    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`{STAGE_TAG}` = '{stage_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return
    params = arm.params()
    if arm.pairs_stats and Path(arm.pairs_stats).exists():
        params["arm.synthetic_pairs"] = str(json.loads(Path(arm.pairs_stats).read_text())["pairs"])
    elif arm.values.get("data") == "ultrafeedback":
        params["arm.synthetic_pairs"] = "0"
    have = runs[0].data.params
    client.log_batch(runs[0].info.run_id, params=[Param(k, v) for k, v in params.items() if k not in have])


def reproduce(
    stages: list[Stage],
    experiment: str = "synpref",
    tracking_uri: Optional[str] = None,
    state_dir: str = "artifacts/pipeline",
    run_name: str = "pipeline",
    comparison_csv: Optional[str] = None,
    force: list[str] = [],
    dry_run: bool = False,
    build_tiny_model: Optional[str] = None,
    services: list[Service] = [],
    study: Optional[Study] = None,
    overlays: dict[str, list[str]] = {},
    build_model: dict[str, str] = {},
    mirror: Optional[str] = None,
) -> Optional[str]:
    """Run the stages that are stale (docs/pipeline.md); each is its own MLflow run, all children of
    one parent run, which ends with the comparison table, headline metrics and a one-line verdict.

    Args:
        stages: the stages, in order; each may `needs` earlier ones (see configs/paper.yaml).
        experiment: MLflow experiment holding every run of the pipeline.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db.
        state_dir: where done-markers, stage logs and the parent run id live.
        run_name: the parent run's name.
        comparison_csv: where the final table is written as CSV (default: state_dir/comparison.csv).
        force: stage names to run again even if up to date (their downstream stages rerun too).
        dry_run: print what would run and why, run nothing.
        build_tiny_model: for the offline tiny configs: build the tiny model at this path first
            (skipped when it exists).
        services: servers some stages need (e.g. `transformers serve` for served generation):
            started before a stage needing one runs, stopped before one that does not, and on
            failure, Ctrl-C or SIGTERM (synpref.pipeline.services).
        study: a scaling grid (synpref.pipeline.grid, docs/scaling.md): arms expanded into pairs, DPO and
            evaluation stages after `stages`, sharing every stage whose settings they share; the
            end adds the scaling table, curves and head-to-head comparisons.
        overlays: config files added to every stage (grid stages included) that composes a given one,
            after the stage's own files: `{configs/sft.yaml: [configs/rehearsal/sft.yaml]}`
            (configs/rehearsal.yaml). A key no stage composes is an error.
        build_model: HF model directories to build first, each from a preset (`synpref build-model`):
            `{artifacts/rehearsal/base: qwen2.5-0.5b}`; kept when present.
        mirror: write the packaged sample as hub-layout folders here first (`synpref mirror`).
    """
    # `config:` entries are found relative to the pipeline file (synpref.core.resources.config_path).
    here = (pipeline_config_paths(INVOCATION) or [None])[-1] if INVOCATION[:1] == ["reproduce"] else None
    stages = [replace(s, config=[config_path(c, here) for c in s.config]) for s in stages]
    if study is not None:
        located = {
            k: [config_path(c, here) for c in getattr(study, k)] for k in ("dpo_config", "eval_config", "sample_config")
        }
        study = replace(study, **located)
    uri = tracking_uri or default_tracking_uri()
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # One pipeline per state folder: a second one would train into the same exports and markers.
    lock = OutputLock(
        state, "synpref reproduce, process", "wait for it to end (or stop it), or give this pipeline another state_dir"
    )
    if not dry_run:
        lock.acquire()
    try:
        if not dry_run:  # what the stages read, made first (each kept when present)
            from synpref.presets import build_preset_model, build_tiny

            if build_tiny_model:
                build_tiny(build_tiny_model)
            for out, preset in build_model.items():
                build_preset_model(preset, out)
            if mirror:
                from synpref.data.mirror import write_mirrors

                write_mirrors(mirror)
        args = (experiment, uri, state, run_name, comparison_csv, force, dry_run, services, study, overlays)
        return _reproduce(stages, *args)
    finally:
        lock.release()


def _reproduce(stages, experiment, uri, state, run_name, comparison_csv, force, dry_run, services, study, overlays):
    import mlflow

    arm_stages: dict[str, ArmStage] = {}
    if study is not None:
        extra, arm_stages = expand(study, stages)
        stages = list(stages) + extra
    stages = with_overlays(stages, overlays)
    hashes = ContentHashes(state / "content_hashes.json")
    steps = plan(stages, state, force, hashes)
    by_name = {s.name: s for s in stages}
    check_k(arm_stages, by_name, {stage.name: current["config"] for stage, _, current in steps})
    Services(services, list(by_name), state)  # its stage names checked before anything runs
    for _, _, current in steps:  # every key a stage reads, masked wherever its output goes
        remember_env_keys(current["config"])
    total = len(steps)
    if dry_run:
        for i, (stage, why, _) in enumerate(steps, 1):
            print(f"[{i}/{total}] {stage.name} … " + (f"would run ({why})" if why else "up to date"))
        print(f"dry run: {sum(1 for _, why, _ in steps if why)} of {total} stages would run")
        return None
    for stage, why, _ in steps:  # what will run is not done from now on, whatever happens next
        if why:
            marker_path(state, stage).unlink(missing_ok=True)
    client = mlflow.MlflowClient(uri)
    kept = [stage.name for stage, why, _ in steps if not why]
    params = pipeline_params([c["config"] for *_, c in steps])
    with store_errors(uri):  # an unusable store ends in one line, before any stage runs
        old = previous_parent(client, state)
    h2h = [[arm_label(study, name) for name in pair] for pair in study.head_to_head] if study else []
    if len(kept) == total and old is not None and old.info.status == "FINISHED" and same_params(old, params):
        # Nothing to run: the finished parent already holds this result; show it, touch nothing.
        for i, (stage, _, _) in enumerate(steps, 1):
            print(f"[{i}/{total}] {stage.name} … skipped (up to date)", flush=True)
        return _result(client, experiment, uri, old.info.run_id, stages, state, comparison_csv, h2h, finished=True)
    with store_errors(uri):
        parent = parent_run(client, experiment, state, run_name, params, kept)
    with for_stages(services, [s.name for s in stages], state) as servers:
        for i, (stage, why, current) in enumerate(steps, 1):
            if not why:
                print(f"[{i}/{total}] {stage.name} … skipped (up to date)", flush=True)
                continue
            print(f"[{i}/{total}] {stage.name} … running ({why})", flush=True)
            try:
                servers.need(stage.name)
            except ServiceError as e:
                end_parent(
                    client, parent, "FAILED", f"a service of stage {stage.name!r} did not start: {e}", stage.name
                )
                raise
            # The inputs as this stage reads them, now that the stages before it have finished.
            record = fingerprint(current["config"], {p: hashes.digest(p) for p in input_paths(stage, by_name)})
            hashes.save()
            extra = owned_records_args(current["config"], stage.name in force)
            seconds = run_stage(stage, state, client, parent, experiment, uri, extra)
            record.update(
                stage=stage.name,
                command=shlex.join(["synpref", *stage_argv(stage)]),
                seconds=round(seconds, 1),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            tmp = marker_path(state, stage).with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1, default=str))
            tmp.replace(marker_path(state, stage))
            client.log_metric(parent, f"stage_seconds/{stage.name}", seconds)
            if stage.name in arm_stages:
                log_arm_params(client, parent, stage.name, arm_stages[stage.name])
            print(f"[{i}/{total}] {stage.name} … done in {duration(seconds)}", flush=True)
    table = _result(client, experiment, uri, parent, stages, state, comparison_csv, h2h, finished=False)
    if "synpref.failed_stage" in client.get_run(parent).data.tags:  # left by an earlier failed attempt
        client.delete_tag(parent, "synpref.failed_stage")
    client.set_terminated(parent, status="FINISHED")
    return table


def _result(client, experiment, uri, parent, stages, state, comparison_csv, h2h, finished: bool) -> Optional[str]:
    """Print the table, verdict, figures and the MLflow line of a pipeline run; log them to the
    parent unless it is `finished` (history is only read)."""
    from synpref.reporting.compare import compare, eval_runs

    rows = eval_runs(experiment, uri, parent)
    table = None
    if rows:
        # compare() logs the table (win_rates.md), the CSV and the figures to the parent run.
        table = compare(
            experiment,
            tracking_uri=uri,
            csv=comparison_csv or str(state / "comparison.csv"),
            parent_run_id=parent,
            figures_dir=str(state),
            head_to_head=h2h,
            log_to_parent=not finished,
        )
        print("verdict: " + (verdict(rows) if finished else log_headline(client, parent, rows)))
    figures = sorted(
        {
            str(png)
            for s in stages
            for out in s.outputs
            for png in (Path(out) if Path(out).is_dir() else Path(out).parent).glob("*.png")
        }
    )
    figures += sorted(str(p) for p in state.glob("*.png"))
    print("figures:\n" + "\n".join(f"  {p}" for p in figures))
    if not rows and not finished:
        client.set_tag(parent, "mlflow.note.content", f"{len(stages)} stages done; no evaluation stage")
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (experiment {experiment!r}, parent run {parent})")
    return table
