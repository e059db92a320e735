"""`synpref pairs`: build preference pairs from a sampling run's samples.jsonl by a pair rule (the scaling study's cheap stage)."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from synpref.core.errors import ConfigError, DataError
from synpref.core.fingerprints import file_sha256
from synpref.core.lineage import PAIRS_TAG
from synpref.core.outputs import atomic_file, check_writable
from synpref.core.pairs import (
    RULES,
    Rule,
    kept_vs_threshold_capped,
    pair_row,
    select_pairs,
    threshold_grid,
)
from synpref.core.resources import resolve
from synpref.core.tracking import RunTracking, tracking_uri
from synpref.data.io import samples_by_prompt
from synpref.data.prompts import prompt_keys, text_key
from synpref.judges import labellers

log = logging.getLogger(__name__)

SAMPLE_FIELDS = ("index", "prompt_id", "sample", "prompt", "response", "score")


def read_samples(path: str) -> dict[int, dict]:
    """samples.jsonl (one row per sample, as `synpref predict` writes it) grouped by prompt index
    (`samples_by_prompt`), each row checked first: a bad one is a DataError naming file, row and field."""
    file = resolve(path)
    if not Path(file).is_file():
        raise DataError(
            file,
            None,
            "*",
            "no such file (a sampling run's samples.jsonl: `synpref predict --config configs/sample.yaml`)",
        )
    prompts = samples_by_prompt(checked_sample_rows(file))
    if not prompts:
        raise DataError(file, None, "*", "no samples (an empty file)")
    return prompts


def checked_sample_rows(file: str):
    """samples.jsonl's rows, each with every field of SAMPLE_FIELDS and a finite score (as a float)."""
    with open(file, encoding="utf-8") as f:
        for row_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(file, row_no, "*", f"not JSON ({e.msg})") from None
            for field in SAMPLE_FIELDS:
                if field not in row:
                    raise DataError(file, row_no, field, "missing")
            if not isinstance(row["score"], (int, float)) or row["score"] != row["score"]:
                raise DataError(file, row_no, "score", f"expected a finite number, got {row['score']!r}")
            yield {**row, "score": float(row["score"])}


def build_pairs(
    samples: str,
    output_dir: str,
    k: Optional[int] = None,
    rule: Rule = "best_worst",
    threshold: float = 0.0,
    max_pairs: Optional[int] = None,
    max_pairs_per_prompt: int = 3,
    first_prompt: int = 0,
    num_prompts: Optional[int] = None,
    exclude: list[str] = [],
    seed: int = 0,
    tracking: Optional[RunTracking] = None,
) -> dict:
    """Write `output_dir/pairs.jsonl` (TRL conversational preference rows, as sampling writes) and
    `stats.json`, `pairs_vs_threshold.csv` from scored samples, without sampling or scoring again.

    Args:
        samples: a sampling run's samples.jsonl (`synpref predict --config configs/sample.yaml`).
        output_dir: where pairs.jsonl, stats.json and pairs_vs_threshold.csv go.
        k: use the first k samples of each prompt (None: all). The K samples of a prompt are
            independent draws with the same decoding settings, so the first k are k such draws: the
            same distribution as a run with K = k, and nested (k=2 ⊂ k=4), so arms differing only
            in k share their random numbers and differ less by chance.
        rule: best_worst (the paper), best_random, best_vs_mean_minus_2sigma or all_above_gap
            (synpref.core.pairs.select_pairs).
        threshold: keep a pair when score_chosen − score_rejected ≥ this (ties always dropped).
        max_pairs: keep this many pairs (None: all), taken prompt by prompt in an order shuffled by
            `seed`, so a smaller count is a subset of a larger one (nested, as k).
        max_pairs_per_prompt: all_above_gap's cap per prompt.
        first_prompt: use prompts whose index is ≥ this (iterative rounds take disjoint slices).
        num_prompts: ... and < first_prompt + num_prompts (None: to the end).
        exclude: files whose prompts must not appear (held-out prompts, earlier rounds' pairs): an error if one does.
        seed: seed of best_random's choice and of the max_pairs order.
        tracking: log the run (params, `pairs/*` metrics, the CSV) to MLflow.
    """
    if rule not in RULES:
        raise ConfigError("rule", f"unknown pair rule {rule!r}; choose one of {', '.join(RULES)}")
    if k is not None and k < 2:
        raise ConfigError("k", f"must be ≥ 2 (a pair needs 2 samples), got {k}")
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError("max_pairs", f"must be ≥ 1 or null (all), got {max_pairs}")
    if not threshold >= 0:  # NaN too
        raise ConfigError("threshold", f"must be a score gap ≥ 0, got {threshold}")
    if max_pairs_per_prompt < 1:
        raise ConfigError("max_pairs_per_prompt", f"must be ≥ 1, got {max_pairs_per_prompt}")
    if first_prompt < 0 or (num_prompts is not None and num_prompts < 1):
        raise ConfigError(
            "first_prompt", f"needs first_prompt ≥ 0 and num_prompts ≥ 1 or null, got {first_prompt}, {num_prompts}"
        )
    out = Path(output_dir)
    check_writable(out)
    prompts = read_samples(samples)
    most = max(len(p["samples"]) for p in prompts.values())
    if k is not None and k > most:
        raise ConfigError(
            "k", f"k={k} but {samples} has at most {most} samples per prompt: sample with num_samples ≥ {k}"
        )
    stop = None if num_prompts is None else first_prompt + num_prompts
    chosen = [i for i in sorted(prompts) if i >= first_prompt and (stop is None or i < stop)]
    if not chosen:
        raise ConfigError("first_prompt", f"no prompt of {samples} has an index in [{first_prompt}, {stop})")
    banned = prompt_keys(exclude)
    counts, gaps_per_prompt, rows = Counter(), [], []
    for index in chosen:
        entry = prompts[index]
        if entry["prompt_id"] in banned or text_key(entry["prompt"]) in banned:
            raise DataError(
                resolve(samples), None, "prompt_id", f"prompt {entry['prompt_id']} (index {index}) is in {exclude}"
            )
        usable = [entry["samples"][j] for j in sorted(entry["samples"])][: k or None]
        counts["prompts"] += 1
        counts["samples"] += len(usable)
        if len(usable) < 2:
            counts["dropped_too_few_samples"] += 1
            continue
        texts, scores = [t for t, _ in usable], [s for _, s in usable]
        rng = random.Random(f"{seed}:{entry['prompt_id']}")
        pairs, reason, gaps = select_pairs(texts, scores, rule, threshold, max_pairs_per_prompt, rng)
        gaps_per_prompt.append(gaps)
        if reason:
            counts[f"dropped_{reason}"] += 1
        rows.append((index, [pair_row(entry["prompt_id"], entry["prompt"], texts, p) for p in pairs]))
    order = list(range(len(rows)))
    if max_pairs is not None:
        random.Random(seed).shuffle(order)
    room, taken = {}, 0  # position → how many of its pairs are kept
    for position in order:
        room[position] = len(rows[position][1]) if max_pairs is None else min(len(rows[position][1]), max_pairs - taken)
        taken += room[position]
    with atomic_file(out / "pairs.jsonl") as f:  # written in prompt order
        for position in sorted(room):
            for row in rows[position][1][: room[position]]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    cap = max_pairs_per_prompt if rule == "all_above_gap" else 1
    all_gaps = [g for gaps in gaps_per_prompt for g in gaps]
    table = kept_vs_threshold_capped(gaps_per_prompt, threshold_grid(all_gaps, threshold), cap)
    with atomic_file(out / "pairs_vs_threshold.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["threshold", "pairs_kept"])
        writer.writerows(table)
    stats = {
        **counts,
        "pairs_available": sum(len(p) for _, p in rows),
        "pairs": taken,
        "k": k or most,
        "rule": rule,
        "threshold": threshold,
        # Who scored the samples: a DPO run on these pairs marks that judge self-judged (synpref.judges).
        "labelled_by": labellers([SimpleNamespace(path=samples)]),
    }
    with atomic_file(out / "stats.json") as f:
        f.write(json.dumps(stats, indent=1) + "\n")
    shown = ", ".join(f"≥{t:g}: {n}" for t, n in table[:: max(1, len(table) // 6)])
    log.info("%s: %d pairs from %d prompts (%s); kept vs threshold %s", out, taken, counts["prompts"], rule, shown)
    if tracking is not None:
        params = dict(samples=samples, k=k, rule=rule, threshold=threshold, max_pairs=max_pairs)
        _log_run(tracking, {**params, "max_pairs_per_prompt": max_pairs_per_prompt}, stats, out)
    return stats


def _log_run(tracking: RunTracking, params: dict, stats: dict, out: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri or tracking_uri())
    run_id = tracking.start(client)
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in stats.items():
        if isinstance(value, (int, float)) and key not in ("k", "threshold"):
            client.log_metric(run_id, f"pairs/{key}", float(value))
    for name in ("stats.json", "pairs_vs_threshold.csv"):
        client.log_artifact(run_id, str(out / name), "pairs")
    client.set_tag(run_id, PAIRS_TAG, file_sha256(out / "pairs.jsonl"))  # found by content (synpref.core.lineage)
    client.set_terminated(run_id)
