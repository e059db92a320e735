"""`synpref estimate` and `synpref build-model` refuse nonsense arguments with one `synpref: error:` line."""

from __future__ import annotations

import pytest

from tests.test_errors import fails


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "qwen3-9b"], ["'preset'", "qwen3-9b", "qwen2.5-0.5b", "tiny"]),
        (["--preset", "tiny", "--stage", "rlhf"], ["'stage'", "rlhf", "sft", "dpo"]),
        (["--preset", "tiny", "--batch_size", "0"], ["'batch_size'", "≥ 1", "0"]),
        (["--preset", "tiny", "--batch_size", "-4"], ["'batch_size'", "-4"]),
        (["--preset", "tiny", "--max_length", "0"], ["'max_length'", "≥ 1"]),
        (["--preset", "tiny", "--max_length", "-3"], ["'max_length'", "-3"]),
        (["--preset", "tiny", "--chunk", "-1"], ["'chunk'", "-1"]),
        (["--preset", "tiny", "--response_fraction", "2"], ["'response_fraction'", "2"]),
        (["--preset", "tiny", "--response_fraction", "0"], ["'response_fraction'"]),
        ([], ["--preset", "--model"]),
        (["--preset", "tiny", "--model", "x"], ["--preset", "--model"]),
        (["--model", "no/such/model/dir"], ["'model'", "no/such/model/dir"]),
    ],
)
def test_estimate_refuses_nonsense(capsys, args, expected):
    fails(capsys, ["estimate", *args], *expected)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "qwen3-9b"], ["'preset'", "qwen3-9b", "qwen-vocab-small", "tiny"]),
        (["--preset", "tiny", "--dtype", "float13"], ["'dtype'", "float13"]),
        (["--preset", "tiny", "--seed", "-1"], ["'seed'", "-1"]),
    ],
)
def test_build_model_refuses_nonsense(capsys, tmp_path, args, expected):
    fails(capsys, ["build-model", "--out", str(tmp_path / "m"), *args], *expected)
    assert not (tmp_path / "m").exists()
