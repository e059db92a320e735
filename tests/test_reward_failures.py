"""A reward that raises is named with the scorer, the prompt's index and the exception, in one line."""

from __future__ import annotations

from typing import Sequence

import pytest

from synpref.cli import main
from synpref.rewards.base import RewardError, RewardScorer, score_checked
from synpref.rewards.rules import FunctionReward
from tests.test_errors import EVAL, SAMPLE, fails, write

FN = "tests.test_reward_failures:breaks_on_fruit"


def breaks_on_fruit(prompt: str, response: str) -> float:
    if "fruit" in prompt:
        raise KeyError("no fruit table loaded")
    return 1.0


class BatchBreaks(RewardScorer):
    name = "batch-model"

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        raise RuntimeError("CUDA out of memory (pretend)")


PROMPTS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Name a fruit."}]]


def test_a_function_that_raises_names_the_prompt_index():
    with pytest.raises(RewardError) as error:
        score_checked(FunctionReward(FN), PROMPTS * 2, ["a", "b", "c", "d"], indices=[40, 41, 40, 41])
    message = str(error.value)
    assert f"reward {FN!r} raised KeyError: 'no fruit table loaded'" in message
    assert "prompt 41 ('Name a fruit.')" in message
    assert isinstance(error.value.__cause__, KeyError)  # --debug shows where it was raised


def test_a_batch_scorer_that_raises_names_the_batch():
    with pytest.raises(
        RewardError, match=r"'batch-model' raised RuntimeError: CUDA out of memory \(pretend\)"
    ) as error:
        score_checked(BatchBreaks(), PROMPTS * 2, ["a", "b", "c", "d"], indices=[7, 8, 7, 8])
    assert "prompts 7, 8" in str(error.value)


@pytest.mark.parametrize("stage", ["sample", "eval"])
def test_a_raising_reward_ends_the_command_in_one_line(in_tmp, capsys, stage):
    prompts = write(in_tmp / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}])
    reward = f"--model.init_args.reward={{class_path: synpref.rewards.FunctionReward, init_args: {{fn: '{FN}'}}}}"
    args = [*(SAMPLE if stage == "sample" else EVAL), f"--data.init_args.path={prompts}", reward]
    args.append("--model.init_args.output_dir=out")
    fails(capsys, args, f"reward {FN!r} raised KeyError: 'no fruit table loaded'", "prompt 1 ('Name a fruit.')")
    with pytest.raises(RewardError) as error:  # --debug: the exception itself, with its traceback
        main([*args, "--debug"])
    assert isinstance(error.value.__cause__, KeyError)
