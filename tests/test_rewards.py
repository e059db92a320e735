"""Local rewards against independent references: HF seq-classification and Nemotron-style causal LM
vs the model cards' own recipe, FunctionReward, and the demo RuleReward computed by hand."""

import math
import re
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from synpref.rewards import FunctionReward, HFRewardModel, NemotronReward, RuleReward
from synpref.rewards.base import RewardError, RewardScorer, score_checked

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling slowly."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
]
RESPONSES = ["Paris.", "Red leaves drift and fall,\nquiet wind carries them home,\nthe branch sleeps alone.", "7"]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model, tmp_path_factory):
    """A Qwen2ForSequenceClassification (1 label) with the tiny tokenizer, built here."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForSequenceClassification(config)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# K samples per prompt, as sampling produces them: a shared prompt, replies of different lengths, a
# repeated reply (its whole conversation is the common prefix), a multi-turn prompt and a lone prompt.
SHARED_PROMPTS = [PROMPTS[0]] * 4 + [PROMPTS[2]] * 2 + [PROMPTS[1]] + [PROMPTS[0]]
SHARED_RESPONSES = [
    "Paris.",
    "Paris is the capital of France, on the Seine.",
    "Paris.",
    "Lyon? No: Paris.",
    "7",
    "Two, the only even prime.",
    RESPONSES[1],
    "It is Paris, of course.",
]


def _card_scores(model_dir, model_cls, read, prompts=PROMPTS, responses=RESPONSES):
    """One conversation at a time through the model's own forward (no cache, no batching)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model_cls.from_pretrained(model_dir).eval()
    out = []
    for prompt, response in zip(prompts, responses):
        ids = tok.apply_chat_template(
            prompt + [{"role": "assistant", "content": response}], tokenize=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out.append(read(model(ids).logits))
    return out


def test_hf_reward_model_matches_model_card_recipe(tiny_classifier):
    scorer = HFRewardModel(tiny_classifier, batch_size=2)
    scores = scorer.score(PROMPTS, RESPONSES)
    # The Skywork model card: apply_chat_template(conv, tokenize=True), one conversation at a time, logits[0][0].
    expected = _card_scores(tiny_classifier, Qwen2ForSequenceClassification, lambda logits: logits[0][0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3  # a real per-row score, not one row broadcast


def test_nemotron_reward_matches_generate_one_token(tiny_model):
    scores = NemotronReward(tiny_model, batch_size=3).score(PROMPTS, RESPONSES)
    # The Nemotron-70B-Reward-HF model card: generate one token, reward = scores[0][0][0].
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        enc = tok.apply_chat_template(
            prompt + [{"role": "assistant", "content": response}],
            tokenize=True,
            add_generation_prompt=False,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_scores=True)
        expected.append(out.scores[0][0][0].item())
    assert scores == pytest.approx(expected, abs=1e-4)


def test_function_reward(tmp_path, monkeypatch):
    (tmp_path / "my_reward_fns.py").write_text(
        "def longer(prompt, response):\n    return len(response) - len(prompt)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_reward_fns", None)
    scorer = FunctionReward(fn="my_reward_fns:longer")
    # Multi-turn prompts reach the function as 'role: content' lines.
    assert scorer.score(PROMPTS, RESPONSES) == [
        6 - 30,
        len(RESPONSES[1]) - 49,
        1 - len("system: Be brief.\nuser: Name a prime number."),
    ]
    with pytest.raises(ValueError, match="module:function"):
        FunctionReward(fn="my_reward_fns.longer")
    with pytest.raises(ValueError, match="no attribute"):
        FunctionReward(fn="my_reward_fns:shorter")


def test_rule_reward_by_hand():
    prompt = [{"role": "user", "content": "Explain why the sky is blue"}]
    response = "The sky is blue because air scatters blue light."
    # content words of the prompt: explain, why→stopword, sky, blue → {explain, sky, blue}; reply has sky, blue.
    reply_words = 9
    expected = 2.0 * (2 / 3) + 0.5 * (1 + 1) + 1.0 * (8 / 8) - 0.5 * abs(math.log((reply_words + 1) / 41))
    assert RuleReward().score([prompt], [response]) == [pytest.approx(expected)]
    # Repetition, no final punctuation, lower-case start: each costs.
    worse = "the sky the sky the sky the sky blue"
    assert RuleReward().score([prompt], [worse])[0] < expected
    assert RuleReward().score([prompt], [""]) == [pytest.approx(-0.5 * math.log(41))]


def test_padding_mask_dropped_only_for_causal_models(tiny_classifier):
    """Right-padded batches skip the padding mask only where attention is causal (see HFRewardModel)."""
    from transformers import BertConfig, BertForSequenceClassification

    from synpref.rewards.hf import is_causal

    assert is_causal(Qwen2ForSequenceClassification.from_pretrained(tiny_classifier))
    encoder = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=1,
        )
    )
    assert not is_causal(encoder)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_prefix_shared_scores_equal_unshared(tiny_classifier, batch_size):
    """Scoring K replies against one cached prompt prefix gives each conversation's own score, for
    batches that hold several groups, exactly one, or a group larger than the batch."""
    expected = _card_scores(
        tiny_classifier,
        Qwen2ForSequenceClassification,
        lambda logits: logits[0][0].item(),
        SHARED_PROMPTS,
        SHARED_RESPONSES,
    )
    shared = HFRewardModel(tiny_classifier, batch_size=batch_size).score(SHARED_PROMPTS, SHARED_RESPONSES)
    plain = HFRewardModel(tiny_classifier, batch_size=batch_size, share_prefix=False).score(
        SHARED_PROMPTS, SHARED_RESPONSES
    )
    assert shared == pytest.approx(expected, abs=1e-5)
    assert plain == pytest.approx(expected, abs=1e-5)
    assert shared[0] == pytest.approx(shared[2], abs=1e-6)  # the repeated reply
    assert len({round(s, 5) for s in shared}) == 7


def test_prefix_shared_nemotron_equal_unshared(tiny_model):
    expected = _card_scores(
        tiny_model, AutoModelForCausalLM, lambda logits: logits[0, -1, 0].item(), SHARED_PROMPTS, SHARED_RESPONSES
    )
    for share in (True, False):
        scores = NemotronReward(tiny_model, batch_size=3, share_prefix=share).score(SHARED_PROMPTS, SHARED_RESPONSES)
        assert scores == pytest.approx(expected, abs=1e-4)


def test_prefix_groups_by_hand():
    from synpref.rewards.hf import prefix_groups

    a, b, c = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], [{"role": "user", "content": "c"}]
    ids = [[1, 2, 3, 4], [9], [1, 2, 3], [1, 2, 5, 6, 7], [1, 2, 3, 4], [8, 8], [7, 7, 7]]
    groups, alone = prefix_groups([a, b, a, a, c, c, c], ids)
    # a: common prefix [1, 2], capped at one short of the shortest member (3 tokens) -> 2.
    # c: [1,2,3,4], [8,8], [7,7,7] share nothing; b is alone.
    assert groups == [(2, [0, 2, 3])]
    assert alone == [1, 4, 5, 6]
    groups, alone = prefix_groups([a, a], [[1, 2, 3], [1, 2, 3]])
    assert groups == [(2, [0, 1])] and alone == []


class FixedScores(RewardScorer):
    """Returns the scores it was given, whatever the responses: the contract check sees them as they are."""

    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts, responses):
        return list(self.scores)


@pytest.mark.parametrize(
    "bad, shown",
    [
        (math.nan, "nan (float)"),
        (math.inf, "inf (float)"),
        (None, "None (NoneType)"),
        ("0.5", "'0.5' (str)"),
        (True, "True (bool)"),
    ],
)
def test_score_checked_rejects_what_is_not_a_finite_float(bad, shown):
    prompts = [[{"role": "user", "content": "First?"}], [{"role": "user", "content": "Second?"}]]
    good = [1, np.float32(2.5), torch.tensor(-3.0)]  # numbers of any kind become floats
    assert score_checked(FixedScores(good), prompts + prompts[:1], ["a", "b", "c"]) == [1.0, 2.5, -3.0]
    with pytest.raises(
        RewardError, match=rf"reward 'fixed' returned {re.escape(shown)}, not a finite float, for the prompt 'Second\?'"
    ):
        score_checked(FixedScores([1.0, bad]), prompts, ["a", "b"])
    assert score_checked(FixedScores([bad, 1.0]), prompts, ["a", "b"], on_bad_score="skip") == [None, 1.0]
    with pytest.raises(RewardError, match="returned 1 scores for 2 responses"):
        score_checked(FixedScores([1.0]), prompts, ["a", "b"])
