"""`synpref compare`: the paper's Table 1 (win rate vs SFT with CI, average reward) from MLflow runs."""

from __future__ import annotations

import csv as csv_module
import logging
from pathlib import Path
from typing import Optional

from synpref.core.errors import ConfigError
from synpref.core.tracking import pipeline_runs, store_errors
from synpref.core.tracking import tracking_uri as default_tracking_uri
from synpref.reporting.replies import REPLIES_TABLE, replies
from synpref.reporting.replies import show as show_replies
from synpref.reporting.report import (
    judge_columns,
    judge_fields,
    judge_results,
    judges_table,
    model_cell,
    power_lines,
    self_judged_warnings,
)

log = logging.getLogger(__name__)

# Row keys; the run's metrics are these under METRIC_PREFIX (`eval/win_rate`, ...).
COLUMNS = [
    "model",
    "path",
    "baseline",
    "reward_model",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "tie_rate",
    "loss_rate",
    "sign_test_p",
    "avg_reward_policy",
    "avg_reward_baseline",
    "avg_length_policy",
    "avg_length_baseline",
    "length_matched_win_rate",
    "length_controlled_win_rate",
    "self_judged",
    "reward_stderr_policy",
    "reward_stderr_baseline",
    "n",
    "run_id",
    "run_name",
]
METRIC_PREFIX = "eval/"
RATE_COLUMNS = COLUMNS[4:-2]


def eval_runs(experiment: str, tracking_uri: Optional[str] = None, parent_run_id: Optional[str] = None) -> list[dict]:
    """One row per evaluated policy: the latest `synpref predict` eval run (an `eval/win_rate` metric and
    a `baseline_name` param; DPO runs with in-training evaluation log `eval/baseline_name`) for each
    (policy path, baseline, reward), sorted by policy name; only children of `parent_run_id` if given.
    Row keys are COLUMNS: the metric names without the `eval/` prefix, `model` the short name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or default_tracking_uri())
    with store_errors(tracking_uri or default_tracking_uri()):
        exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(
            "experiment", f"no MLflow experiment {experiment!r} at {tracking_uri or default_tracking_uri()}"
        )
    query = f"metrics.`{METRIC_PREFIX}win_rate` >= 0"
    if parent_run_id:
        runs = pipeline_runs(client, parent_run_id, query)
    else:
        runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5000)
    latest: dict[tuple, dict] = {}
    for run in runs:
        p, m = run.data.params, run.data.metrics
        if "baseline_name" not in p:
            continue
        row = {k: m[METRIC_PREFIX + k] for k in COLUMNS if METRIC_PREFIX + k in m}
        row.update(
            model=p.get("policy_name", run.info.run_name),
            path=p.get("policy_path", ""),
            baseline=p["baseline_name"],
            reward_model=p.get("reward", ""),
            n=int(m.get(METRIC_PREFIX + "n", p.get("n_prompts", 0))),
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            **judge_fields(m),
        )
        arm = {k[len("arm.") :]: v for k, v in p.items() if k.startswith("arm.")}
        if arm:  # an arm of a scaling grid (synpref.pipeline.grid)
            row["arm"] = arm
        latest[(row["path"] or row["model"], row["baseline"], row["reward_model"])] = row  # later runs replace earlier
    return sorted(latest.values(), key=lambda r: (r["model"], r["path"], r["baseline"], r["reward_model"]))


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown_table(rows: list[dict]) -> str:
    """Model | win rate vs baseline [95% CI] | tie rate | sign-test p | average rewards | length-matched
    and length-controlled win rates | N | path; a model judged by the scorer that labelled its pairs is marked."""
    lines = [
        "| model | win rate vs SFT [95% CI] | tie rate | p (sign test) | avg reward | avg reward SFT "
        "| length-matched win rate | LC win rate | N | path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"{_pct(r.get('win_rate'))} [{_pct(r.get('win_rate_ci_low'))}, {_pct(r.get('win_rate_ci_high'))}]"
        lines.append(
            f"| {model_cell(r)} | {ci} | {_pct(r.get('tie_rate'))} | {_num(r.get('sign_test_p'), '.3g')} "
            f"| {_num(r.get('avg_reward_policy'))} | {_num(r.get('avg_reward_baseline'))} "
            f"| {_pct(r.get('length_matched_win_rate'))} | {_pct(r.get('length_controlled_win_rate'))} | {r['n']} "
            f"| {r.get('path', '')} |"
        )
    return "\n".join(lines)


def compare(
    experiment: str,
    tracking_uri: Optional[str] = None,
    csv: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    figures_dir: Optional[str] = None,
    head_to_head: list[list[str]] = [],
    log_to_parent: bool = True,
    show: int = 0,
) -> str:
    """Read the experiment's `synpref predict --config configs/eval.yaml` runs; print and return the
    table as markdown, and write it as CSV.

    Args:
        experiment: MLflow experiment name (configs/tiny: synpref-tiny).
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db.
        csv: CSV output path (all columns, rates as fractions); none written if omitted.
        parent_run_id: only the runs of this pipeline run (its children and the runs it reuses); the table (win_rates.md,
            and the CSV and figures when written) is also logged to that run.
        figures_dir: write win_rates.png (Figure 1) and avg_rewards.png (Figure 2) of all rows here;
            for a scaling grid also scaling.csv, win_rate_vs_pairs.png and win_rate_per_round.png.
        head_to_head: pairs of arms (their labels or model names) compared prompt by prompt: the
            difference of their win rates with a paired 95% interval and the prompts needed to
            resolve it (synpref.reporting.study_report).
        log_to_parent: log the table to `parent_run_id` (False: a finished run, only read); with it goes
            `replies.json`, an MLflow table of every arm's reply beside the baseline's on each prompt.
        show: print this many prompts with every arm's reply beside the baseline's and each judge's
            verdict, those where judges or arms disagree first (synpref.reporting.replies).
    """
    from mlflow import MlflowClient

    from synpref.reporting.study_report import study_report

    rows = eval_runs(experiment, tracking_uri, parent_run_id)
    if not rows:
        raise ConfigError(
            "experiment",
            f"experiment {experiment!r} has no eval run (an {METRIC_PREFIX}win_rate metric) "
            f"(run `synpref predict --config configs/eval.yaml` first)",
        )
    parts = [
        markdown_table(rows),
        judges_table(rows),
        "\n".join(self_judged_warnings(rows)),
        # A grid's arms are compared pairwise by the head-to-head table (paired N) instead.
        "" if any(r.get("arm") for r in rows) else "\n".join(power_lines(rows)),
    ]
    client = MlflowClient(tracking_uri or default_tracking_uri())
    study_text, study_files = study_report(client, rows, head_to_head, Path(figures_dir) if figures_dir else None)
    parts.insert(1, study_text)
    table = "\n\n".join(p for p in parts if p)
    if csv:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        with open(csv, "w", newline="", encoding="utf-8") as f:
            extra, flat = judge_columns(rows)
            writer = csv_module.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(flat)
        log.info("wrote %s", csv)
    figures = write_figures(rows, Path(figures_dir)) if figures_dir else []
    merged = replies(client, rows) if show or (parent_run_id and log_to_parent) else ([], {})
    if parent_run_id and log_to_parent:
        client.log_text(parent_run_id, table + "\n", "win_rates.md")
        for path in ([csv] if csv else []) + figures + study_files:
            client.log_artifact(parent_run_id, str(path))
        if merged[0]:
            client.log_table(parent_run_id, merged[1], REPLIES_TABLE)
    print(table)
    if show and merged[0]:
        print("\n" + show_replies(merged[1], merged[0], show))
    return table


def _rates(m: dict, n) -> dict:
    """A row's (or a judge's) figure values: missing rates as NaN, N."""
    return {k: float("nan") if m.get(k) is None else m[k] for k in RATE_COLUMNS} | {"n": m.get("n", n)}


def figure_series(rows: list[dict]) -> list[tuple[str, dict, bool]]:
    """(label, metrics, self-judged) per model and judge: every judge's win rate gets its bars."""
    series = []
    for r in rows:
        judges = judge_results(r)
        for label, m in judges.items():
            name = r["model"] if not r.get("judges") else f"{r['model']}\n{label}"
            series.append((name, _rates(m, r["n"]), bool(m.get("self_judged"))))
    return series


def write_figures(rows: list[dict], out: Path) -> list[Path]:
    """The paper's Figure 1 per model and judge (a self-judged one hatched and labelled so) and Figure 2
    (the primary judge's average rewards) over all compared models (baseline: the first row's)."""
    from synpref.core.metrics import plot_average_rewards, plot_win_rates

    out.mkdir(parents=True, exist_ok=True)
    baseline = rows[0]["baseline"] or "baseline"
    series = figure_series(rows)
    plot_win_rates([(n, m) for n, m, _ in series], out / "win_rates.png", baseline, [s for *_, s in series])
    primary = [(r["model"] + (" (self-judged)" if r.get("self_judged") else ""), _rates(r, r["n"])) for r in rows]
    plot_average_rewards(primary, out / "avg_rewards.png", baseline)
    return [out / "win_rates.png", out / "avg_rewards.png"]
