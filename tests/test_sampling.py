"""Prompts (schemas, dedup, exclusion), same seed same samples, kill -9 + resume, 2-process DDP, MLflow stats."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synpref.core.specs import Decoding, ModelSpec
from synpref.data import PromptDataModule
from synpref.data.prompts import text_key
from synpref.modules import SamplingModule
from synpref.rewards import RuleReward
from tests.conftest import assert_run_params, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_module_schemas_dedup_exclusion(tiny_model, tmp_path):
    rows = [
        {"prompt": "First question?", "prompt_id": "p1"},
        {"prompt": "Second question?", "prompt_id": "p1"},  # duplicate id
        {"prompt": "First question?", "prompt_id": "other"},  # duplicate text
        {"messages": [{"role": "user", "content": "From messages?"}, {"role": "assistant", "content": "yes"}]},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "TRL conversational?"}]},
        {"prompt": "Held out by id", "prompt_id": "held"},
        {"prompt": "Held out by text", "prompt_id": "x9"},
        {"prompt": "Last one."},
    ]
    exclude = write_jsonl(
        tmp_path / "exclude.jsonl",
        [
            {"prompt": "anything", "prompt_id": "held"},
            {"messages": [{"role": "user", "content": "Held out by text"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    dm = PromptDataModule(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), exclude=[exclude], batch_size=2)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    got = {i: (pid, p) for b in batches for i, pid, p in zip(b["index"], b["prompt_id"], b["prompt"])}
    assert sorted(got) == [0, 1, 2, 3]
    assert got[0] == ("p1", [{"role": "user", "content": "First question?"}])
    assert got[1] == (
        text_key([{"role": "user", "content": "From messages?"}]),
        [{"role": "user", "content": "From messages?"}],
    )
    assert got[2][1] == rows[4]["prompt"]
    assert got[3][1] == [{"role": "user", "content": "Last one."}]
    assert dm.drop_counts == {"duplicate": 2, "excluded": 2}
    assert all(len(b["index"]) <= 2 for b in batches)

    dm = PromptDataModule(tiny_model, write_jsonl(tmp_path / "bad.jsonl", rows + [{"prompt": ""}]))
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 8: field 'prompt'"):
        dm.setup("predict")


def test_same_seed_same_samples_whatever_ran_before(tiny_model, tmp_path, sample_dir):
    dm = PromptDataModule(
        tiny_model, str(sample_dir / "train_prefs.jsonl"), max_prompts=6, batch_size=3, max_prompt_length=64
    )
    dm.setup("predict")
    first, second = list(dm.predict_dataloader())
    module = SamplingModule(
        ModelSpec(tiny_model), RuleReward(), decoding=Decoding(max_new_tokens=8, seed=7), output_dir=str(tmp_path)
    )
    module.configure_model()
    a = module.predict_step(second, 1)
    torch.rand(100)
    module.predict_step(first, 0)
    assert module.predict_step(second, 1) == a
    assert [r["index"] for r in a] == second["index"] and all(len(r["samples"]) == 2 for r in a)
    assert all(s["score"] == RuleReward().score([r["prompt"]], [s["text"]])[0] for r in a for s in r["samples"])
    other = SamplingModule(
        ModelSpec(tiny_model), RuleReward(), decoding=Decoding(max_new_tokens=8, seed=8), output_dir=str(tmp_path)
    )
    other.configure_model()
    assert [s["text"] for r in other.predict_step(second, 1) for s in r["samples"]] != [
        s["text"] for r in a for s in r["samples"]
    ]


def args(out, extra=()):
    return [
        "predict",
        "--config",
        "configs/tiny/sample.yaml",
        "--model.init_args.policy.name_or_path=artifacts/tiny/base",
        "--model.init_args.decoding.max_new_tokens=8",
        f"--model.init_args.output_dir={out}",
        "--data.init_args.max_prompts=12",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_prompt_length=128",
        "--data.init_args.exclude=[synpref://sample/test_prefs.jsonl,held.jsonl]",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def lines(path):
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def test_kill_resume_and_ddp_give_the_uninterrupted_rows(in_tmp, sample_dir):
    from mlflow import MlflowClient

    from synpref.cli import main

    train = read_jsonl(sample_dir / "train_prefs.jsonl")
    # Three training prompts are declared held out (by text only, no id): they must never come out.
    write_jsonl(in_tmp / "held.jsonl", [{"prompt": r["prompt"]} for r in train[2:5]])
    held = {r["prompt_id"] for r in train[2:5]}

    main(args("ref"))
    ref = in_tmp / "ref"
    samples, pairs = read_jsonl(ref / "samples.jsonl"), read_jsonl(ref / "pairs.jsonl")
    assert len({s["index"] for s in samples}) == 12 and len(samples) == 24
    assert not held & {s["prompt_id"] for s in samples} and not held & {p["prompt_id"] for p in pairs}
    held_text = {r["prompt"] for r in train[2:5]}
    assert not held_text & {s["prompt"][0]["content"] for s in samples}
    for p in pairs:  # conversational TRL rows, best vs worst of the prompt's two samples
        mine = [s for s in samples if s["prompt_id"] == p["prompt_id"]]
        assert p["score_chosen"] == max(s["score"] for s in mine) and p["score_rejected"] == min(
            s["score"] for s in mine
        )
        assert p["gap"] >= 0.1 and p["chosen"][0]["role"] == "assistant" and p["prompt"][0]["role"] == "user"

    # kill -9 mid-run, then the same command again.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref", *args("run")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    part = in_tmp / "run" / "parts" / "part-001-000.jsonl"
    deadline = time.time() + 120
    while len(lines(part)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = lines(part)
    assert 2 <= len(done) < 12 and not (in_tmp / "run" / "pairs.jsonl").exists()
    # Leave the last batch half-written with a torn line, as a kill inside a write would.
    part.write_bytes(b"".join(done[:-1]) + done[-1][: len(done[-1]) // 2])
    main(args("run"))
    assert (in_tmp / "run" / "samples.jsonl").read_bytes() == (ref / "samples.jsonl").read_bytes()
    assert (in_tmp / "run" / "pairs.jsonl").read_bytes() == (ref / "pairs.jsonl").read_bytes()
    assert len(read_jsonl(part)) == 12  # nothing duplicated in the record either

    # Two gloo processes, each writing its own shard, merged: the one-process rows.
    result = subprocess.run(
        [sys.executable, "-m", "synpref", *args("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (in_tmp / "ddp" / "parts").iterdir()) == ["part-002-000.jsonl", "part-002-001.jsonl"]
    assert (in_tmp / "ddp" / "samples.jsonl").read_bytes() == (ref / "samples.jsonl").read_bytes()
    assert (in_tmp / "ddp" / "pairs.jsonl").read_bytes() == (ref / "pairs.jsonl").read_bytes()

    # The reference run's statistics in MLflow, recounted from its files.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs(
        [client.get_experiment_by_name("synpref-tiny").experiment_id], order_by=["start_time ASC"]
    )[0]
    m = run.data.metrics
    assert_run_params(run.data.params, "sample")
    assert run.data.params["n_prompts"] == "12" and run.data.params["reward"] == "synpref.rewards.RuleReward"
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["index"], []).append((s["score"], s["response"]))
    gaps, reasons = [], []
    for rows in by_prompt.values():  # by hand: best vs worst, then the drop rules in order
        best, worst = max(rows, key=lambda r: r[0]), min(rows, key=lambda r: r[0])
        g = best[0] - worst[0]
        reason = (
            "ties"
            if g == 0
            else "identical"
            if best[1] == worst[1]
            else "empty"
            if not best[1].strip() or not worst[1].strip()
            else "below_threshold"
            if g < 0.1
            else None
        )
        reasons.append(reason)
        if reason in (None, "below_threshold"):
            gaps.append(g)
    assert (
        (m["sampling/prompts"], m["sampling/samples"], m["sampling/pairs"])
        == (12, 24, len(pairs))
        == (12, 24, reasons.count(None))
    )
    for reason in ("ties", "identical", "empty", "below_threshold"):
        assert m[f"sampling/dropped_{reason}"] == reasons.count(reason)
    scores = torch.tensor([s["score"] for s in samples], dtype=torch.float64)
    assert m["sampling/score_mean"] == pytest.approx(scores.mean().item())
    assert m["sampling/score_std"] == pytest.approx(scores.std(unbiased=False).item())
    # The module's GenerationCounters, handed to the stats callback by configure_callbacks.
    assert m["sampling/generate_tokens_per_sec"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id, "sampling")}
    assert names == {"sampling/gap_histogram.png", "sampling/pairs_vs_threshold.csv", "sampling/pairs_vs_threshold.png"}
    table = (
        Path(client.download_artifacts(run.info.run_id, "sampling/pairs_vs_threshold.csv", str(in_tmp)))
        .read_text()
        .splitlines()
    )
    for row in table[1:]:
        t, kept = float(row.split(",")[0]), int(row.split(",")[1])
        assert kept == sum(g >= t for g in gaps)
