"""`synpref compare`: Table 1 from MLflow runs, as markdown and CSV."""

import csv
import json
import struct

import pytest
from mlflow import MlflowClient

from synpref.reporting.compare import compare


def log_eval_run(client, exp_id, policy, metrics, parent=None, name="eval"):
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    params = {
        "policy_name": policy.rsplit("/", 1)[-1],
        "policy_path": policy,
        "baseline_name": "sft",
        "reward": "nemotron",
        "seed": 0,
    }
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, f"eval/{k}", v)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def metrics(win, tie, low, high, reward, base, p, n=100):
    return {
        "win_rate": win,
        "tie_rate": tie,
        "loss_rate": 1 - win - tie,
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "avg_reward_policy": reward,
        "avg_reward_baseline": base,
        "sign_test_p": p,
        "n": n,
        "length_matched_win_rate": 0.5,
    }


def test_table_from_two_runs(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("paper")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    log_eval_run(client, exp, "artifacts/dpo_synthetic", metrics(0.5, 0, 0.4, 0.6, -1.0, -2.0, 1.0), name="old")
    log_eval_run(
        client, exp, "artifacts/dpo_ultrafeedback", metrics(0.64, 0.02, 0.542, 0.727, -3.25, -6.5, 0.004), parent
    )
    log_eval_run(
        client, exp, "artifacts/dpo_synthetic", metrics(0.63, 0.0, 0.5322, 0.7182, -4.125, -6.5, 0.012), parent
    )
    dpo = client.create_run(exp, run_name="synthetic·dpo").info.run_id  # not an eval run: in-training evaluation
    client.log_metric(dpo, "eval/win_rate", 0.9)
    client.log_param(dpo, "eval/baseline_name", "sft")

    table = compare("paper", tracking_uri=uri, csv=str(tmp_path / "t.csv"))
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    assert lines[0].startswith("| model | win rate vs SFT [95% CI] | tie rate |") and lines[0].endswith("| path |")
    # The rerun of dpo_synthetic replaced its first run; rows sorted by model; short names, path last.
    assert lines[2:4] == [
        "| dpo_synthetic | 63.0% [53.2%, 71.8%] | 0.0% | 0.012 | -4.125 | -6.500 | 50.0% | – | 100 | artifacts/dpo_synthetic |",
        "| dpo_ultrafeedback | 64.0% [54.2%, 72.7%] | 2.0% | 0.004 | -3.250 | -6.500 | 50.0% | – | 100 "
        "| artifacts/dpo_ultrafeedback |",
    ]
    # The power line of each arm (synpref.core.stats.prompts_for_power; values checked by hand in test_judges.py).
    assert "- dpo_synthetic (63.0%) from 50%: 114; from dpo_ultrafeedback (64.0%): 36,383 per arm" in lines
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["dpo_synthetic", "dpo_ultrafeedback"]
    assert [r["path"] for r in rows] == ["artifacts/dpo_synthetic", "artifacts/dpo_ultrafeedback"]
    assert float(rows[0]["win_rate"]) == 0.63 and float(rows[0]["win_rate_ci_low"]) == 0.5322
    assert rows[1]["n"] == "100" and rows[1]["reward_model"] == "nemotron" and rows[1]["baseline"] == "sft"

    # One pipeline run's children only.
    capsys.readouterr()
    only = compare("paper", tracking_uri=uri, parent_run_id=parent, figures_dir=str(tmp_path / "fig"))
    assert "| dpo_synthetic | 63.0%" in only and "50.0% [40.0%" not in only
    # ... logged to the parent run with Figures 1 and 2 of both models.
    logged = {a.path for a in client.list_artifacts(parent)}
    assert logged == {"win_rates.md", "win_rates.png", "avg_rewards.png"}
    assert (
        client.download_artifacts(parent, "win_rates.md", str(tmp_path))
        and (tmp_path / "win_rates.md").read_text() == only + "\n"
    )
    for name in ("win_rates.png", "avg_rewards.png"):
        header = (tmp_path / "fig" / name).read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (640, 400)
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        compare("nope", tracking_uri=uri)
    client.create_experiment("empty")
    with pytest.raises(ValueError, match="no eval run"):
        compare("empty", tracking_uri=uri)


def judged_row(model, primary, judges=None, n=100):
    """An eval_runs row: the primary judge's metrics, and per judge (label → (win, low, high, self_judged))."""
    win, low, high, self_judged = primary
    row = {"model": model, "baseline": "sft", "reward_model": "synpref.rewards.RuleReward", "n": n}
    row.update(win_rate=win, win_rate_ci_low=low, win_rate_ci_high=high, self_judged=float(self_judged))
    if judges:
        row["judges"] = {
            label: {"win_rate": w, "win_rate_ci_low": lo, "win_rate_ci_high": hi, "self_judged": float(s)}
            for label, (w, lo, hi, s) in judges.items()
        }
    return row


def test_verdict_leads_with_the_independent_judge_and_names_the_self_judged_one():
    from synpref.pipeline.parent_run import verdict

    rows = [
        judged_row(
            "dpo_synthetic",
            (0.68, 0.58, 0.76, True),
            {"RuleReward": (0.68, 0.58, 0.76, True), "clarity": (0.25, 0.17, 0.34, False)},
        ),
        judged_row(
            "dpo_ultrafeedback",
            (0.66, 0.56, 0.75, False),
            {"RuleReward": (0.66, 0.56, 0.75, False), "clarity": (0.36, 0.27, 0.46, False)},
        ),
    ]
    assert verdict(rows) == (
        "clarity (independent): ultrafeedback 36% [27, 46] vs synthetic 25% [17, 34] vs sft; "
        "RuleReward (self-judged for synthetic): ultrafeedback 66% [56, 75] vs synthetic 68% [58, 76], N = 100"
    )


def test_verdict_says_when_no_independent_judge_is_configured():
    from synpref.pipeline.parent_run import verdict

    rows = [
        judged_row("dpo_synthetic", (0.68, 0.58, 0.76, True)),
        judged_row("dpo_ultrafeedback", (0.66, 0.56, 0.75, False)),
    ]
    assert verdict(rows) == (
        "RuleReward (self-judged for synthetic): synthetic 68% [58, 76] vs ultrafeedback 66% [56, 75] vs sft; "
        "no independent judge configured (add one under `judges:`), N = 100"
    )
    # A single judge that labelled none of the arms' pairs is independent.
    rows[0]["self_judged"] = 0.0
    assert verdict(rows).startswith("RuleReward (independent): synthetic 68% [58, 76]")


def test_win_rate_figure_has_bars_per_judge_with_the_self_judged_marked(tmp_path, monkeypatch):
    import synpref.core.metrics
    from synpref.reporting.compare import write_figures

    drawn = {}
    real = synpref.core.metrics.plot_win_rates
    monkeypatch.setattr(
        synpref.core.metrics,
        "plot_win_rates",
        lambda rows, path, baseline, marked: (
            drawn.update(rows=rows, marked=marked) or real(rows, path, baseline, marked)
        ),
    )
    rows = [
        judged_row(
            "dpo_synthetic",
            (0.68, 0.58, 0.76, True),
            {"RuleReward": (0.68, 0.58, 0.76, True), "clarity": (0.25, 0.17, 0.34, False)},
        )
    ]
    for r in rows:
        r.update(tie_rate=0.0, loss_rate=1 - r["win_rate"])
        for m in r["judges"].values():
            m.update(tie_rate=0.0, loss_rate=1 - m["win_rate"])
    files = write_figures(rows, tmp_path)
    assert [name for name, _ in drawn["rows"]] == ["dpo_synthetic\nRuleReward", "dpo_synthetic\nclarity"]
    assert [m["win_rate"] for _, m in drawn["rows"]] == [0.68, 0.25] and drawn["marked"] == [True, False]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def record(index, policy, verdicts, baseline="the SFT reply"):
    """An eval.jsonl record judged by RuleReward and clarity: verdicts = (RuleReward outcome, clarity outcome)."""
    judges = {
        label: {"policy_reward": 1.0, "baseline_reward": 0.0, "outcome": o}
        for label, o in zip(("RuleReward", "clarity"), verdicts)
    }
    return {
        "index": index,
        "outcome": verdicts[0],
        "policy_reward": 1.0,
        "baseline_reward": 0.0,
        "policy_length": len(policy.split()),
        "baseline_length": len(baseline.split()),
        "judges": judges,
        "prompt": [{"role": "user", "content": f"question {index}?"}],
        "policy_response": policy,
        "baseline_response": baseline,
    }


def log_records(client, run_id, records, tmp_path):
    path = tmp_path / run_id / "eval.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    client.log_artifact(run_id, str(path))
    return path


def test_eval_table_reads_side_by_side_with_each_judges_scores_and_winner(tmp_path, monkeypatch):
    from synpref.callbacks.win_rate import eval_table

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("t")
    run = client.create_run(exp).info.run_id
    jsonl = log_records(client, run, [record(0, "yes", ("win", "loss")), record(1, "no", ("tie", "win"))], tmp_path)
    client.log_table(run, eval_table(jsonl), "eval_table.json")
    table = client.load_table(exp, "eval_table.json", run_ids=[run])  # mlflow.load_table in the run's experiment
    assert list(table.columns)[:4] == ["index", "prompt", "baseline_response", "policy_response"]
    assert list(table["prompt"]) == ["question 0?", "question 1?"]
    assert list(table["RuleReward/winner"]) == ["policy", "tie"] and list(table["clarity/winner"]) == [
        "baseline",
        "policy",
    ]
    assert list(table["clarity/policy"]) == [1.0, 1.0] and list(table["policy_length"]) == [1, 1]
    # One judge: its verdict under its own label.
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({k: v for k, v in record(0, "yes", ("loss", "win")).items() if k != "judges"}) + "\n")
    assert eval_table(single, "RuleReward")["RuleReward/winner"] == ["baseline"]


def test_replies_side_by_side_on_the_parent_run_and_disagreements_shown_first(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("paper")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    outcomes = {  # prompt → (synthetic's judges' outcomes, ultrafeedback's); prompt 2: the judges disagree
        "dpo_synthetic": [("win", "win"), ("loss", "loss"), ("win", "loss")],
        "dpo_ultrafeedback": [("win", "win"), ("loss", "loss"), ("win", "win")],
    }
    for arm, verdicts in outcomes.items():
        run = log_eval_run(client, exp, f"artifacts/{arm}", metrics(0.5, 0, 0.4, 0.6, 1.0, 0.0, 1.0, n=3), parent)
        log_records(client, run, [record(i, f"{arm} says {i}", v) for i, v in enumerate(verdicts)], tmp_path)

    compare("paper", tracking_uri=uri, parent_run_id=parent, show=2)
    shown = capsys.readouterr().out.split("── prompt ")[1:]
    assert [block.split("\n")[0] for block in shown] == [
        "2 (judges disagree on dpo_synthetic; clarity splits the arms)",
        "0",
    ]
    assert "dpo_synthetic [RuleReward: win, clarity: loss]: dpo_synthetic says 2" in shown[0]
    assert "sft: the SFT reply" in shown[0] and "prompt: question 2?" in shown[0]

    replies = client.load_table(exp, "replies.json", run_ids=[parent])
    assert list(replies["index"]) == [0, 1, 2] and list(replies["sft"]) == ["the SFT reply"] * 3
    assert list(replies["dpo_ultrafeedback"]) == [f"dpo_ultrafeedback says {i}" for i in range(3)]
    assert list(replies["dpo_synthetic/clarity"]) == ["win", "loss", "loss"] and all(replies["same_baseline"])


def test_an_evaluations_win_rate_figure_has_a_group_per_judge(tmp_path, monkeypatch):
    import synpref.callbacks.win_rate as win_rate

    drawn = {}
    monkeypatch.setattr(
        win_rate, "plot_win_rates", lambda rows, path, baseline, marked: drawn.update(rows=rows, marked=marked)
    )
    monkeypatch.setattr(win_rate, "plot_average_rewards", lambda *args: None)
    rates = {
        "win_rate": 0.5,
        "tie_rate": 0.0,
        "loss_rate": 0.5,
        "win_rate_ci_low": 0.4,
        "win_rate_ci_high": 0.6,
        "n": 4.0,
    }
    metrics = {**rates, **{f"eval/{label}/{k}": v for label in ("RuleReward", "clarity") for k, v in rates.items()}}
    metrics["eval/agreement/RuleReward/win_rate"] = 1.0  # a pair's metric is no judge
    recorder = win_rate.WinRateRecorder(self_judged={"RuleReward": True, "clarity": False})
    recorder._plot(metrics, {"policy_name": "dpo_synthetic"}, tmp_path)
    assert [name for name, _ in drawn["rows"]] == ["dpo_synthetic\nRuleReward", "dpo_synthetic\nclarity"]
    assert drawn["marked"] == [True, False] and drawn["rows"][1][1]["win_rate_ci_high"] == 0.6
