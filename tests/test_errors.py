"""Every user error is one `synpref: error:` line, no traceback, exit 2 (1 for a refusing endpoint)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from synpref.cli import main
from synpref.errors import DataError
from synpref.specs import Decoding, ModelSpec
from tests.conftest import ROOT, http_server

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


# -- bad values, caught when the modules are built ---------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        ([*DPO, "--model.init_args.beta=0"], "'model.init_args.beta': must be > 0, got 0.0"),
        ([*DPO, "--model.init_args.beta=-1"], "'model.init_args.beta': must be > 0, got -1.0"),
        ([*DPO, "--model.init_args.label_smoothing=0.5"], "'model.init_args.label_smoothing': must lie in [0, 0.5)"),
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


# -- rewards -----------------------------------------------------------------------------------
def none_reward(prompt: str, response: str):
    return None


def text_reward(prompt: str, response: str):
    return "good"


def nan_for_colour(prompt: str, response: str):
    return math.nan if "colour" in prompt else 1.0


@pytest.mark.parametrize(
    "fn, shown", [("none_reward", "returned None (NoneType)"), ("text_reward", "returned 'good' (str)")]
)
def test_function_reward_not_a_float_names_the_reward(in_tmp, capsys, fn, shown):
    reward = f"--model.init_args.reward={{class_path: synpref.rewards.FunctionReward, init_args: {{fn: 'tests.test_errors:{fn}'}}}}"
    line = fails(
        capsys, [*SAMPLE, reward], f"reward 'tests.test_errors:{fn}' {shown}", "for the prompt '", "on_bad_score: skip"
    )
    assert not (in_tmp / "artifacts/tiny/samples/samples.jsonl").exists(), line


def test_unknown_reward_function(in_tmp, capsys):
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors:nope'}}"
    fails(capsys, [*SAMPLE, reward], "'reward.init_args.fn'", "has no attribute 'nope'")


def test_nan_reward_in_evaluation(in_tmp, capsys):
    prompts = write(in_tmp / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}])
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors:nan_for_colour'}}"
    args = [*EVAL, f"--data.init_args.path={prompts}", reward, "--model.init_args.output_dir=out"]
    fails(capsys, args, "returned nan (float), not a finite float", "for the prompt 'Name a colour.'")


def test_nan_reward_in_sampling_and_skip(in_tmp, capsys):
    prompts = write(in_tmp / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}])
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors:nan_for_colour'}}"
    args = [
        *SAMPLE,
        f"--data.init_args.path={prompts}",
        reward,
        "--model.init_args.output_dir=out",
        "--model.init_args.threshold=-1",
    ]
    fails(capsys, args, "returned nan (float), not a finite float", "for the prompt 'Name a colour.'")
    assert not Path("out/samples.jsonl").exists()
    main([*args, "--model.init_args.on_bad_score=skip"])  # the NaN samples are dropped and counted
    samples = [json.loads(line) for line in Path("out/samples.jsonl").read_text().splitlines()]
    assert {r["prompt"][0]["content"] for r in samples} == {"Name a fruit."} and len(samples) == 2
    assert all(r["score"] == 1.0 for r in samples)


class RefusesKey(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.dumps({"error": f"invalid key {self.headers['Authorization']}"}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_endpoint_refusing_the_key_names_the_variable(in_tmp, capsys, monkeypatch):
    key = "sk-secret-do-not-print"
    with http_server(RefusesKey, monkeypatch, "SYNPREF_TEST_KEY", key) as url:
        reward = (
            "--model.init_args.reward={class_path: synpref.rewards.EndpointReward, init_args: "
            f"{{base_url: '{url}', api_key_env: SYNPREF_TEST_KEY, max_retries: 0}}}}"
        )
        line = fails(capsys, [*SAMPLE, reward], "refused the API key from $SYNPREF_TEST_KEY (HTTP 401", code=1)
    assert key not in line and "***" in line


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
