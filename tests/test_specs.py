"""Decoding and ModelSpec: validation, nesting in configs and --print_config, a reference that follows its policy."""

from __future__ import annotations

import pytest
import torch
import yaml

from synpref.cli import main
from synpref.core.errors import ConfigError
from synpref.core.specs import Decoding, ModelSpec


def print_config(capsys, command: str, *args) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([command, *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "kwargs, key, problem",
    [
        ({"max_new_tokens": 0}, "decoding.max_new_tokens", "must be ≥ 1, got 0"),
        ({"temperature": 0.0}, "decoding.temperature", "must be > 0 when sampling"),
        ({"top_p": 1.5}, "decoding.top_p", "must lie in (0, 1], got 1.5"),
        ({"top_k": -1}, "decoding.top_k", "must be ≥ 0"),
    ],
)
def test_decoding_names_the_bad_field(kwargs, key, problem):
    with pytest.raises(ConfigError) as error:
        Decoding(**kwargs)
    assert error.value.key == key and problem in error.value.problem


def test_greedy_decoding_ignores_the_sampling_fields():
    assert Decoding(do_sample=False, temperature=0.0, top_p=0.0, top_k=-1).without_seed()["do_sample"] is False


def test_a_reference_spec_follows_its_policy_where_unset():
    policy = ModelSpec("artifacts/sft", dtype="float32", attn_implementation="sdpa")
    assert ModelSpec(dtype="bfloat16").following(policy) == ModelSpec("artifacts/sft", "bfloat16", "sdpa", False)
    assert ModelSpec("other").following(policy) == ModelSpec("other", "float32", "sdpa", False)
    assert ModelSpec("None", dtype="null") == ModelSpec()  # a command-line null, as jsonargparse passes it
    with pytest.raises(ConfigError, match="'model.init_args.policy.name_or_path': required"):
        ModelSpec().require("model.init_args.policy")


def test_print_config_nests_the_groups_and_an_overlay_merges_into_them(in_tmp, capsys):
    config = print_config(
        capsys, "predict", "--config", "configs/tiny/sample.yaml", "--config", "configs/tiny/sample_served.yaml"
    )
    args = config["model"]["init_args"]
    assert args["policy"] == {
        "name_or_path": "artifacts/tiny/sft",
        "dtype": None,
        "attn_implementation": None,
        "trust_remote_code": False,
    }
    # The overlay sets max_new_tokens only; the base's other decoding settings stay.
    assert args["decoding"] == {
        "max_new_tokens": 32,
        "temperature": 0.7,
        "top_k": 50,
        "top_p": 1.0,
        "do_sample": True,
        "seed": 0,
    }


def test_sampling_refuses_greedy_decoding(tiny_model):
    from synpref.modules import SamplingModule
    from synpref.rewards import RuleReward

    with pytest.raises(ConfigError, match="'model.init_args.decoding.do_sample': must be true"):
        SamplingModule(ModelSpec(tiny_model), RuleReward(), decoding=Decoding(do_sample=False))


def test_a_bf16_reference_beside_an_fp32_policy_trains(tiny_model, sample_dir, tmp_path):
    """`--model.init_args.ref_model.dtype=bfloat16`: the frozen reference loads the policy's starting
    weights in bf16 while the policy trains in fp32, and a DPO step runs."""
    import lightning as L

    from synpref.core.models import load_causal_lm
    from synpref.modules import DPOModule
    from tests.test_dpo import data

    module = DPOModule(ModelSpec(tiny_model, dtype="float32"), ModelSpec(dtype="bfloat16"), lr=1e-3, warmup_steps=0)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, data(sample_dir, 8, batch_size=4, tiny_model=tiny_model))
    assert trainer.global_step == 1
    ref, start = module.reference(), load_causal_lm(tiny_model)
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(ref.state_dict().items(), start.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16)), name  # the starting weights, not the trained ones
