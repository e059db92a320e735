"""Sharegpt turns ({from, value}) read as OpenAI messages by SFT, prompt and preference data; an unknown `from` is named."""

from __future__ import annotations

import json

import pytest

from synpref.core.chat import chat_messages
from synpref.core.errors import DataError
from synpref.data import PreferenceDataModule, PreferenceSource, PromptDataModule, SmolTalkDataModule

OPENAI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Red."},
]
# The same conversation as argilla/axolotl/LLaMA-Factory write it: both spellings of each role.
SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Name a colour."},
    {"from": "gpt", "value": "Blue."},
    {"from": "user", "value": "Another?"},
    {"from": "assistant", "value": "Red."},
]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_roles_map():
    assert chat_messages(SHAREGPT) == OPENAI
    with pytest.raises(ValueError, match=r"messages\[2\]\.from: unknown sharegpt role 'bot'"):
        chat_messages(SHAREGPT[:2] + [{"from": "bot", "value": "Blue."}])
    with pytest.raises(ValueError, match=r"messages\[1\]\.value: expected a string, got int"):
        chat_messages([SHAREGPT[0], {"from": "human", "value": 5}])


def test_sft_conversations(tiny_model, tmp_path):
    def tokens(rows):
        dm = SmolTalkDataModule(tiny_model, path=write(tmp_path / "sft.jsonl", rows), batch_size=2)
        dm.setup("fit")
        return dm.train_set[:]["input_ids"], dm.train_set[:]["labels"]

    # `conversations` (sharegpt's column) or `messages` holding sharegpt turns: the same tokens and labels.
    assert tokens([{"conversations": SHAREGPT}]) == tokens([{"messages": SHAREGPT}]) == tokens([{"messages": OPENAI}])
    bad = SHAREGPT[:2] + [{"from": "model", "value": "Blue."}]
    with pytest.raises(DataError) as e:
        tokens([{"conversations": SHAREGPT}, {"conversations": bad}])
    assert (e.value.row, e.value.field) == (1, "conversations[2].from") and str(tmp_path / "sft.jsonl") in str(e.value)


def test_prompts(tiny_model, tmp_path):
    def prompts(rows):
        dm = PromptDataModule(tiny_model, write(tmp_path / "p.jsonl", rows), batch_size=4)
        dm.setup("predict")
        return dm.prompts["prompt"]

    # A prompt list in sharegpt turns, or a whole conversation cut after its last user turn.
    assert prompts([{"prompt": SHAREGPT[:2]}, {"conversations": SHAREGPT}]) == [OPENAI[:2], OPENAI[:4]]
    with pytest.raises(DataError) as e:
        prompts([{"prompt": SHAREGPT[:2]}, {"prompt": [{"from": "person", "value": "hi"}]}])
    assert (e.value.row, e.value.field) == (1, "prompt[0].from")


def test_preference_pairs(tiny_model, tmp_path):
    def pairs(row):
        source = PreferenceSource(path=write(tmp_path / "pairs.jsonl", [row]), format="trl")
        dm = PreferenceDataModule(tiny_model, [source], batch_size=2)
        dm.setup("fit")
        return {k: dm.train_set[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}

    openai = pairs(
        {"prompt": OPENAI[:4], "chosen": [OPENAI[4]], "rejected": [{"role": "assistant", "content": "Cheese."}]}
    )
    # chosen/rejected as sharegpt lists, with an explicit prompt or as full conversations (implicit prompt).
    explicit = pairs(
        {"prompt": SHAREGPT[:4], "chosen": [SHAREGPT[4]], "rejected": [{"from": "gpt", "value": "Cheese."}]}
    )
    implicit = pairs({"chosen": SHAREGPT, "rejected": SHAREGPT[:4] + [{"from": "gpt", "value": "Cheese."}]})
    assert openai == explicit == implicit
    with pytest.raises(DataError) as e:
        pairs({"prompt": SHAREGPT[:2], "chosen": [SHAREGPT[2]], "rejected": [{"from": "chatbot", "value": "Cheese."}]})
    assert (e.value.row, e.value.field) == (0, "rejected[0].from")
