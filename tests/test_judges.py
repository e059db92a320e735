"""Several judges: statistics against hand computations, per-judge metrics, self-judging, the compare report,
and an evaluation with two judges and several answers per prompt."""

import json
import math
import shutil

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from synpref.core.specs import Decoding, ModelSpec
from synpref.core.stats import (
    agreement,
    cluster_bootstrap_interval,
    clustered_sign_test_p,
    cohen_kappa,
    length_controlled_win_rate,
    prompts_for_power,
)
from synpref.judges import judge_labels, judge_metrics, labellers, read_provenance, self_judged, write_provenance
from synpref.reporting.report import judge_columns, judges_table, power_lines, self_judged_warnings
from synpref.rewards import FunctionReward, RuleReward
from synpref.rewards.heuristics import clarity
from tests.conftest import read_jsonl
from tests.test_evaluation import DistinctWords, baseline_model, prompt_batches  # noqa: F401  (fixture)


def test_power_against_hand_computation():
    z_a, z_b = 1.959964, 0.841621  # z_0.975, z_0.8
    # 63 % vs 50 %: [z_a·0.5 + z_b·√(.63·.37)]² / .13² = [0.979982 + 0.406339]² / 0.0169 = 113.72 -> 114
    assert ((z_a * 0.5 + z_b * math.sqrt(0.63 * 0.37)) / 0.13) ** 2 == pytest.approx(113.72, abs=0.01)
    assert prompts_for_power(0.63) == 114
    # 63 % vs 64 %: p̄ = .635; [z_a·√(2·.635·.365) + z_b·√(.2331 + .2304)]² / .01² = 190.7413² = 36382.2 -> 36383
    assert prompts_for_power(0.63, 0.64) == 36383 == prompts_for_power(0.64, 0.63)
    assert prompts_for_power(0.5) == math.inf
    assert prompts_for_power(0.6, alpha=0.01, power=0.9) > prompts_for_power(0.6)


def _length_only(n=4000, seed=0, effect=0.0):
    """Outcomes decided by length (plus, optionally, a real advantage `effect` on the logit scale);
    the policy is usually the longer, so the raw win rate is far above 50 %."""
    rng = np.random.default_rng(seed)
    base = rng.integers(20, 60, n)
    policy = base + rng.normal(15, 20, n)
    delta = policy - base
    p_win = 1 / (1 + np.exp(-(effect + 3 * np.tanh(delta / delta.std()))))
    return list(np.where(rng.random(n) < p_win, "win", "loss")), policy, base


def test_length_controlled_win_rate_removes_a_length_only_advantage():
    outcomes, policy, base = _length_only()
    raw = outcomes.count("win") / len(outcomes)
    assert raw > 0.68
    assert length_controlled_win_rate(outcomes, policy, base) == pytest.approx(0.5, abs=0.03)
    # Length decides every pair outright (separable): still about 50 %, and finite.
    decided = ["win" if p > b else "loss" for p, b in zip(policy, base)]
    assert length_controlled_win_rate(decided, policy, base) == pytest.approx(0.5, abs=0.05)
    # A real advantage on top of length survives: σ(1) = 73.1 %.
    outcomes, policy, base = _length_only(effect=1.0, seed=1)
    assert length_controlled_win_rate(outcomes, policy, base) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)
    # Equal lengths: the plain preference rate (a tie is half a win).
    assert length_controlled_win_rate(["win", "win", "tie", "loss"], [5] * 4, [5] * 4) == pytest.approx(0.625, abs=1e-3)


def test_agreement_and_kappa_by_hand():
    a, b = ["win", "loss", "tie", "win"], ["win", "loss", "win", "win"]
    # p_o = 3/4; p_e = P_a(win)P_b(win) + P_a(loss)P_b(loss) = .5·.75 + .25·.25 = .4375; κ = .3125/.5625
    assert agreement(a, b) == 0.75
    assert cohen_kappa(a, b) == pytest.approx(0.3125 / 0.5625)
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa(["win", "loss"], ["loss", "win"]) == pytest.approx(-1.0)


def test_cluster_bootstrap_is_not_fooled_by_repeated_answers():
    # 50 prompts, 30 won; each prompt's 8 answers agree: 8 answers carry the information of one.
    clusters = [[1.0] * 8] * 30 + [[0.0] * 8] * 20
    low, high = cluster_bootstrap_interval(clusters, seed=0)
    single_low, single_high = cluster_bootstrap_interval([[1.0]] * 30 + [[0.0]] * 20, seed=0)
    assert (low, high) == (single_low, single_high) and low < 0.6 < high
    assert (low, high) == cluster_bootstrap_interval(clusters, seed=0)  # fixed seed: reproducible
    from synpref.core.metrics import wilson_interval

    naive_low, naive_high = wilson_interval(240, 400)
    assert high - low > 1.5 * (naive_high - naive_low)
    # Independent answers within prompts: the interval shrinks with more answers.
    rng = np.random.default_rng(0)
    one = [[float(rng.random() < 0.6)] for _ in range(100)]
    eight = [[float(rng.random() < 0.6) for _ in range(8)] for _ in range(100)]
    width = lambda ci: ci[1] - ci[0]
    assert width(cluster_bootstrap_interval(eight)) < 0.5 * width(cluster_bootstrap_interval(one))


def test_clustered_sign_test_counts_prompts():
    # means 2/3 (won), 1/3 (lost), 3/4 (won), 1/2 (left out): 2 wins, 1 loss -> p = 1
    assert (
        clustered_sign_test_p([["win", "win", "loss"], ["loss", "loss", "win"], ["win", "tie"], ["tie", "tie"]]) == 1.0
    )
    # six prompts won (each by 2 of 3 answers): 2 / 2^6
    assert clustered_sign_test_p([["win", "win", "loss"]] * 6) == pytest.approx(2 / 64)


def _record(index, lp, lb, rule, clar, pair=None, sample=None):
    r = {
        "index": index,
        "policy_length": lp,
        "baseline_length": lb,
        "policy_reward": rule[0],
        "baseline_reward": rule[1],
        "judges": {
            "RuleReward": {
                "policy_reward": rule[0],
                "baseline_reward": rule[1],
                "outcome": "win" if rule[0] > rule[1] else "loss" if rule[0] < rule[1] else "tie",
            },
            "clarity": {
                "policy_reward": clar[0],
                "baseline_reward": clar[1],
                "outcome": "win" if clar[0] > clar[1] else "loss" if clar[0] < clar[1] else "tie",
            },
        },
    }
    if pair is not None:
        r["judges"]["judge"] = pair
    if sample is not None:
        r["sample"] = sample
    return {**r, "outcome": r["judges"]["RuleReward"]["outcome"]}


def test_judge_metrics_per_judge_agreement_and_self_judged():
    pair = lambda o, bias: {"outcome": o, "position_bias": bias, "verdicts": ["A", "A" if bias else "B"]}  # noqa: E731
    records = [
        _record(0, 10, 10, (2, 1), (1, 0), pair("tie", True)),
        _record(1, 12, 10, (2, 1), (0, 1), pair("win", False)),
        _record(2, 10, 12, (0, 1), (0, 1), pair("loss", False)),
        _record(3, 10, 10, (3, 1), (2, 1), {"outcome": None, "verdicts": [None, "A"], "unparseable": ["?"]}),
    ]
    m = judge_metrics(records, 0.0, 0.1, self_judged={"RuleReward": True, "clarity": False, "judge": False})
    assert m["eval/RuleReward/win_rate"] == 0.75 and m["eval/clarity/win_rate"] == 0.5
    assert m["eval/RuleReward/self_judged"] == 1.0 and m["self_judged"] == 1.0 and m["eval/clarity/self_judged"] == 0.0
    # RuleReward W W L W vs clarity W L L W: agree on 3 of 4; p_e = .75·.5 + .25·.5 = .5 -> κ = .5
    assert m["eval/agreement/RuleReward/clarity"] == 0.75 and m["eval/kappa/RuleReward/clarity"] == pytest.approx(0.5)
    # The pairwise judge: prompt 3 has no verdict (not counted); 1 of the 3 others followed the position.
    assert (
        m["eval/judge/n"] == 3
        and m["eval/judge/unparseable"] == 1
        and m["eval/judge/position_bias_rate"] == pytest.approx(1 / 3)
    )
    assert m["eval/judge/win_rate"] == pytest.approx(1 / 3) and m["eval/judge/tie_rate"] == pytest.approx(1 / 3)
    assert m["eval/agreement/RuleReward/judge"] == pytest.approx(2 / 3)  # over the 3 prompts both judged
    assert "clustered" not in m and m["n_prompts"] == 4
    # Two answers per prompt: the primary interval becomes the cluster bootstrap over prompts.
    twice = [dict(r, sample=k) for r in records for k in (0, 1)]
    m2 = judge_metrics(twice, 0.0, 0.1, seed=0)
    assert m2["clustered"] == 1.0 and m2["n_prompts"] == 4
    clusters = [[r["outcome"] == "win" for r in records if r["index"] == i] * 2 for i in range(4)]
    assert (m2["win_rate_ci_low"], m2["win_rate_ci_high"]) == cluster_bootstrap_interval(clusters, seed=0)


def test_labels_provenance_and_self_judged(tmp_path):
    rule, clar = RuleReward(), FunctionReward("synpref.rewards.heuristics:clarity")
    assert judge_labels([rule, clar, RuleReward()]) == ["RuleReward", "clarity", "RuleReward_2"]
    run = tmp_path / "samples"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"module": {"reward": rule.name}}))
    src = type("Source", (), {"path": str(run / "pairs.jsonl")})
    uf = type("Source", (), {"path": "synpref://sample/train_prefs.jsonl"})
    assert labellers([src, uf, src]) == ["synpref.rewards.RuleReward"]
    (tmp_path / "dpo").mkdir()
    write_provenance(tmp_path / "dpo", labellers([src]))
    assert read_provenance(str(tmp_path / "dpo")) == [rule.name] and read_provenance(str(tmp_path)) == []
    assert self_judged([rule, clar], ["RuleReward", "clarity"], [rule.name]) == {"RuleReward": True, "clarity": False}


def test_clarity_is_a_different_judge_than_rule_reward():
    q = "Explain how plants make food from sunlight."
    good = "Plants capture light with chlorophyll. They turn water and carbon dioxide into sugar and oxygen."
    echo = "Explain how plants make food from sunlight. Explain how plants make food from sunlight."
    loop = "food food food food food food food food food food food food food food food food food"
    assert clarity(q, good) > clarity(q, echo) and clarity(q, good) > clarity(q, loop) and clarity(q, "") == -3.0
    # RuleReward rewards overlap with the prompt; clarity penalises copying it: they rank the echo differently.
    assert RuleReward().score_one(q, echo) > RuleReward().score_one(q, good) - 1.0


def test_report_groups_judges_marks_self_judged_and_prints_power():
    rows = [
        {
            "model": "artifacts/dpo_synthetic",
            "win_rate": 0.63,
            "self_judged": 1.0,
            "reward_model": "rule",
            "judges": {
                "RuleReward": {
                    "win_rate": 0.63,
                    "win_rate_ci_low": 0.532,
                    "win_rate_ci_high": 0.718,
                    "length_controlled_win_rate": 0.55,
                    "self_judged": 1.0,
                },
                "clarity": {
                    "win_rate": 0.48,
                    "win_rate_ci_low": 0.38,
                    "win_rate_ci_high": 0.58,
                    "length_controlled_win_rate": 0.47,
                    "self_judged": 0.0,
                },
            },
            "agreement": {"RuleReward~clarity": {"agreement": 0.6, "kappa": 0.21}},
        },
        {"model": "artifacts/dpo_ultrafeedback", "win_rate": 0.64, "judges": {}, "agreement": {}},
    ]
    table = judges_table(rows).splitlines()
    assert table[0] == (
        "| model | RuleReward win rate [95% CI] | RuleReward LC win rate | clarity win rate [95% CI] "
        "| clarity LC win rate | agreement RuleReward~clarity (κ) |"
    )
    assert table[2] == (
        "| artifacts/dpo_synthetic | 63.0% [53.2%, 71.8%] **self-judged** | 55.0% | 48.0% [38.0%, 58.0%] "
        "| 47.0% | 60.0% (0.21) |"
    )
    assert table[3] == "| artifacts/dpo_ultrafeedback | – | – | – | – | – (–) |"
    warnings = self_judged_warnings(rows)
    assert len(warnings) == 1 and "dpo_synthetic is **self-judged** by RuleReward" in warnings[0]
    lines = power_lines(rows)
    assert lines[1] == "- dpo_synthetic (63.0%) from 50%: 114; from dpo_ultrafeedback (64.0%): 36,383 per arm"
    assert lines[2].startswith("- dpo_ultrafeedback (64.0%) from 50%: 98;")
    assert judges_table([{"model": "m", "judges": {}}]) == ""
    columns, flat = judge_columns(rows)
    assert (
        columns[:2] == ["RuleReward/win_rate", "RuleReward/win_rate_ci_low"] and "kappa/RuleReward~clarity" in columns
    )
    assert flat[0]["clarity/win_rate"] == 0.48 and "clarity/win_rate" not in flat[1]


def test_two_judges_and_several_answers_per_prompt(tiny_model, baseline_model, sample_dir, tmp_path):  # noqa: F811
    from synpref.modules import WinRateModule

    out = tmp_path / "eval"
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model, policy)
    write_provenance(policy, ["distinct-words"])  # as if DistinctWords had labelled its training pairs
    module = WinRateModule(
        ModelSpec(str(policy)),
        ModelSpec(baseline_model),
        reward=DistinctWords(),
        output_dir=str(out),
        judges=[RuleReward()],
        samples_per_prompt=3,
        decoding=Decoding(max_new_tokens=12, seed=1),
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="judges", tracking_uri=uri, run_name="eval")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False)
    trainer.predict(module, DataLoader(prompt_batches(sample_dir, 4, 2), batch_size=None))
    rows = read_jsonl(out / "eval.jsonl")
    assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in range(3)]
    # Both judges' verdicts are in each record; the rule judge's scores are its scores of the texts.
    assert [r["judges"]["RuleReward"]["policy_reward"] for r in rows] == pytest.approx(
        RuleReward().score([r["prompt"] for r in rows], [r["policy_response"] for r in rows])
    )
    assert all(r["judges"]["distinct-words"]["policy_reward"] == r["policy_reward"] for r in rows)
    run = MlflowClient(uri).get_run(logger.run_id)
    m, p = run.data.metrics, run.data.params
    assert m["eval/n"] == 12 and m["eval/n_prompts"] == 4 and m["eval/clustered"] == 1.0 and p["n_prompts"] == "4"
    assert (
        m["eval/self_judged"] == 1.0
        and m["eval/distinct-words/self_judged"] == 1.0
        and m["eval/RuleReward/self_judged"] == 0.0
    )
    expected = judge_metrics(rows, 0.0, 0.1, self_judged={"distinct-words": True, "RuleReward": False}, seed=1)
    for key in (
        "win_rate_ci_low",
        "win_rate_ci_high",
        "eval/RuleReward/win_rate",
        "eval/agreement/distinct-words/RuleReward",
        "length_controlled_win_rate",
    ):
        assert m[key if key.startswith("eval/") else "eval/" + key] == pytest.approx(expected[key]), key
    assert m["eval/RuleReward/win_rate"] == pytest.approx(
        sum(r["judges"]["RuleReward"]["outcome"] == "win" for r in rows) / 12
    )
    assert (
        p["samples_per_prompt"] == "3"
        and p["policy_labelled_by"] == "distinct-words"
        and p["judge.RuleReward"] == RuleReward().name
    )
