"""The scaling study: pair rules on hand-made scores, the pairs stage, grid expansion and sharing, the paired
interval by hand, and a reduced configs/tiny/scaling.yaml end to end (rerun, edit, rounds)."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter

import mlflow
import pytest
import yaml

from synpref.cli import main
from synpref.core.errors import ConfigError
from synpref.core.pairs import TIE, kept_vs_threshold_capped, select_pairs
from synpref.pipeline.grid import Study, arms, expand, label
from synpref.pipeline.pair_stage import build_pairs
from synpref.pipeline.stages import Stage
from synpref.reporting.study_report import compare_arms, paired_difference, prompts_to_resolve
from tests.conftest import ROOT, read_jsonl

TEXTS = [f"reply {i}" for i in range(20)]


# -- pair rules --------------------------------------------------------------------------------
def test_best_worst_takes_the_extremes():
    pairs, reason, gaps = select_pairs(TEXTS[:4], [0.2, 0.9, 0.5, 0.1], "best_worst")
    assert reason is None and [(p.chosen, p.rejected) for p in pairs] == [(1, 3)] and gaps == [pytest.approx(0.8)]


def test_best_random_rejects_each_other_sample_about_equally():
    scores = [0.2, 0.9, 0.5, 0.1]
    picks = Counter(
        select_pairs(TEXTS[:4], scores, "best_random", rng=random.Random(seed))[0][0].rejected for seed in range(3000)
    )
    assert set(picks) == {0, 2, 3}  # never the chosen one
    assert all(900 <= n <= 1100 for n in picks.values()), picks
    same = [select_pairs(TEXTS[:4], scores, "best_random", rng=random.Random(7))[0][0] for _ in range(2)]
    assert same[0] == same[1]  # seeded


def test_mean_minus_two_sigma_is_not_the_worst_when_an_outlier_inflates_sigma():
    # 1.0, eighteen 0.0, one -10.0: mean = -9/20 = -0.45; population variance =
    # (1.45² + 18·0.45² + 9.55²)/20 = 96.95/20 = 4.8475, σ = 2.2017; mean − 2σ = -4.8534.
    # |0.0 − (-4.8534)| = 4.8534 < |-10 − (-4.8534)| = 5.1466: the first 0.0 sample (index 1) is rejected.
    scores = [1.0] + [0.0] * 18 + [-10.0]
    pairs, reason, gaps = select_pairs(TEXTS, scores, "best_vs_mean_minus_2sigma")
    assert reason is None and (pairs[0].chosen, pairs[0].rejected) == (0, 1) and gaps == [1.0]
    assert select_pairs(TEXTS, scores, "best_worst")[0][0].rejected == 19
    # With two samples it is best vs worst.
    assert select_pairs(TEXTS[:2], [0.3, 0.7], "best_vs_mean_minus_2sigma")[0][0].rejected == 0


def test_mean_minus_two_sigma_is_the_worst_below_six_samples():
    # No one of k values lies more than σ·√(k−1) below their mean, so for k ≤ 5 mean − 2σ is at or
    # under the minimum and the nearest sample is the worst one (docs/scaling.md).
    rng = random.Random(0)
    for k in range(2, 6):
        for _ in range(200):
            scores = [rng.gauss(0, 1) for _ in range(k)]
            got = select_pairs(TEXTS[:k], scores, "best_vs_mean_minus_2sigma")[0]
            assert got == select_pairs(TEXTS[:k], scores, "best_worst")[0]


def test_all_above_gap_keeps_every_pair_over_the_threshold_capped_largest_first():
    scores = [1.0, 0.0, 0.5, 0.5]  # gaps: (0,1) 1; (0,2) (0,3) (2,1) (3,1) 0.5; (2,3) 0: a tie
    pairs, reason, gaps = select_pairs(TEXTS[:4], scores, "all_above_gap", threshold=0.5, max_per_prompt=3)
    assert reason is None and [(p.chosen, p.rejected) for p in pairs] == [(0, 1), (0, 2), (0, 3)]
    assert sorted(gaps) == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert kept_vs_threshold_capped([gaps], [0.0, 0.5, 0.75, 1.5], cap=3) == [(0.0, 3), (0.5, 3), (0.75, 1), (1.5, 0)]
    assert select_pairs(TEXTS[:4], scores, "all_above_gap", threshold=2.0)[1] == "below_threshold"
    assert select_pairs(TEXTS[:3], [0.4, 0.4, 0.4], "all_above_gap")[:2] == ([], TIE)


# -- the pairs stage -------------------------------------------------------------------------
def _samples(path, scores_per_prompt):
    with open(path, "w") as f:
        for i, scores in enumerate(scores_per_prompt):
            for j, s in enumerate(scores):
                row = {
                    "index": i,
                    "prompt_id": f"p{i}",
                    "sample": j,
                    "prompt": [{"role": "user", "content": f"question {i}"}],
                    "response": f"answer {i}.{j}",
                    "score": s,
                    "num_tokens": 2,
                }
                f.write(json.dumps(row) + "\n")
    return str(path)


def test_pairs_stage_first_k_nested_counts_slices_and_exclusion(tmp_path):
    scores = [[0.1, 0.2, 0.9, 0.0] for _ in range(10)]
    samples = _samples(tmp_path / "samples.jsonl", scores)
    # k=2: only samples 0 and 1 count, so the pair is 1 vs 0 (the 0.9 sample is not seen).
    build_pairs(samples, str(tmp_path / "k2"), k=2)
    rows = read_jsonl(tmp_path / "k2" / "pairs.jsonl")
    assert len(rows) == 10 and {(r["score_chosen"], r["score_rejected"]) for r in rows} == {(0.2, 0.1)}
    build_pairs(samples, str(tmp_path / "k4"), k=4)
    assert {(r["score_chosen"], r["score_rejected"]) for r in read_jsonl(tmp_path / "k4" / "pairs.jsonl")} == {
        (0.9, 0.0)
    }
    # Counts are nested: the 3 pairs of n=3 are among the 6 of n=6.
    ids = {n: {r["prompt_id"] for r in read_jsonl(build_and_read(samples, tmp_path / f"n{n}", n))} for n in (3, 6)}
    assert len(ids[3]) == 3 and len(ids[6]) == 6 and ids[3] < ids[6]
    stats = json.loads((tmp_path / "n3" / "stats.json").read_text())
    assert (stats["pairs"], stats["pairs_available"], stats["prompts"]) == (3, 10, 10)
    # A slice of prompt indices; a prompt in an exclude file is an error naming it.
    build_pairs(samples, str(tmp_path / "slice"), first_prompt=4, num_prompts=3)
    assert [r["prompt_id"] for r in read_jsonl(tmp_path / "slice" / "pairs.jsonl")] == ["p4", "p5", "p6"]
    with pytest.raises(Exception, match="prompt p4 .index 4. is in"):
        build_pairs(samples, str(tmp_path / "ex"), exclude=[str(tmp_path / "slice" / "pairs.jsonl")])
    with pytest.raises(ConfigError, match="at most 4 samples per prompt"):
        build_pairs(samples, str(tmp_path / "k8"), k=8)


def build_and_read(samples, out, n):
    build_pairs(samples, str(out), max_pairs=n, seed=3)
    return out / "pairs.jsonl"


# -- the paired comparison -------------------------------------------------------------------
def test_paired_difference_by_hand():
    # d = [1, 0, 0, .5, 0]: mean .3; deviations .7 -.3 -.3 .2 -.3, squares sum .8, sd = √(.8/4) = .44721;
    # se = sd/√5 = .2; half width 1.959964 × .2 = .391993; n for 80 % power:
    # ((1.959964 + 0.841621) × .44721 / .3)² = 17.44 → 18.
    got = paired_difference([1, 1, 0, 0.5, 1], [0, 1, 0, 0, 1])
    assert got["difference"] == pytest.approx(0.3)
    assert got["sd"] == pytest.approx(math.sqrt(0.2))
    assert (got["ci_low"], got["ci_high"]) == (
        pytest.approx(0.3 - 0.391993, abs=1e-6),
        pytest.approx(0.691993, abs=1e-6),
    )
    assert got["prompts_needed"] == 18 == prompts_to_resolve(0.3, math.sqrt(0.2))
    records = lambda outcomes: [  # noqa: E731
        {"index": i, "prompt_id": f"p{i}", "outcome": o, "baseline_response": "same"} for i, o in enumerate(outcomes)
    ]
    h = compare_arms(records(["win", "win", "loss", "tie", "win"]), records(["loss", "win", "loss", "loss", "win"]))
    assert h["difference"] == pytest.approx(0.3) and h["win_rate_a"] == pytest.approx(0.7)
    assert h["same_baseline_replies"] == 1.0


# -- grid expansion --------------------------------------------------------------------------
def tiny_study() -> tuple[Study, list[Stage]]:
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "scaling.yaml").read_text())
    return Study(**config["study"]), [Stage(**s) for s in config["stages"]]


def test_tiny_grid_shares_stages_and_names_them_by_what_they_depend_on():
    study, shared = tiny_study()
    grid = arms(study)
    assert len(grid) == 6 + 2 + 1  # 3 counts × 2 rules, the two data arms, the 2-round arm
    stages, info = expand(study, shared)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    kinds = Counter(n.split("-", 1)[0] for n in names)
    # The union arm reuses the synthetic n=all best_worst pairs; rounds add a slice per round.
    assert kinds == {"pairs": 8, "dpo": 10, "eval": 10, "sample": 1}
    union = next(s for s in stages if s.name == "dpo-union-k4-best_worst-gap0.1-nall")
    assert union.needs == ["sft", "pairs-k4-best_worst-gap0.1-nall"]
    assert '"format": "ultrafeedback_binarized"' in next(
        a for a in union.args if a.startswith("--data.init_args.sources")
    )
    uf = next(s for s in stages if s.name == "dpo-ultrafeedback")
    assert uf.needs == ["sft"] and info["eval-ultrafeedback"].values == {
        "data": "ultrafeedback",
        "rounds": 1,
        "reference": "sft",
    }
    # Round 2 samples a fresh slice from round 1's policy, and its pairs may not share a prompt with round 1's.
    r2 = next(s for s in stages if s.name.startswith("sample-"))
    assert "--data.init_args.skip_prompts=200" in r2.args and r2.needs == [
        "dpo-synthetic-k4-best_worst-gap0.1-nall-r1of2"
    ]
    pairs2 = next(s for s in stages if s.name == "pairs-k4-best_worst-gap0.1-nall-r2of2")
    assert "artifacts/tiny/scaling/pairs/k4-best_worst-gap0.1-nall-r1of2/pairs.jsonl" in pairs2.inputs
    # A DPO setting as a variable names only the arm's DPO and evaluation.
    beta = {**grid[0], "model.init_args.beta": 0.3}
    assert label(beta, "pairs") == label(grid[0], "pairs") and label(beta, "dpo").endswith("-beta0.3")


def test_bad_grid_values_are_named():
    study, shared = tiny_study()
    study.sweeps = [{"rule": ["best_worst", "worst_best"]}]
    with pytest.raises(ConfigError, match=r"study.sweeps\[0\].rule.*worst_best"):
        arms(study)
    study.sweeps = [{"temperature": [0.5]}]
    with pytest.raises(ConfigError, match="unknown variable 'temperature'"):
        arms(study)
    study.sweeps = [{"rounds": [2], "data": ["union"]}]
    with pytest.raises(ConfigError, match="rounds"):
        arms(study)
    study.sweeps, study.head_to_head = [{"k": [2]}], [["k=2", "k=3"]]
    with pytest.raises(ConfigError, match="'k=3' is no arm of the grid"):
        expand(study, shared)


# -- end to end ------------------------------------------------------------------------------
# Two steps of a few short rows: a tiny training step at the configs' 16 rows of up to 512 tokens takes
# seconds on a CPU, and nothing below depends on the batch's size or length.
STEPS = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.batch_size=4",
    "--data.init_args.max_length=128",
]


def test_reduced_tiny_grid_end_to_end(in_tmp, capsys):
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "scaling.yaml").read_text())
    config["stages"][0]["args"] += STEPS
    config["stages"][1]["args"] += ["--data.init_args.max_prompts=16", "--model.init_args.decoding.max_new_tokens=8"]
    short = ["--model.init_args.decoding.max_new_tokens=8"]
    config["study"].update(
        dpo_args=STEPS,
        eval_args=short + ["--data.init_args.max_prompts=6"],
        sample_args=short,
        defaults={**config["study"]["defaults"], "threshold": 0.0, "pairs": 4},
        sweeps=[{"rounds": [1, 2]}, {"model.init_args.beta": [0.2]}],
        prompts_per_round=8,
        head_to_head=[["rounds=2", "rounds=1"]],
    )
    path = in_tmp / "scaling.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    main(["reproduce", "--config", str(path)])
    out = capsys.readouterr().out
    assert "| synthetic-k4-best_worst-gap0-n4 |" in out and "A − B [paired 95% CI]" in out
    assert "| synthetic-k4-best_worst-gap0-n4-r2of2-refsft | synthetic-k4-best_worst-gap0-n4 |" in out

    root = in_tmp / "artifacts" / "tiny" / "scaling"
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(config["experiment"]).experiment_id], max_results=200)
    stage_runs = Counter(r.data.tags.get("synpref.pipeline_stage") for r in runs)
    assert stage_runs["sft"] == 1 and stage_runs["sample"] == 1  # shared: one run each
    evals = [r for r in runs if "eval/win_rate" in r.data.metrics]
    assert len(evals) == 4  # the base arm, its beta 0.2 twin, round 1 and round 2 of the 2-round arm
    base = next(r for r in evals if r.info.run_name == "synthetic-k4-best_worst-gap0-n4·eval")
    assert base.data.params["arm.synthetic_pairs"] == "4" and base.data.params["arm.rule"] == "best_worst"
    # Rounds never reuse a prompt, and never a held-out one.
    r1 = {p["prompt_id"] for p in read_jsonl(root / "pairs/k4-best_worst-gap0-n4-r1of2/pairs.jsonl")}
    r2 = {p["prompt_id"] for p in read_jsonl(root / "pairs/k4-best_worst-gap0-n4-r2of2/pairs.jsonl")}
    held_out = {r["prompt_id"] for r in read_jsonl(ROOT / "synpref/sample/test_prefs.jsonl")}
    assert r1 and r2 and not r1 & r2 and not (r1 | r2) & held_out
    parent = json.loads((root / "pipeline" / "parent_run.json").read_text())["run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"scaling.csv", "win_rate_vs_pairs.png", "win_rate_per_round.png"} <= artifacts

    main(["reproduce", "--config", str(path)])
    again = capsys.readouterr().out
    assert again.count("… skipped (up to date)") == 14 and "… running" not in again

    # One DPO setting of one arm changes: only that arm's DPO and evaluation would run.
    config["study"]["sweeps"][1] = {"model.init_args.beta": [0.3]}
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    main(["reproduce", "--config", str(path), "--dry_run", "true"])
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(" … ")[0].split("] ")[1] for line in plan if line.startswith("[") and "would run" in line] == [
        "dpo-synthetic-k4-best_worst-gap0-n4-beta0.3",
        "eval-synthetic-k4-best_worst-gap0-n4-beta0.3",
    ]


def test_full_scale_grid_expands_and_its_stages_resolve(monkeypatch):
    from synpref.pipeline.stages import resolve_config

    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "configs" / "scaling.yaml").read_text())
    study, shared = Study(**config["study"]), [Stage(**s) for s in config["stages"]]
    stages, _ = expand(study, shared)
    kinds = Counter(s.name.split("-", 1)[0] for s in stages)
    assert kinds == {"dpo": 19, "eval": 19, "pairs": 16, "sample": 3}
    by_kind = {s.name.split("-", 1)[0]: s for s in stages}  # the last of each kind: a round-3 arm
    dpo = resolve_config(by_kind["dpo"])
    assert (
        dpo["model.init_args.policy.name_or_path"].startswith("artifacts/scaling/dpo/")
        and dpo["model.init_args.beta"] == 0.1
    )
    assert dpo["model.init_args.ref_model.name_or_path"] is None  # reference: previous = the round's init
    assert resolve_config(by_kind["eval"])["model.init_args.baseline.name_or_path"] == "artifacts/sft"
    assert resolve_config(by_kind["sample"])["data.init_args.skip_prompts"] == 40000
    pairs = resolve_config(by_kind["pairs"])
    assert (pairs["k"], pairs["rule"], pairs["exclude"][0]) == (
        8,
        "best_worst",
        "HuggingFaceH4/ultrafeedback_binarized",
    )


@pytest.mark.parametrize("path", ["configs/tiny/losses.yaml", "configs/losses.yaml"])
def test_loss_study_expands_and_its_stages_resolve(path, monkeypatch):
    """loss as a grid variable: pair losses share one pairs stage; KTO reads every sample; SimPO gets its β, γ."""
    from synpref.pipeline.stages import resolve_config

    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / path).read_text())
    study, shared = Study(**config["study"]), [Stage(**s) for s in config["stages"]]
    stages, info = expand(study, shared)
    kinds = Counter(s.name.split("-", 1)[0] for s in stages)
    assert kinds == {"dpo": 10, "eval": 10, "pairs": 1}
    by_name = {s.name: s for s in stages}
    kto = by_name["dpo-synthetic-kto"]
    assert kto.needs == ["sft", "sample"] and not any(n.startswith("pairs") for n in kto.needs)
    resolved = resolve_config(kto)
    assert resolved["model.class_path"].endswith("KTOModule") and resolved["data.class_path"].endswith(
        "UnpairedDataModule"
    )
    (source,) = resolved["data.init_args.sources"]
    assert source["format"] == "samples" and source["path"].endswith("samples/samples.jsonl")
    assert source["label_rule"] == "median"
    assert info["eval-synthetic-kto"].values == {"data": "synthetic", "rounds": 1, "reference": "sft", "loss": "kto"}
    simpo = resolve_config(next(s for n, s in by_name.items() if n.startswith("dpo-synthetic") and "losssimpo" in n))
    assert (simpo["model.init_args.loss_type"], simpo["model.init_args.beta"]) == ("simpo", 2.0)
    assert simpo["model.init_args.ref_model.name_or_path"] is None  # reference-free: no path given
    ipo = resolve_config(by_name["dpo-ultrafeedback-lossipo"])
    assert ipo["model.init_args.loss_type"] == "ipo" and ipo["model.init_args.beta"] == 0.1
    assert resolve_config(by_name["dpo-ultrafeedback-kto"])["data.init_args.sources"][0]["format"] == (
        "ultrafeedback_binarized"
    )


def test_bad_loss_arm_is_named():
    study, _ = tiny_study()
    study.sweeps = [{"loss": ["dpo"]}]
    with pytest.raises(ConfigError, match=r"study.sweeps\[0\].loss.*'dpo'"):
        arms(study)
    study.sweeps = [{"loss": ["kto"], "rounds": [2]}]
    with pytest.raises(ConfigError, match="1 for loss kto"):
        arms(study)


def test_pairs_stage_keeps_who_scored_the_samples(tmp_path):
    """A DPO run on `synpref pairs` output is self-judged by the sampler's reward, as one on the sampler's
    own pairs.jsonl is: stats.json carries the sampling run's reward name (`labelled_by`)."""
    from synpref.judges import labellers

    for folder in ("run", "bare"):
        (tmp_path / folder).mkdir()
    samples = _samples(tmp_path / "run" / "samples.jsonl", [[0.1, 0.9] for _ in range(3)])
    (tmp_path / "run" / "run.json").write_text(json.dumps({"module": {"reward": "synpref.rewards.RuleReward"}}))
    build_pairs(samples, str(tmp_path / "pairs"))
    pairs = type("Source", (), {"path": str(tmp_path / "pairs" / "pairs.jsonl")})
    assert labellers([pairs]) == ["synpref.rewards.RuleReward"]
    build_pairs(_samples(tmp_path / "bare" / "samples.jsonl", [[0.1, 0.9]]), str(tmp_path / "bare_pairs"))
    assert labellers([type("Source", (), {"path": str(tmp_path / "bare_pairs" / "pairs.jsonl")})]) == []
