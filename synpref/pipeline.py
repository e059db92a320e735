"""`synpref reproduce`: run the paper's stages through the same CLI, rerunning exactly the stale ones."""

from __future__ import annotations

import codecs
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from synpref.grid import ArmStage, Study, expand, label, select
from synpref.invocation import INVOCATION
from synpref.parent_run import STAGE_TAG, end_parent, log_headline, parent_run, pipeline_params
from synpref.services import Service, for_stages
from synpref.stages import (
    ContentHashes,
    Stage,
    fingerprint,
    input_paths,
    is_done,
    marker_path,
    plan,
    stage_argv,
    tracking_args,
    with_overlays,
)
from synpref.tracking import tracking_uri as default_tracking_uri

__all__ = ["Stage", "is_done", "reproduce"]

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """reproduce received SIGINT/SIGTERM while a stage ran; the stage has exited."""


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(src, sink, log_file, lock: threading.Lock) -> None:
    """Copy a stage's stream to our own stream and to its log as it arrives (progress bars included)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in iter(lambda: os.read(src.fileno(), 1 << 16), b""):
        with lock:
            log_file.write(chunk)
            log_file.flush()
        sink.write(decoder.decode(chunk))
        sink.flush()


def run_process(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run `cmd` in its own process group, its output streamed and teed to `log_path`; its exit code.

    SIGINT/SIGTERM sent to this process are forwarded to the stage's group (a second one kills it),
    and we wait for it to exit before raising Interrupted: nothing is left running.
    """
    received: list[int] = []
    proc: Optional[subprocess.Popen] = None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            _signal_group(proc.pid, signum if len(received) == 1 else signal.SIGKILL)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log_file:
            # Own session: a terminal's Ctrl-C reaches only us, so the stage gets it exactly once.
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
            )
            if received:
                _signal_group(proc.pid, received[0])
            lock = threading.Lock()
            pumps = [
                threading.Thread(target=_pump, args=(src, sink, log_file, lock), daemon=True)
                for src, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
            ]
            for t in pumps:
                t.start()
            # Wait without reaping, so the group id stays ours while we clear what the stage left in it.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            _signal_group(proc.pid, signal.SIGKILL)
            code = proc.wait()
            for t in pumps:
                t.join()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(signal.Signals(received[0]).name, code)
    return code


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a stage log, a progress bar's `\\r` updates reduced to their final state."""
    text = path.read_bytes()[-(1 << 16) :].decode("utf-8", "replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]


def run_stage(stage: Stage, state: Path, client, parent: str, experiment: str, uri: str) -> float:
    """Run one stage as `python -m synpref ...`, a child of the parent run; seconds taken. A failure
    or a signal ends the parent run and exits with a message (no traceback)."""
    tags = {"mlflow.parentRunId": parent, STAGE_TAG: stage.name}
    cmd = [sys.executable, "-m", "synpref", *stage_argv(stage), *tracking_args(stage, experiment, uri, tags)]
    log_path = state / "logs" / f"{stage.name}.log"
    start = time.perf_counter()
    try:
        code = run_process(cmd, log_path, {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"})
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
            failure, Ctrl-C or SIGTERM (synpref.services).
        study: a scaling grid (synpref.grid, docs/scaling.md): arms expanded into pairs, DPO and
            evaluation stages after `stages`, sharing every stage whose settings they share; the
            end adds the scaling table, curves and head-to-head comparisons.
        overlays: config files added to every stage (grid stages included) that composes a given one,
            after the stage's own files: `{configs/sft.yaml: [configs/rehearsal/sft.yaml]}`
            (configs/rehearsal.yaml). A key no stage composes is an error.
        build_model: HF model directories to build first, each from a preset (`synpref build-model`):
            `{artifacts/rehearsal/base: qwen2.5-0.5b}`; kept when present.
        mirror: write the packaged sample as hub-layout folders here first (`synpref mirror`).
    """
    import mlflow

    from synpref.compare import compare, eval_runs

    if build_tiny_model and not dry_run:
        from synpref.presets import build_tiny

        build_tiny(build_tiny_model)
    arm_stages: dict[str, ArmStage] = {}
    if study is not None:
        extra, arm_stages = expand(study, stages)
        stages = list(stages) + extra
    stages = with_overlays(stages, overlays)
    if not dry_run:
        from synpref.presets import build_preset_model

        for out, preset in build_model.items():
            build_preset_model(preset, out)
        if mirror:
            from synpref.data.mirror import write_mirrors

            write_mirrors(mirror)
    uri = tracking_uri or default_tracking_uri()
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    hashes = ContentHashes(state / "content_hashes.json")
    try:
        steps = plan(stages, state, force, hashes)
    except ValueError as e:
        raise SystemExit(f"synpref: error: {e}") from None
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
    parent = parent_run(client, experiment, state, run_name, pipeline_params([c["config"] for *_, c in steps]), kept)
    by_name = {s.name: s for s in stages}
    with for_stages(services, [s.name for s in stages], state) as servers:
        for i, (stage, why, current) in enumerate(steps, 1):
            if not why:
                print(f"[{i}/{total}] {stage.name} … skipped (up to date)", flush=True)
                continue
            print(f"[{i}/{total}] {stage.name} … running ({why})", flush=True)
            servers.need(stage.name)
            # The inputs as this stage reads them, now that the stages before it have finished.
            record = fingerprint(current["config"], {p: hashes.digest(p) for p in input_paths(stage, by_name)})
            hashes.save()
            seconds = run_stage(stage, state, client, parent, experiment, uri)
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
            head_to_head=[[arm_label(study, name) for name in pair] for pair in study.head_to_head] if study else [],
        )
        print("verdict: " + log_headline(client, parent, rows))
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
    if not rows:
        client.set_tag(parent, "mlflow.note.content", f"{total} stages done; no evaluation stage")
    if "synpref.failed_stage" in client.get_run(parent).data.tags:  # left by an earlier failed attempt
        client.delete_tag(parent, "synpref.failed_stage")
    client.set_terminated(parent, status="FINISHED")
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (experiment {experiment!r}, parent run {parent})")
    return table
