"""on_bad_score in evaluation: `error` names the scorer and the prompt; `skip` drops and counts the pair."""

import logging
import math

import lightning as L
import pytest
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader

from synpref.core.specs import Decoding, ModelSpec
from synpref.modules import WinRateModule
from synpref.rewards import FunctionReward
from synpref.rewards.base import RewardError
from tests.conftest import read_jsonl
from tests.test_evaluation import perturbed_copy

PROMPTS = [
    "Name a colour.",
    "Name a fruit.",
    "Describe the sea.",
    "What colour is the sky?",
    "Tell me about dogs.",
    "Why is grass green?",
]


def flaky_words(prompt: str, response: str):
    """Distinct words; None for both replies to a colour prompt, NaN for some replies to the fruit one."""
    if "colour" in prompt:
        return None
    if "fruit" in prompt and len(response) % 2:
        return math.nan
    return float(len(set(response.split())))


def batches(size: int) -> list[dict]:
    return [
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS[i : i + size]],
            "prompt_id": [f"p{j}" for j in range(i, min(i + size, len(PROMPTS)))],
            "index": list(range(i, min(i + size, len(PROMPTS)))),
        }
        for i in range(0, len(PROMPTS), size)
    ]


def evaluate(policy, baseline, tmp_path, on_bad_score, judges=None):
    module = WinRateModule(
        ModelSpec(policy),
        ModelSpec(baseline),
        reward=FunctionReward(f"{__name__}:flaky_words"),
        output_dir=str(tmp_path / on_bad_score),
        decoding=Decoding(max_new_tokens=10),
        figures=False,
        on_bad_score=on_bad_score,
        judges=judges,
    )
    logger = MLFlowLogger(experiment_name="bad-scores", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False)
    trainer.predict(module, DataLoader(batches(4), batch_size=None))
    return logger


def test_bad_scores_error_or_skip(tiny_model, tmp_path, caplog):
    baseline = perturbed_copy(tiny_model, tmp_path / "baseline")
    with pytest.raises(RewardError, match=r"returned None .*for the prompt 'Name a colour.'.*on_bad_score: skip"):
        evaluate(tiny_model, baseline, tmp_path, "error")
    assert not (tmp_path / "error" / "eval.jsonl").exists()

    # A second judge: the pairs go through judge_batch; a dropped pair is dropped for both judges.
    clarity = FunctionReward("synpref.rewards.heuristics:clarity")
    with caplog.at_level(logging.WARNING):
        logger = evaluate(tiny_model, baseline, tmp_path, "skip", judges=[clarity])
    rows = read_jsonl(tmp_path / "skip" / "eval.jsonl")
    kept = [r["index"] for r in rows]
    assert 0 not in kept and 3 not in kept  # both colour prompts
    assert {2, 4, 5} <= set(kept)
    dropped = len(PROMPTS) - len(rows)
    # The kept pairs' rewards are the function's, finite; the win rate is theirs alone.
    for r in rows:
        prompt = PROMPTS[r["index"]]
        assert (r["policy_reward"], r["baseline_reward"]) == (
            flaky_words(prompt, r["policy_response"]),
            flaky_words(prompt, r["baseline_response"]),
        )
    fruit = [r for r in rows if r["index"] == 1]
    assert all(len(r["policy_response"]) % 2 == 0 and len(r["baseline_response"]) % 2 == 0 for r in fruit)
    wins = sum(r["policy_reward"] > r["baseline_reward"] for r in rows)
    ties = sum(r["policy_reward"] == r["baseline_reward"] for r in rows)
    metrics = logger.experiment.get_run(logger.run_id).data.metrics
    assert metrics["eval/dropped/bad_scores"] == dropped
    assert metrics["eval/n"] == len(rows)
    assert metrics["eval/win_rate"] == pytest.approx(wins / len(rows))
    assert metrics["eval/tie_rate"] == pytest.approx(ties / len(rows))
    assert metrics["eval/clarity/n"] == metrics["eval/flaky_words/n"] == len(rows)
    assert f"eval/dropped/bad_scores: {dropped} response pairs left out of the win rate" in caplog.text
