"""Every user error is one `synpref: error:` line, no traceback, exit 2 (1 for a refusing endpoint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synpref.cli import main
from synpref.core.errors import DataError
from synpref.core.specs import Decoding, ModelSpec
from tests.conftest import ROOT

NO_MLFLOW = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SFT = ["fit", "--config", "configs/tiny/sft.yaml", *NO_MLFLOW]
DPO = [
    "fit",
    "--config",
    "configs/tiny/dpo.yaml",
    "--config",
    "configs/tiny/dpo_ultrafeedback.yaml",
    "--model.init_args.policy.name_or_path=artifacts/tiny/base",
    *NO_MLFLOW,
]
SAMPLE = [
    "predict",
    "--config",
    "configs/tiny/sample.yaml",
    "--model.init_args.policy.name_or_path=artifacts/tiny/base",
    "--data.init_args.max_prompts=2",
    "--model.init_args.decoding.max_new_tokens=4",
    *NO_MLFLOW,
]
EVAL = [
    "predict",
    "--config",
    "configs/tiny/eval.yaml",
    "--model.init_args.policy.name_or_path=artifacts/tiny/base",
    "--model.init_args.baseline.name_or_path=artifacts/tiny/base",
    "--data.init_args.max_prompts=2",
    "--model.init_args.decoding.max_new_tokens=4",
    "--model.init_args.figures=false",
    *NO_MLFLOW,
]
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Cheese."}


def fails(capsys, args, *expected, code=2) -> str:
    """Run `synpref args` in-process: it must exit `code` with one `synpref: error:` line holding
    every `expected` text, and print no traceback or usage text."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == code, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("synpref: error: ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def write(path: Path, rows) -> str:
    path.write_bytes(rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


# -- models that do not exist (checked when the config is built, not at the first step) --------
@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """A working directory with configs/ and nothing built yet."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_tiny_base_names_build_tiny(bare, capsys):
    fails(capsys, SFT, "artifacts/tiny/base does not exist", str(bare / "artifacts/tiny/base"), "`synpref build-tiny`")


def test_missing_export_names_the_stage_that_writes_it(bare, capsys):
    fails(
        capsys,
        ["fit", "--config", "configs/tiny/dpo.yaml", "--config", "configs/tiny/dpo_ultrafeedback.yaml", *NO_MLFLOW],
        "artifacts/tiny/sft does not exist",
        "`synpref fit --config configs/tiny/sft.yaml`",
    )
    fails(
        capsys,
        ["predict", "--config", "configs/tiny/eval.yaml", *NO_MLFLOW],
        "artifacts/tiny/dpo_synthetic does not exist",
        "`synpref fit --config configs/tiny/dpo.yaml --config configs/tiny/dpo_synthetic.yaml`",
    )


def test_missing_reference_fails_at_construction(in_tmp, capsys):
    fails(
        capsys,
        [*DPO, "--model.init_args.ref_model.name_or_path=artifacts/tiny/ref"],
        "artifacts/tiny/ref does not exist",
    )
    assert not (in_tmp / "artifacts/tiny/dpo_ultrafeedback").exists()


def test_missing_eval_baseline(in_tmp, capsys):
    fails(
        capsys,
        [*EVAL, "--model.init_args.baseline.name_or_path=artifacts/tiny/sft"],
        "artifacts/tiny/sft does not exist",
        "configs/tiny/sft.yaml",
    )


def test_reference_with_another_tokenizer_names_both_paths(in_tmp, tiny_model, capsys):
    from transformers import AutoTokenizer

    other = in_tmp / "other"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    fails(
        capsys,
        [*DPO, f"--model.init_args.ref_model.name_or_path={other}"],
        "tokenizers of artifacts/tiny/base and",
        str(other),
        "vocabularies differ",
    )


# -- bad values, caught when the modules are built ---------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        ([*DPO, "--model.init_args.beta=0"], "'model.init_args.beta': must be > 0, got 0.0"),
        ([*DPO, "--model.init_args.beta=-1"], "'model.init_args.beta': must be > 0, got -1.0"),
        ([*DPO, "--model.init_args.label_smoothing=0.5"], "'model.init_args.label_smoothing': must lie in [0, 0.5)"),
        ([*DPO, "--model.init_args.loss_type=dpo"], "'model.init_args.loss_type': unknown 'dpo'"),
        (
            [*DPO, "--model.init_args.loss_type=[sigmoid,sft]", "--model.init_args.loss_weights=[1.0]"],
            "'model.init_args.loss_weights': must have the same length as loss_type",
        ),
        (
            [*DPO, "--model.init_args.loss_type=simpo", "--model.init_args.ref_model.name_or_path=artifacts/tiny/base"],
            "'model.init_args.ref_model.name_or_path': loss_type 'simpo' is reference-free",
        ),
        (
            [*SAMPLE, "--model.init_args.decoding.max_new_tokens=0"],
            "'decoding.max_new_tokens': must be ≥ 1, got 0",
        ),
        (
            [*SAMPLE, "--model.init_args.decoding.temperature=0"],
            "'decoding.temperature': must be > 0 when sampling",
        ),
        ([*SAMPLE, "--model.init_args.num_samples=1"], "'model.init_args.num_samples': must be ≥ 2"),
        (
            [*EVAL, "--model.init_args.decoding.max_new_tokens=0"],
            "'decoding.max_new_tokens': must be ≥ 1, got 0",
        ),
        ([*EVAL, "--model.init_args.decoding.temperature=0"], "do_sample: false"),
        ([*SFT, "--data.init_args.val_fraction=1.5"], "'data.init_args.val_fraction': must lie in [0, 1)"),
    ],
    ids=[
        "beta0",
        "beta-1",
        "smoothing",
        "loss-name",
        "loss-weights",
        "reference-free",
        "sample-tokens",
        "sample-temp",
        "samples1",
        "eval-tokens",
        "eval-temp",
        "val1.5",
    ],
)
def test_bad_value(in_tmp, capsys, args, expected):
    fails(capsys, args, expected)


def test_greedy_evaluation_ignores_temperature(tiny_model):
    from synpref.modules import WinRateModule
    from synpref.rewards import RuleReward

    greedy = Decoding(do_sample=False, temperature=0.0)  # no error
    WinRateModule(ModelSpec(tiny_model), ModelSpec(tiny_model), RuleReward(), decoding=greedy)


# -- config errors: the key and the problem, not 45 lines of usage -----------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        ([*SFT, "--trainer.max_epochs=x"], "config key 'trainer.max_epochs': expected int, got 'x'"),
        ([*SFT, "--model.class_path=synpref.modules.Nope"], "unknown class_path 'synpref.modules.Nope'"),
        ([*SFT, "--model.init_args.lrr=3"], "'model.init_args.lrr': synpref.modules.SFTModule has no argument 'lrr'"),
        ([*SFT, "--model.init_args.scheduler=steep"], "'model.init_args.scheduler': expected one of ['cosine'"),
        (["fit", "--config", "configs/tiny/nope.yaml"], "configs/tiny/nope.yaml"),
        (["fitt"], "invalid choice: 'fitt'"),
        (["build-tiny", "--vocab_size=x"], "config key 'vocab_size': expected int, got 'x'"),
    ],
    ids=["type", "class_path", "option", "literal", "config-file", "subcommand", "build-tiny-type"],
)
def test_config_error(in_tmp, capsys, args, expected):
    fails(capsys, args, expected)


# -- build-tiny --------------------------------------------------------------------------------
def test_build_tiny_bad_corpus_and_sizes(in_tmp, capsys):
    fails(
        capsys, ["build-tiny", "--out=x", "--corpus=[data/none.jsonl]"], "data/none.jsonl", "corpus file does not exist"
    )
    bad = write(in_tmp / "corpus.jsonl", b'{"messages": []}\n[1, 2]\n')
    fails(capsys, ["build-tiny", "--out=x", f"--corpus=[{bad}]"], bad, "row 1: not a JSON object")
    fails(
        capsys,
        ["build-tiny", "--out=x", "--hidden_size=30"],
        "'hidden_size': must be a multiple of the 4 attention heads",
    )
    assert not (in_tmp / "x").exists()


# -- --debug shows the traceback; the console shows only the line ------------------------------
def test_debug_raises_with_traceback(in_tmp, monkeypatch):
    path = write(in_tmp / "empty.jsonl", b"")
    # As the console script calls it: no arguments, sys.argv holds them (--debug anywhere).
    monkeypatch.setattr(sys, "argv", ["synpref", *SFT, "--debug", f"--data.init_args.path={path}"])
    with pytest.raises(DataError, match="the file is empty"):
        main()
    monkeypatch.setenv("SYNPREF_DEBUG", "1")
    with pytest.raises(DataError, match="the file is empty"):
        main([*SFT, f"--data.init_args.path={path}"])


def test_console_prints_one_line(bare):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "synpref", "fit", "--config", "configs/tiny/sft.yaml"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith("synpref: error: model directory artifacts/tiny/base does not exist")
    )
