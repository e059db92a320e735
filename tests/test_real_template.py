"""What only Qwen2.5's own tokenizer and template show: masks, stop tokens, pad = end token, unused rows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from synpref.core.chat import IGNORE_INDEX, encode_conversation, encode_prompt, encode_prompt_response
from synpref.core.models import CHATML_TEMPLATE, load_causal_lm, load_tokenizer
from synpref.core.qwen_tokenizer import qwen2_5_tokenizer
from synpref.core.specs import Decoding
from synpref.data.collate import collate_sft
from synpref.generation import generate
from synpref.generators import generate_texts
from synpref.presets import QWEN_VOCAB, save_random_qwen2

IM_END, EOT, TOKENS = 151_645, 151_643, 151_665
TWO_TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Green, like grass."},
]


@pytest.fixture(scope="module")
def tok():
    return qwen2_5_tokenizer()


def labelled_runs(tok, enc) -> list[str]:
    runs, run = [], []
    for t, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == t
            run.append(t)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


def test_each_assistant_turn_trains_its_im_end_and_the_newline_after(tok):
    enc = encode_conversation(tok, TWO_TURNS)
    # The default system turn, the user turns and each "<|im_start|>assistant\n" header stay unlabelled.
    assert labelled_runs(tok, enc) == ["Blue.<|im_end|>\n", "Green, like grass.<|im_end|>\n"]
    assert enc["labels"].count(IM_END) == 2 and enc["input_ids"].count(IM_END) == 5
    prompt, response = encode_prompt_response(tok, TWO_TURNS[:3], "Green, like grass.")
    assert prompt + response == enc["input_ids"] and response[-2:] == [IM_END, 198]  # 198 = "\n"


def test_a_pad_token_equal_to_an_end_token_never_masks_it(tok):
    """Qwen2.5 pads with <|endoftext|>, an end token; here pad = <|im_end|> itself, the turn's end:
    labels come from the template, never from comparing ids with the pad id."""
    short = encode_conversation(tok, TWO_TURNS[:2])
    long = encode_conversation(tok, TWO_TURNS)
    batch = collate_sft([short, long], pad_token_id=IM_END)
    n = len(short["input_ids"])
    assert (batch["input_ids"][0, n:] == IM_END).all()  # the padding is im_end ids ...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ... and is not trained
    for row, enc in enumerate((short, long)):
        ends = [i for i, t in enumerate(enc["input_ids"]) if t == IM_END and enc["labels"][i] != IGNORE_INDEX]
        assert len(ends) == row + 1 and all(batch["labels"][row, i] == IM_END for i in ends)


def test_a_base_checkpoint_without_a_template_gets_chatml_and_says_so(tok, tmp_path, caplog):
    base = qwen2_5_tokenizer()
    base.chat_template = None
    base.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="synpref.core.models"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == CHATML_TEMPLATE
    assert "ships no chat template: using ChatML" in caplog.text
    caplog.clear()
    tok.save_pretrained(tmp_path / "templated")
    with caplog.at_level(logging.WARNING, logger="synpref.core.models"):
        kept = load_tokenizer(str(tmp_path / "templated"))  # one that has a template keeps it, silently
    assert kept.chat_template == tok.chat_template and not caplog.text
    text = loaded.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


def push(model, logits_for_step):
    """Make the LM head's step-th call (0 = the prompt) favour the ids logits_for_step(step) returns."""
    calls = []

    def hook(module, inputs, output):
        output = output.clone()
        for token_id in logits_for_step(len(calls)):
            output[..., token_id] += 1e4
        calls.append(1)
        return output

    return model.lm_head.register_forward_hook(hook)


@pytest.fixture(scope="module")
def small(qwen_small_model):
    return load_causal_lm(qwen_small_model, "float32").eval(), load_tokenizer(qwen_small_model)


def chain_model(out: Path, stop: int) -> str:
    """A Qwen2 with Qwen2.5's tokenizer whose greedy reply to any chat prompt is "Blue sky", then
    `stop`, then " continues" for ever: a model that goes on after the end token unless told to stop.

    Built by build-model's own `save_random_qwen2` (its generation_config included), then wired as a
    bigram: with attention and MLP outputs zeroed, each position's hidden state is its token's
    embedding; the chain's tokens get orthogonal embeddings and the (untied) LM head maps each one to
    the next. "\n" ends every generation prompt, so it starts the chain."""
    tok = qwen2_5_tokenizer()
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    random = save_random_qwen2(
        out / "random", tok, vocab_size=QWEN_VOCAB, num_key_value_heads=1, **shape, tie_word_embeddings=False
    )
    model = load_causal_lm(str(random), "float32")
    blue, sky, more = tok("Blue sky continues", add_special_tokens=False)["input_ids"]
    chain = [tok.convert_tokens_to_ids("Ċ"), blue, sky, stop, more, more]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for k, (token, after) in enumerate(zip(chain, chain[1:])):
            embedding[token] = torch.nn.functional.one_hot(torch.tensor(k), shape["hidden_size"]).float()
            # normalised, the embedding is 4·e_k: a logit of 20 against the random head's |x| < 1
            head[after, k] = 5.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", params=[IM_END, EOT], ids=["im_end", "endoftext"])
def chained(request, tmp_path_factory):
    return chain_model(tmp_path_factory.mktemp("chain"), request.param), request.param


def test_generation_stops_at_either_end_token(chained, monkeypatch):
    """In process, as the sampling and evaluation stages generate: the reply ends before the end
    token, and generate() itself stopped there (3 new tokens), though the model would go on."""
    path, stop = chained
    model, tok = load_causal_lm(path, "float32").eval(), load_tokenizer(path)
    prompt = encode_prompt(tok, TWO_TURNS[:1])
    on = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert tok.decode(on[0, len(prompt) :]) == f"Blue sky{tok.decode([stop])} continues continues"

    outputs, original = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: outputs.append(original(**kw)) or outputs[-1])
    prompts = [TWO_TURNS[:1], TWO_TURNS[:3]]
    texts, counts = generate_texts(None, model, tok, path, prompts, [0, 1], Decoding(max_new_tokens=6, do_sample=False))
    assert texts == [["Blue sky"]] * 2 and counts == [[2]] * 2
    assert outputs[0].shape[1] == len(encode_prompt(tok, prompts[1])) + 3 and (outputs[0][:, -1] == stop).all()


def test_ids_without_a_token_are_never_sampled(small, monkeypatch):
    """The 271 embedding rows beyond the tokenizer: here the model puts almost all its mass on them."""
    model, tok = small
    assert model.lm_head.weight.shape[0] - len(tok) == 271
    outputs, original = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: outputs.append(original(**kw)) or outputs[-1])
    handle = push(model, lambda step: range(TOKENS, TOKENS + 271))
    try:
        texts, counts = generate(model, tok, [TWO_TURNS[:1]] * 2, Decoding(max_new_tokens=5, seed=3), 2)
    finally:
        handle.remove()
    assert outputs and int(outputs[0].max()) < TOKENS
    assert all(t for row in texts for t in row) and counts == [[5, 5], [5, 5]]
