"""Policy vs baseline on a batch of prompts: both generate, the judges score both replies (WinRateModule's and the in-training evaluation's one path)."""

from __future__ import annotations

from typing import Optional, Sequence

from synpref.core.specs import Decoding
from synpref.generators import Generator, generate_texts
from synpref.judges import Judge, judge_batch, judge_labels
from synpref.rewards.base import OnBadScore, RewardScorer, score_checked


def compare_batch(
    policy,
    policy_tokenizer,
    baseline,
    baseline_tokenizer,
    reward: RewardScorer,
    prompts: Sequence[Sequence[dict]],
    decoding: Decoding,
    indices: Sequence[int],
    generators: Sequence[Optional[Generator]] = (None, None),
    names: Sequence[str] = ("", ""),
    judges: Sequence[Judge] = (),
    samples_per_prompt: int = 1,
    tie_tolerance: float = 0.0,
    on_bad_score: OnBadScore = "error",
) -> tuple[list[dict], int]:
    """`samples_per_prompt` responses per prompt from each model (same decoding, same seeds: sample
    k of both models shares its random numbers), all scored by `reward`; one record per response
    pair, prompt-major, with its prompt's `index` (and `sample` = k when there are several).

    `decoding.seed` is the run's seed and `indices` the prompts' indices (see `generate_texts`). A model
    whose entry in `generators` is set is asked through it under its name in `names` (its path);
    the others generate in-process.

    The one generate-and-score path of predict-time (WinRateModule) and train-time
    (PeriodicWinRate) evaluation. Lengths are generated tokens (each model's
    own tokenizer), without the end-of-turn token. With `judges` (`reward` first among them), each
    record also carries `judges`: every judge's verdict by label (synpref.judges).

    Returns the records and how many response pairs were dropped: with on_bad_score='skip', a pair
    where a reward judge gave either reply no finite score is left out (not a loss, not a tie);
    with 'error' that score is a RewardError naming the scorer and the prompt.
    """
    n = samples_per_prompt
    prompts = [list(p) for p in prompts]
    policy_texts, policy_lengths = generate_texts(
        generators[0], policy, policy_tokenizer, names[0], prompts, indices, decoding, num_return_sequences=n
    )
    baseline_texts, baseline_lengths = generate_texts(
        generators[1],
        baseline,
        baseline_tokenizer,
        names[1],
        prompts,
        indices,
        decoding,
        num_return_sequences=n,
    )
    flat = [(int(i), p, k) for i, p in zip(indices, prompts) for k in range(n)]
    prompts = [p for _, p, _ in flat]
    flat_list = lambda rows: [x for row in rows for x in row]
    policy_texts, baseline_texts = flat_list(policy_texts), flat_list(baseline_texts)
    policy_lengths, baseline_lengths = flat_list(policy_lengths), flat_list(baseline_lengths)
    if judges:
        labels = judge_labels(judges)
        verdicts = judge_batch(
            judges, labels, prompts, policy_texts, baseline_texts, tie_tolerance, on_bad_score, [i for i, *_ in flat]
        )
        # A pair some reward judge could not score is dropped for every judge: all judge the same pairs.
        rewards = [
            (v[labels[0]]["policy_reward"], v[labels[0]]["baseline_reward"]) if None not in v.values() else None
            for v in verdicts
        ]
    else:
        # One call for both models' replies: a local reward model then encodes each prompt once.
        scored = [i for i, *_ in flat] * 2
        scores = score_checked(reward, prompts + prompts, policy_texts + baseline_texts, on_bad_score, scored)
        rewards = [None if None in pair else pair for pair in zip(scores[: len(prompts)], scores[len(prompts) :])]
    records = []
    for j, (index, prompt, k) in enumerate(flat):
        if rewards[j] is None:
            continue
        record = {"index": index, **({"sample": k} if n > 1 else {}), "prompt": prompt}
        record.update(
            policy_response=policy_texts[j],
            baseline_response=baseline_texts[j],
            policy_reward=float(rewards[j][0]),
            baseline_reward=float(rewards[j][1]),
            policy_length=int(policy_lengths[j]),
            baseline_length=int(baseline_lengths[j]),
        )
        if judges:
            record["judges"] = verdicts[j]
        records.append(record)
    return records, len(flat) - len(records)
