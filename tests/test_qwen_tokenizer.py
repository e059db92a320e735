"""Qwen2.5's tokenizer built offline: the same ids as tiktoken on the same ranks, published ids, specials."""

from __future__ import annotations

import unicodedata

import pytest

from synpref.core.chat import IGNORE_INDEX, chat_messages, encode_conversation
from synpref.core.qwen_tokenizer import (
    FIRST_SPECIAL_ID,
    NON_SPECIAL_ADDED,
    PATTERN,
    SPECIALS,
    load_ranks,
    qwen2_5_tokenizer,
)
from tests.conftest import read_jsonl

TOKENS = 151_665  # 151,643 BPE ranks + 22 added tokens


@pytest.fixture(scope="module")
def tok():
    return qwen2_5_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """An independent encoder: tiktoken's own BPE over the same ranks, regex and added tokens."""
    tiktoken = pytest.importorskip("tiktoken")
    added = {t: FIRST_SPECIAL_ID + i for i, t in enumerate((*SPECIALS, *NON_SPECIAL_ADDED))}
    return tiktoken.Encoding("qwen2.5", pat_str=PATTERN, mergeable_ranks=load_ranks(), special_tokens=added)


def conversations(sample_dir):
    """Every packaged row as a conversation: SmolTalk's messages, UltraFeedback's chosen and rejected."""
    rows = [r["messages"] for r in read_jsonl(sample_dir / "sft_messages.jsonl")]
    for name in ("train_prefs.jsonl", "test_prefs.jsonl"):
        rows += [r[key] for r in read_jsonl(sample_dir / name) for key in ("chosen", "rejected")]
    return rows


def test_ids_equal_tiktoken_on_every_packaged_row(tok, reference, sample_dir):
    convs = conversations(sample_dir)
    assert len(convs) == 500 + 2 * 500
    for i, messages in enumerate(convs):
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # Qwen's tokenizers NFC-normalise first (tokenizer.json's normalizer; tokenization_qwen2.py).
        assert ids == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all"), i
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), i  # decoding round-trips
        if all(m["content"].strip() for m in messages):  # synpref drops a row with an empty reply
            labels = encode_conversation(tok, chat_messages(messages))["labels"]
            assert max(labels) < TOKENS and any(label != IGNORE_INDEX for label in labels)


def test_text_that_needs_normalising_and_odd_bytes_round_trip(tok, reference):
    text = "Cafe\u0301 \u00e9\u0301 🦙 tab\there  \n\n\r\n  x'LL 12345 中文字符 \x00\x7f"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nfc = unicodedata.normalize("NFC", text)
    assert nfc != text and ids == reference.encode(nfc)
    assert tok.decode(ids) == nfc


def test_special_tokens_have_qwen2_5_ids(tok):
    assert len(tok) == TOKENS and len(load_ranks()) == FIRST_SPECIAL_ID
    names = (*SPECIALS, *NON_SPECIAL_ADDED)
    assert len(names) == 22 and names[-1] == "<|file_sep|>"
    assert tok.convert_tokens_to_ids(list(names)) == list(range(151_643, 151_665))
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    assert tok.eos_token_id == tok.pad_token_id == 151_643
    # An added token in text is one id, never split by the BPE; the special ones vanish when skipped.
    assert tok("a<|im_end|><tool_call>", add_special_tokens=False)["input_ids"] == [64, 151_645, 151_657]
    assert tok.decode([64, 151_645, 151_657], skip_special_tokens=True) == "a<tool_call>"


def test_published_qwen2_5_ids(tok):
    """TRL's docstrings print Qwen2.5-VL-7B-Instruct's tokens (Qwen2.5's vocabulary and ChatML) for these
    conversations: trl/trainer/dpo_trainer.py (DataCollatorForVisionPreference) and sft_trainer.py
    (DataCollatorForVisionLanguageModeling), TRL 1.x. The image placeholders are left out here."""
    system = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]  # "You are a helpful assistant."
    cases = [
        ("What is this?", "This is a cat.", [3838, 374, 419, 30], [1986, 374, 264, 8251, 13]),
        ("What is this?", "This is a dog.", [3838, 374, 419, 30], [1986, 374, 264, 5562, 13]),
        ("Describe this image.", "A beautiful landscape.", [74785, 419, 2168, 13], [32, 6233, 18414, 13]),
        ("Describe this image.", "An urban cityscape.", [74785, 419, 2168, 13], [2082, 15662, 3283, 57518, 13]),
    ]
    for user, reply, user_ids, reply_ids in cases:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply},
        ]
        want = system + [151644, 872, 198, *user_ids, 151645, 198, 151644, 77091, 198, *reply_ids, 151645, 198]
        assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == want


def test_the_template_is_qwen2_5s(tok):
    """Without a system turn Qwen2.5's template adds its default one; the generation prompt opens a turn."""
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_saved_tokenizer_loads_back_the_same(tok, tmp_path, sample_dir):
    """What build-model writes, as `AutoTokenizer` (transformers' Qwen2Tokenizer) reads it back."""
    from synpref.core.models import load_tokenizer

    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert len(loaded) == TOKENS and loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    for messages in conversations(sample_dir)[:50]:
        text = tok.apply_chat_template(messages, tokenize=False)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
