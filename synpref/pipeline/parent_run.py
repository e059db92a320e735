"""The pipeline's parent MLflow run: params from the stages' configs, per-arm headline metrics, the verdict, its end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from synpref.core.tracking import REUSED_RUNS_TAG, experiment_id, pipeline_runs
from synpref.pipeline.invocation import INVOCATION
from synpref.reporting.report import judge_results

STAGE_TAG = "synpref.pipeline_stage"


def _distinct(configs: list[dict], key: str, module: str = "") -> list:
    values = [c[key] for c in configs if key in c and c.get("model.class_path", "").endswith(module)]
    return [v for i, v in enumerate(values) if v is not None and v not in values[:i]]


def _reward_name(config: dict) -> Optional[str]:
    cls = config.get("model.init_args.reward.class_path")
    if not cls:
        return None
    arg = next(
        (
            config[f"model.init_args.reward.init_args.{k}"]
            for k in ("model", "model_name_or_path", "fn")
            if config.get(f"model.init_args.reward.init_args.{k}")
        ),
        None,
    )
    return cls.rsplit(".", 1)[-1] + (f"({arg})" if arg else "")


def pipeline_config_paths(argv: list[str]) -> list[str]:
    return [
        a.split("=", 1)[1] if a.startswith("--config=") else a
        for i, a in enumerate(argv)
        if a.startswith("--config=") or (i and argv[i - 1] == "--config")
    ]


def pipeline_params(configs: list[dict]) -> dict[str, str]:
    """The parent run's params, read from the stages' resolved configs."""
    judges = [c for c in configs if c.get("model.class_path", "").endswith("WinRateModule")]
    rewards = [r for r in dict.fromkeys(map(_reward_name, judges or configs)) if r]
    values = {
        "pipeline_config": pipeline_config_paths(INVOCATION) if INVOCATION[:1] == ["reproduce"] else [],
        "seed": _distinct(configs, "seed_everything"),
        "base_model": _distinct(configs, "model.init_args.policy.name_or_path", "SFTModule"),
        "reward": rewards,
        "n_prompts": _distinct(configs, "data.init_args.max_prompts", "WinRateModule"),
    }
    return {k: ", ".join(map(str, v)) for k, v in values.items() if v}


def previous_parent(client, state_dir: Path):
    """The parent run recorded in the state folder (None: none, or the store was replaced)."""
    from mlflow.exceptions import MlflowException

    saved = state_dir / "parent_run.json"
    if not saved.exists():
        return None
    try:
        return client.get_run(json.loads(saved.read_text())["run_id"])
    except (MlflowException, ValueError, KeyError):
        return None


def same_params(run, params: dict) -> bool:
    return all(run.data.params.get(k, v) == v for k, v in params.items())


def parent_run(client, experiment: str, state_dir: Path, run_name: str, params: dict, kept: list[str]) -> str:
    """The pipeline's parent MLflow run for this invocation.

    A parent left RUNNING by a pipeline that died (kill -9, a crash; the state folder's lock says
    none is alive) is continued when its params match. A finished, failed or killed parent is
    history: it never goes back to RUNNING. A new parent lists the latest run of every stage it
    does not run again under REUSED_RUNS_TAG (and its predecessor under `synpref.previous_parent`),
    so it still holds the whole pipeline, without taking those runs from the parent that made them.
    """
    from mlflow.entities import Param

    old = previous_parent(client, state_dir)
    if old is not None and old.info.status == "RUNNING":
        if same_params(old, params):
            new = [Param(k, v) for k, v in params.items() if k not in old.data.params]
            client.log_batch(old.info.run_id, params=new)
            return old.info.run_id
        client.set_tag(old.info.run_id, "mlflow.note.content", "its pipeline process died; a later run replaced it")
        client.set_terminated(old.info.run_id, status="KILLED")
    exp_id = experiment_id(client, experiment, client.tracking_uri)
    tags = {"synpref.stage": "pipeline"}
    if old is not None:
        latest = {run.data.tags.get(STAGE_TAG): run.info.run_id for run in pipeline_runs(client, old.info.run_id)}
        tags[REUSED_RUNS_TAG] = json.dumps({name: latest[name] for name in kept if name in latest})
        tags["synpref.previous_parent"] = old.info.run_id
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    (state_dir / "parent_run.json").write_text(json.dumps({"run_id": run_id, "experiment": experiment}))
    return run_id


def _arms(rows: list[dict]) -> list[str]:
    arms = [Path(r["model"]).name for r in rows]
    common = os.path.commonprefix(arms) if len(arms) > 1 else ""
    common = common[: common.rfind("_") + 1]  # drop a shared whole-word prefix such as `dpo_`
    return [arm[len(common) :] for arm in arms]


def verdict(rows: list[dict]) -> str:
    """One line naming its judges: the independent ones first (a judge that labelled no compared arm's
    pairs), then each self-judged one with the arms it labelled; each judge's arms by win rate [95% CI]
    against the baseline, best first by the leading judge; N. Without an independent judge it says so."""
    arms, judged = _arms(rows), [judge_results(r) for r in rows]
    labels = list(dict.fromkeys(label for j in judged for label in j))
    self_for = {label: [a for a, j in zip(arms, judged) if j.get(label, {}).get("self_judged")] for label in labels}
    ordered = [label for label in labels if not self_for[label]] + [label for label in labels if self_for[label]]
    lead = ordered[0]
    order = sorted(range(len(rows)), key=lambda i: -judged[i].get(lead, {}).get("win_rate", -1.0))
    baselines = " / ".join(dict.fromkeys(Path(r["baseline"]).name or "baseline" for r in rows))
    segments = []
    for label in ordered:
        kind = f"self-judged for {', '.join(self_for[label])}" if self_for[label] else "independent"
        parts = [
            f"{arms[i]} {100 * m['win_rate']:.0f}% [{100 * m['win_rate_ci_low']:.0f}, {100 * m['win_rate_ci_high']:.0f}]"
            for i in order
            if (m := judged[i].get(label)) and m.get("win_rate") is not None
        ]
        segments.append(f"{label} ({kind}): " + " vs ".join(parts) + (f" vs {baselines}" if label == lead else ""))
    if not any(not self_for[label] for label in labels):
        segments.append("no independent judge configured (add one under `judges:`)")
    return "; ".join(segments) + ", N = " + " / ".join(dict.fromkeys(str(r["n"]) for r in rows))


def log_headline(client, parent: str, rows: list[dict]) -> str:
    """Per-arm headline metrics and the one-line verdict (the run description) on the parent run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{name}/{Path(r['model']).name}", r[key], now, 0)
        for r in rows
        for name, key in (
            ("win_rate", "win_rate"),
            ("win_rate_ci_low", "win_rate_ci_low"),
            ("win_rate_ci_high", "win_rate_ci_high"),
            ("avg_reward", "avg_reward_policy"),
        )
        if r.get(key) is not None
    ]
    # Each judge's win rate too, so an independent judge's number sits beside the primary's.
    metrics += [
        Metric(f"{name}/{label}/{Path(r['model']).name}", m[name], now, 0)
        for r in rows
        for label, m in (r.get("judges") or {}).items()
        for name in ("win_rate", "win_rate_ci_low", "win_rate_ci_high")
        if m.get(name) is not None
    ]
    client.log_batch(parent, metrics=metrics)
    line = verdict(rows)
    client.set_tag(parent, "mlflow.note.content", line)
    return line


def end_parent(client, parent: str, status: str, note: str, stage: str) -> None:
    """End the parent FAILED or KILLED, naming the stage; that stage's own run, if the stage died
    before closing it, gets the same status instead of staying "Running"."""
    exp_id = client.get_run(parent).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent}' and tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([exp_id], query):
        client.set_terminated(run.info.run_id, status=status)
    client.set_tag(parent, "synpref.failed_stage", stage)
    client.set_tag(parent, "mlflow.note.content", note)
    client.set_terminated(parent, status=status)
