"""Several judges per evaluation: per-judge outcomes, metrics and agreement, clustering by prompt, self-judging."""

from __future__ import annotations

import json
import logging
import os
import re
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence, Union

from synpref.core.metrics import LOSS, TIE, WIN, WinRate, outcome
from synpref.core.stats import (
    PREFERENCE,
    agreement,
    cluster_bootstrap_interval,
    clustered_sign_test_p,
    cohen_kappa,
    length_controlled_win_rate,
)
from synpref.rewards.base import OnBadScore, RewardScorer, score_checked
from synpref.rewards.pairwise import PairwiseJudge

log = logging.getLogger(__name__)

Judge = Union[RewardScorer, PairwiseJudge]
#: Where a DPO export records which scorers labelled its training pairs (read back at evaluation).
PROVENANCE_FILE = "synpref_provenance.json"
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def short_label(name: str) -> str:
    """A judge's name as a metric-name label: 'synpref.rewards.RuleReward' → RuleReward, 'pkg.mod:fn' → fn."""
    base = re.split(r"[/:]", name.split("@")[0])[-1]
    base = base.split(".")[-1] if _DOTTED.match(base) else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def judge_labels(judges: Sequence[Judge]) -> list[str]:
    """Short, unique metric-name labels: 'synpref.rewards.RuleReward' → RuleReward,
    'pkg.mod:fn' → fn, 'org/model@url' → model; repeats get _2, _3."""
    labels: list[str] = []
    for judge in judges:
        base = short_label(str(getattr(judge, "name", "") or type(judge).__name__)) or type(judge).__name__
        label, k = base, 2
        while label in labels:
            label, k = f"{base}_{k}", k + 1
        labels.append(label)
    return labels


def judge_batch(
    judges: Sequence[Judge],
    labels: Sequence[str],
    prompts: Sequence[Sequence[dict]],
    policy: Sequence[str],
    baseline: Sequence[str],
    tie_tolerance: float = 0.0,
    on_bad_score: OnBadScore = "error",
    indices: Optional[Sequence[int]] = None,
) -> list[dict]:
    """Per prompt: {label: verdict} with, for a reward judge, both rewards and the outcome; for a
    pairwise judge, its record (outcome None when it gave no valid verdict). Reward judges score
    both models' replies in one call (a local model then encodes each prompt once). With
    on_bad_score='skip', a reward judge's verdict is None where either reply got no finite score;
    `indices` (one per prompt) name the prompt a failing judge failed on."""
    out: list[dict] = [{} for _ in prompts]
    for judge, label in zip(judges, labels):
        if isinstance(judge, PairwiseJudge):
            verdicts = judge.judge(prompts, policy, baseline)
            if len(verdicts) != len(prompts):
                raise ValueError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(prompts)} prompts")
        else:
            both = None if indices is None else list(indices) * 2
            rewards = score_checked(
                judge, list(prompts) + list(prompts), list(policy) + list(baseline), on_bad_score, both
            )
            verdicts = [
                None
                if p is None or b is None
                else {"policy_reward": p, "baseline_reward": b, "outcome": outcome(p, b, tie_tolerance)}
                for p, b in zip(rewards[: len(prompts)], rewards[len(prompts) :])
            ]
        for row, verdict in zip(out, verdicts):
            row[label] = verdict
    return out


def outcome_metrics(rows: Sequence[dict], tie_tolerance: float, length_match_ratio: float, seed: int = 0) -> dict:
    """WinRate metrics of one judge over rows of (index, outcome, policy_reward, baseline_reward,
    policy_length, baseline_length), plus the length-controlled win rate; when some prompt has more
    than one answer per model, the interval is a cluster bootstrap over prompts and the sign test is
    taken over prompts (`clustered` = 1)."""
    metric = WinRate(tie_tolerance=tie_tolerance, length_match_ratio=length_match_ratio, sync_on_compute=False)
    if rows:
        metric.update(
            *zip(*[(r["policy_reward"], r["baseline_reward"], r["policy_length"], r["baseline_length"]) for r in rows])
        )
    result = metric.compute()
    result["length_controlled_win_rate"] = length_controlled_win_rate(
        [r["outcome"] for r in rows], [r["policy_length"] for r in rows], [r["baseline_length"] for r in rows]
    )
    by_prompt: dict[int, list[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["index"], []).append(r["outcome"])
    result["n_prompts"] = float(len(by_prompt))
    if any(len(c) > 1 for c in by_prompt.values()):
        clusters = list(by_prompt.values())
        low, high = cluster_bootstrap_interval([[o == WIN for o in c] for c in clusters], seed=seed)
        result.update(
            win_rate_ci_low=low, win_rate_ci_high=high, sign_test_p=clustered_sign_test_p(clusters), clustered=1.0
        )
    return result


def _judge_rows(records: Sequence[dict], label: Optional[str]) -> list[dict]:
    """One judge's rows (the record's own fields for the primary judge, label None); a pairwise
    verdict's 'rewards' are its preference (win 1, tie ½, loss 0); no-verdict rows are left out."""
    rows = []
    for r in records:
        v = r if label is None else r["judges"][label]
        if v.get("outcome") is None:
            continue
        rewards = (
            (v["policy_reward"], v["baseline_reward"])
            if "policy_reward" in v
            else (PREFERENCE[v["outcome"]], 1 - PREFERENCE[v["outcome"]])
        )
        rows.append(
            {
                "index": r["index"],
                "outcome": v["outcome"],
                "policy_reward": rewards[0],
                "baseline_reward": rewards[1],
                "policy_length": r["policy_length"],
                "baseline_length": r["baseline_length"],
            }
        )
    return rows


def judge_metrics(
    records: Sequence[dict],
    tie_tolerance: float,
    length_match_ratio: float,
    self_judged: Optional[dict] = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics computed from the merged records (all processes'): for the primary judge the
    length-controlled win rate (and, with several answers per prompt, the clustered interval and
    sign test) under its usual names; with several judges, every judge's metrics as
    `eval/<label>/<metric>` (pairwise judges add `position_bias_rate` and `unparseable`) and every
    pair's `eval/agreement/<a>/<b>` and `eval/kappa/<a>/<b>`; `self_judged` (label → bool, the
    primary judge first) as `eval/<label>/self_judged` and, for the primary judge, `self_judged`."""
    self_judged = self_judged or {}
    primary = outcome_metrics(_judge_rows(records, None), tie_tolerance, length_match_ratio, seed)
    keep = ["length_controlled_win_rate", "n_prompts"] + (
        ["win_rate_ci_low", "win_rate_ci_high", "sign_test_p", "clustered"] if "clustered" in primary else []
    )
    out = {k: primary[k] for k in keep}
    labels = list(records[0].get("judges", {})) if records else []
    if self_judged:  # its first entry is the primary judge's
        out["self_judged"] = float(next(iter(self_judged.values())))
    for label in labels:
        for k, v in outcome_metrics(_judge_rows(records, label), tie_tolerance, length_match_ratio, seed).items():
            out[f"eval/{label}/{k}"] = v
        verdicts = [r["judges"][label] for r in records]
        if any("position_bias" in v for v in verdicts):
            parsed = [v for v in verdicts if v.get("outcome") is not None]
            out[f"eval/{label}/position_bias_rate"] = (
                sum(v["position_bias"] for v in parsed) / len(parsed) if parsed else float("nan")
            )
            out[f"eval/{label}/unparseable"] = float(len(verdicts) - len(parsed))
        if label in self_judged:
            out[f"eval/{label}/self_judged"] = float(self_judged[label])
    for a, b in combinations(labels, 2):
        both = [
            (r["judges"][a]["outcome"], r["judges"][b]["outcome"])
            for r in records
            if r["judges"][a].get("outcome") is not None and r["judges"][b].get("outcome") is not None
        ]
        x, y = [p[0] for p in both], [p[1] for p in both]
        out[f"eval/agreement/{a}/{b}"] = agreement(x, y)
        out[f"eval/kappa/{a}/{b}"] = cohen_kappa(x, y)
    return out


def metric_name(prefix: str, key: str) -> str:
    """The logged name: per-judge names already carry their `eval/` prefix; others get `prefix`."""
    return key if key.startswith("eval/") else prefix + key


# -- provenance: which scorer labelled a policy's training pairs ---------------------------------
def labellers(sources: Sequence) -> list[str]:
    """Names of the scorers that labelled preference `sources` (objects with a .path): a sampling
    run's pairs.jsonl or samples.jsonl sits next to its run.json, which records the reward's name;
    `synpref pairs` copies it into the stats.json beside the pairs it builds (`labelled_by`)."""
    from synpref.core.resources import resolve

    names = []
    for src in sources:
        folder = Path(resolve(str(src.path))).parent
        run, stats = folder / "run.json", folder / "stats.json"
        if run.is_file():
            found = [json.loads(run.read_text()).get("module", {}).get("reward")]
        elif stats.is_file():
            found = json.loads(stats.read_text()).get("labelled_by", [])
        else:
            found = []
        names += [name for name in found if name and name not in names]
    return names


def write_provenance(dirpath, labelled_by: Sequence[str]) -> None:
    Path(dirpath, PROVENANCE_FILE).write_text(json.dumps({"labelled_by": list(labelled_by)}, indent=1) + "\n")


def read_provenance(model_name_or_path: str) -> list[str]:
    """The scorers that labelled a local export's training pairs ([] when not recorded)."""
    path = Path(model_name_or_path, PROVENANCE_FILE)
    return list(json.loads(path.read_text()).get("labelled_by", [])) if path.is_file() else []


def self_judged(judges: Sequence[Judge], labels: Sequence[str], labelled_by: Sequence[str]) -> dict[str, bool]:
    """label → True when that judge is the scorer that labelled the policy's training pairs."""
    result = {label: getattr(j, "name", None) in set(labelled_by) for j, label in zip(judges, labels)}
    # Under `synpref reproduce` the pipeline's table says it, once for all stages.
    level = logging.DEBUG if os.environ.get("SYNPREF_PIPELINE_STAGE") else logging.WARNING
    for label, same in result.items():
        if same:
            log.log(
                level,
                "judge %s is the scorer that labelled the policy's training pairs: its win rate is "
                "SELF-JUDGED (the policy was trained to please it); read an independent judge",
                label,
            )
    return result


__all__ = [
    "Judge",
    "judge_labels",
    "judge_batch",
    "judge_metrics",
    "outcome_metrics",
    "labellers",
    "read_provenance",
    "write_provenance",
    "self_judged",
    "WIN",
    "TIE",
    "LOSS",
]
