"""Every local scorer gives a conversation the same score (within 1e-5 in fp32) whatever else is scored
with it: batch size 1, 7 and 64, its position in the batch, its neighbours, prefix sharing on and off,
and a tokenizer whose pad token is the end-of-turn EOS token (HFRewardModel pads right, NemotronReward
pads left: each scorer's own padding side is exercised)."""

import shutil

import pytest
from transformers import AutoConfig, AutoTokenizer

from synpref.rewards import FunctionReward, HFRewardModel, NemotronReward, RuleReward
from tests.conftest import read_jsonl
from tests.test_rewards import tiny_classifier  # noqa: F401  (fixture)

WORDS = (
    "the light of the sun reaches plants which store it as sugar while water rises through roots and "
    "leaves open small pores to take in air"
).split()


@pytest.fixture(scope="module")
def pool(sample_dir):
    """64 conversations of varied lengths; the target (index 0) shares its prompt with five others."""
    # Short conversations (the first 60 characters of sample prompts) keep the 64-row batches cheap.
    questions = [
        [{"role": "user", "content": r["prompt"][:60]}] for r in read_jsonl(sample_dir / "test_prefs.jsonl")[:20]
    ]
    convs = [(questions[0], "Sugar, made from light, water and air.")]
    convs += [(questions[0], " ".join(WORDS[: 3 + 4 * k]) + ".") for k in range(5)]
    convs += [(questions[1 + i % 19], " ".join(WORDS[i % 7 : i % 7 + 2 + (5 * i) % 19])) for i in range(58)]
    return convs


def pad_is_eos(src: str, dst) -> str:
    """A copy whose tokenizer has pad = eos = <|im_end|> and a template ending on it (no newline
    after), so every conversation's last token is the pad token; the model config agrees."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = tok.chat_template.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    tok.save_pretrained(dst)
    config = AutoConfig.from_pretrained(dst)
    config.pad_token_id = config.eos_token_id = tok.pad_token_id
    config.save_pretrained(dst)
    return str(dst)


def batches(pool, full: bool):
    """(conversations, position of the target): alone, in calls of 7 at several positions with
    different neighbours (its prompt-mates, then strangers), and (`full`) in a call of 64, last."""
    target, others = pool[0], pool[1:]
    yield [target], 0
    for start, at in ((0, 3), (20, 0), (40, 6)):
        batch = others[start : start + 6]
        yield batch[:at] + [target] + batch[at:], at
    if full:
        yield others + [target], 63


def assert_invariant(make, pool):
    """The target's score alone (batch size 1, no sharing) = its score in every other setting; the
    scorer's batch size is 1, 7 or 64 (calls of 64 conversations only with the largest)."""
    prompts, responses = zip(*pool[:1])
    reference = make(1, False).score(list(prompts), list(responses))[0]
    for batch_size in (1, 7, 64):
        for share in (True, False):
            scorer = make(batch_size, share)
            for batch, at in batches(pool, full=batch_size == 64):
                prompts, responses = zip(*batch)
                got = scorer.score(list(prompts), list(responses))[at]
                assert got == pytest.approx(reference, abs=1e-5), (batch_size, share, len(batch), at)
    return reference


@pytest.mark.parametrize("pad_eos", [False, True], ids=["own-pad", "pad-is-eos"])
def test_hf_reward_model_is_invariant(tiny_classifier, pool, pad_eos, tmp_path):  # noqa: F811
    path = pad_is_eos(tiny_classifier, tmp_path / "rm") if pad_eos else tiny_classifier
    if pad_eos:
        tok = AutoTokenizer.from_pretrained(path)
        text = tok.apply_chat_template(pool[0][0] + [{"role": "assistant", "content": pool[0][1]}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.pad_token_id == tok.eos_token_id  # the case HF's pad-id lookup gets wrong
    assert_invariant(lambda bs, share: HFRewardModel(path, batch_size=bs, share_prefix=share, dtype="float32"), pool)


@pytest.mark.parametrize("pad_eos", [False, True], ids=["own-pad", "pad-is-eos"])
def test_nemotron_reward_is_invariant(tiny_model, pool, pad_eos, tmp_path):
    path = pad_is_eos(tiny_model, tmp_path / "lm") if pad_eos else tiny_model
    assert_invariant(lambda bs, share: NemotronReward(path, batch_size=bs, share_prefix=share, dtype="float32"), pool)


def test_function_and_rule_rewards_are_invariant(pool):
    for scorer in (RuleReward(), FunctionReward("synpref.rewards.heuristics:clarity")):
        assert_invariant(lambda bs, share, s=scorer: s, pool)
