"""Assistant-only label masks, checked token by token against a hand-built ChatML tokenization."""

from __future__ import annotations

import json

import pytest

from synpref.core.chat import IGNORE_INDEX, encode_conversation
from synpref.core.models import load_tokenizer
from synpref.data import SmolTalkDataModule
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def rows(sample_dir):
    return read_jsonl(sample_dir / "sft_messages.jsonl")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def hand_built(tok, messages):
    """ChatML by hand, piece by piece: <|im_start|> role \\n content <|im_end|> \\n per message.

    Special tokens and the newline each stand alone for a byte-level BPE, so tokenizing the pieces
    separately gives the tokens of the whole text. Labelled: assistant content, its <|im_end|> and the
    newline after it (as open-instruct and TRL label them).
    """
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids, labelled = [], []
    for m in messages:
        header = [start] + _ids(tok, m["role"]) + _ids(tok, "\n")
        body = _ids(tok, m["content"]) + [end]
        trailer = _ids(tok, "\n")
        ids += header + body + trailer
        labelled += [False] * len(header) + [m["role"] == "assistant"] * (len(body) + len(trailer))
    return ids, labelled


def test_multi_turn_mask_position_by_position(tok, rows):
    # Two real conversations joined into one multi-turn one, after a system turn; contents cut
    # short (at a word end) to keep the check readable.
    cut = lambda s: s[:160].rsplit(" ", 1)[0]  # noqa: E731
    (u1, a1), (u2, a2) = rows[0]["messages"], rows[1]["messages"]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": cut(u1["content"])},
        {"role": "assistant", "content": cut(a1["content"])},
        {"role": "user", "content": cut(u2["content"])},
        {"role": "assistant", "content": cut(a2["content"])},
    ]
    expected_ids, labelled = hand_built(tok, messages)
    enc = encode_conversation(tok, messages)

    assert tok.decode(expected_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert enc["input_ids"] == expected_ids
    expected_labels = [t if keep else IGNORE_INDEX for t, keep in zip(expected_ids, labelled)]
    for pos, (got, want) in enumerate(zip(enc["labels"], expected_labels)):
        assert got == want, f"position {pos} ({tok.convert_ids_to_tokens(expected_ids[pos])!r}): {got} != {want}"
    assert len(enc["labels"]) == len(expected_labels)

    # Spot checks in words: the labelled text is exactly the two replies, each closed by <|im_end|>\n.
    spans, run = [], []
    for t, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    assert spans == [messages[2]["content"] + "<|im_end|>\n", messages[4]["content"] + "<|im_end|>\n"]
    assert enc["labels"][-1] != IGNORE_INDEX and tok.decode(enc["input_ids"][-1:]) == "\n"


def test_truncation_keeps_the_head(tok, rows):
    messages = rows[0]["messages"]
    full = encode_conversation(tok, messages)
    cut = encode_conversation(tok, messages, max_length=40)
    assert cut["input_ids"] == full["input_ids"][:40] and cut["labels"] == full["labels"][:40]


def test_truncated_away_conversations_are_dropped_and_counted(tok, rows, tmp_path, caplog):
    rows = rows[:60]
    # Independent count: a conversation loses every assistant token when its prompt (the user
    # turn plus the assistant header) already fills max_length.
    prompt_lens = [
        len(tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=False))
        for r in rows
    ]
    max_length = sorted(prompt_lens)[len(rows) // 2]
    expected_dropped = sum(n >= max_length for n in prompt_lens)
    assert 0 < expected_dropped < len(rows)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    dm = SmolTalkDataModule(tok.name_or_path, path=str(path), max_length=max_length, batch_size=4)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.drop_counts == {"train/truncated": expected_dropped}
    assert len(dm.train_set) == len(rows) - expected_dropped
    assert "truncated" in caplog.text and str(path) in caplog.text
    for row in dm.train_set:
        assert len(row["input_ids"]) <= max_length and any(label != IGNORE_INDEX for label in row["labels"])
