"""Bad data files at every stage: one `synpref: error:` line naming the file, row and field."""

from __future__ import annotations

import json

import pytest

from tests.test_errors import CHAT, DPO, PAIR, SAMPLE, SFT, fails, write

# -- bad data files, each stage ----------------------------------------------------------------
BAD_CHATS = {
    "non-UTF-8": (
        json.dumps(CHAT).encode() + b"\n" + json.dumps(CHAT).encode().replace(b"Blue", b"Bl\xe9u") + b"\n",
        "row 1: not valid UTF-8 (byte 0xe9",
    ),
    "empty": (b"", "the file is empty"),
    "integer content": (
        [CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}],
        "row 1: field 'messages[1].content': expected a string, got int",
    ),
    "cut JSON": (json.dumps(CHAT).encode() + b"\n" + json.dumps(CHAT).encode()[:-9] + b"\n", "row 1: not valid JSON"),
    "unknown sharegpt from": (
        [CHAT, {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}],
        "row 1: field 'conversations[1].from': unknown sharegpt role 'bot'",
    ),
    "no assistant turn": ([{"messages": CHAT["messages"][:1]}], "row 0: field 'messages': no assistant turn"),
}


@pytest.mark.parametrize("case", BAD_CHATS)
def test_bad_sft_file(in_tmp, capsys, case):
    content, expected = BAD_CHATS[case]
    path = write(in_tmp / "sft.jsonl", content)
    fails(capsys, [*SFT, f"--data.init_args.path={path}"], path, expected)


def test_one_row_sft_file_with_val_fraction(in_tmp, capsys):
    path = write(in_tmp / "one.jsonl", [CHAT])
    fails(
        capsys,
        [*SFT, f"--data.init_args.path={path}"],
        "'data.init_args.val_fraction'",
        "0.05 of 1 usable rows",
        "val_fraction: 0",
    )


def test_missing_data_file(in_tmp, capsys):
    fails(capsys, [*SFT, "--data.init_args.path=data/nope.jsonl"], "data/nope.jsonl", "does not exist")


BAD_PAIRS = {
    "integer chosen": ([{**PAIR, "chosen": 7}], "row 0: field 'chosen': expected a non-empty list"),
    "unknown sharegpt from": (
        [{**PAIR, "rejected": [{"from": "robot", "value": "Cheese."}]}],
        "row 0: field 'rejected[0].from': unknown sharegpt role 'robot'",
    ),
    "identical replies": ([{**PAIR, "rejected": "Blue."}], "row 0: field 'rejected': identical to chosen"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_preference_file(in_tmp, capsys, case):
    rows, expected = BAD_PAIRS[case]
    path = write(in_tmp / "pairs.jsonl", rows)
    fails(
        capsys,
        [*DPO, f"--data.init_args.sources=[{{path: {path}, format: trl}}]", "--data.init_args.on_bad_row=error"],
        path,
        expected,
    )


def test_bad_prompt_file(in_tmp, capsys):
    path = write(in_tmp / "prompts.jsonl", [{"prompt": "Name a colour."}, {"prompt": ["not a message"]}])
    fails(
        capsys,
        [*SAMPLE, f"--data.init_args.path={path}"],
        path,
        "row 1: field 'prompt[0]': expected a {role, content} object",
    )


def test_no_prompts_left_names_the_filters(in_tmp, capsys):
    fails(
        capsys,
        [*SAMPLE, "--data.init_args.path=synpref://sample/test_prefs.jsonl", "--data.init_args.max_prompts=null"],
        "no prompts left",
        "'excluded': 92",
        "'too_long': 8",
        "synpref://sample/test_prefs.jsonl",
    )
    assert not (in_tmp / "artifacts/tiny/samples/samples.jsonl").exists()
