"""Fault tests (issue 16): kill -9, read-only and full disks, changed inputs, concurrent writers, mid-epoch resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from synpref.core.specs import ModelSpec
from tests.conftest import ROOT, read_jsonl

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Crash(L.Callback):
    """Raises before optimizer step `at` + 1: the run dies with `at` steps done and checkpointed."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError(f"crash after step {self.at}")


def dpo_fit(tiny_model, sample_dir, root: Path, ckpt_path=None, callbacks=()):
    from synpref.modules.dpo import DPOModule
    from tests.test_dpo import data

    L.seed_everything(0)
    module = DPOModule(ModelSpec(tiny_model), lr=1e-3, warmup_ratio=0.2)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, data(sample_dir, 40, batch_size=4, tiny_model=tiny_model), ckpt_path=ckpt_path)
    return trainer, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_dpo_mid_epoch_resume_equals_the_uninterrupted_run(tiny_model, sample_dir, tmp_path):
    whole_trainer, whole = dpo_fit(tiny_model, sample_dir, tmp_path / "whole")
    steps = whole_trainer.global_step
    per_epoch = steps // 2
    assert per_epoch >= 4
    crash_at = per_epoch + 2  # inside the second epoch: the sampler's epoch and position both matter
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(RuntimeError, match=f"crash after step {crash_at}"):
        dpo_fit(tiny_model, sample_dir, tmp_path / "run", callbacks=[saver, Crash(crash_at)])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == crash_at
    resumed_trainer, resumed = dpo_fit(tiny_model, sample_dir, tmp_path / "run", ckpt_path=str(last))
    assert resumed_trainer.global_step == steps  # no batch trained twice or skipped
    worst = max((whole[k] - resumed[k]).abs().max().item() for k in whole)
    assert worst <= 1e-6, worst


# -- sampling and evaluation: one output folder, one writer, resumed only on the same input -------
def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sample_args(out, prompts="prompts.jsonl", model="artifacts/tiny/base", n=8):
    return [
        "predict",
        "--config",
        "configs/tiny/sample.yaml",
        f"--model.init_args.policy.name_or_path={model}",
        "--model.init_args.decoding.max_new_tokens=8",
        f"--model.init_args.output_dir={out}",
        f"--data.init_args.path={prompts}",
        f"--data.init_args.max_prompts={n}",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_prompt_length=128",
        "--data.init_args.exclude=[]",
        "--trainer.enable_progress_bar=false",
    ]


def user_error(capsys, args: list[str]) -> str:
    """What `synpref` prints for a user error: one `synpref: error:` line, exit 2, no traceback."""
    from synpref.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "synpref: error: " in err and "Traceback" not in err, err
    return err


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def wait_for_lines(proc, path: Path, n: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while len(lines(path)) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def assert_each_once(rows: list[dict], n: int) -> None:
    """Every prompt index 0..n-1 exactly once: 0 rows lost, 0 duplicated."""
    indices = [r["index"] for r in rows]
    lost, duplicated = set(range(n)) - set(indices), len(indices) - len(set(indices))
    assert (len(lost), duplicated) == (0, 0), (lost, duplicated)


@pytest.fixture
def prompts(in_tmp, sample_dir):
    train = read_jsonl(sample_dir / "train_prefs.jsonl")
    # Short prompts: none is dropped by max_prompt_length, so prompt i of the file is index i.
    rows = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in train if len(r["prompt"]) < 150][:24]
    write_jsonl(in_tmp / "prompts.jsonl", rows)
    return rows


def test_prompts_changed_before_resume_is_a_named_error(in_tmp, prompts, capsys):
    from synpref.cli import main

    main(sample_args("run"))
    part = in_tmp / "run" / "parts" / "part-001-000.jsonl"
    # What a kill leaves: some prompts in the shard, no merged files.
    part.write_bytes(b"".join(lines(part)[:3]))
    for name in ("samples.jsonl", "pairs.jsonl"):
        (in_tmp / "run" / name).unlink()
    write_jsonl(in_tmp / "prompts.jsonl", prompts[::-1])  # same path, lines reordered
    assert re.search(r"prompts_sha256.*overwrite: true", user_error(capsys, sample_args("run")))
    assert len(lines(part)) == 3  # nothing appended to the old records
    main([*sample_args("run"), "--model.init_args.overwrite=true"])
    rows = read_jsonl(in_tmp / "run" / "samples.jsonl")
    assert_each_once([r for r in rows if r["sample"] == 0], 8)
    assert [r["prompt_id"] for r in rows if r["sample"] == 0] == [p["prompt_id"] for p in prompts[::-1][:8]]


def test_failed_first_run_leaves_nothing_that_blocks_the_fixed_rerun(in_tmp, prompts, tiny_model):
    from synpref.cli import main

    broken = in_tmp / "broken"  # a tokenizer but no weights: fails after the writer is set up, before any sample
    broken.mkdir()
    for f in Path(tiny_model).iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).symlink_to(f)
    with pytest.raises(SystemExit) as exit_:  # a user error: the weights are missing
        main(sample_args("run", model="broken"))
    assert exit_.value.code == 2
    assert not (in_tmp / "run" / "run.json").exists() and not (in_tmp / "run" / ".lock").exists()
    main(sample_args("run"))  # other settings (the model), nothing on disk: starts afresh
    assert_each_once([r for r in read_jsonl(in_tmp / "run" / "samples.jsonl") if r["sample"] == 0], 8)
    assert (
        json.loads((in_tmp / "run" / "run.json").read_text())["module"]["model_name_or_path"] == "artifacts/tiny/base"
    )


def test_second_sampler_on_a_folder_fails_and_a_dead_holders_lock_is_taken_over(in_tmp, prompts, capsys):
    from synpref.cli import main

    run = [*sample_args("run", n=24), "--model.init_args.decoding.max_new_tokens=16"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref", *run],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part, lock = in_tmp / "run" / "parts" / "part-001-000.jsonl", in_tmp / "run" / ".lock"
    wait_for_lines(proc, part, 1)
    try:
        # Paused mid-run (SIGSTOP): the first sampler is alive and holds the lock while the second one
        # starts, however fast its replies are (long replies to keep it busy made this test slow).
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "the first sampler ended before the second started"
        assert re.search(rf"in use by process {proc.pid}\b", user_error(capsys, run))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lock.read_text().split()[0] == str(proc.pid)  # the dead holder's lock is still there
    done = len(lines(part))
    assert 1 <= done < 24
    main(run)  # takes the stale lock over and resumes
    assert not lock.exists()
    assert_each_once([r for r in read_jsonl(in_tmp / "run" / "samples.jsonl") if r["sample"] == 0], 24)
    assert len(read_jsonl(part)) == 24  # the resumed run appended only what was missing


@pytest.fixture
def eval_models(in_tmp, tiny_model, tmp_path_factory):
    from tests.test_evaluation import perturbed_copy

    tiny = in_tmp / "artifacts" / "tiny"
    (tiny / "sft").symlink_to(perturbed_copy(tiny_model, tmp_path_factory.mktemp("baseline") / "sft"))
    (tiny / "dpo_synthetic").symlink_to(tiny_model)


def eval_args(out):
    return [
        "predict",
        "--config",
        "configs/tiny/eval.yaml",
        "--data.init_args.max_prompts=10",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_prompt_length=160",
        "--model.init_args.decoding.max_new_tokens=8",
        f"--model.init_args.output_dir={out}",
        "--model.init_args.figures=false",
        "--trainer.enable_progress_bar=false",
    ]


def test_evaluation_killed_and_rerun_gives_the_uninterrupted_file(in_tmp, eval_models, caplog):
    from synpref.cli import main
    from tests.test_evaluation import eval_run

    main(eval_args("ref"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref", *eval_args("run")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = in_tmp / "run" / "parts" / "part-001-000.jsonl"
    wait_for_lines(proc, part, 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(lines(part))
    assert 1 <= done < 10 and not (in_tmp / "run" / "eval.jsonl").exists()
    with caplog.at_level("INFO"):
        main(eval_args("run"))
    assert f"resuming: {done} prompts already in" in caplog.text  # those were not generated again
    assert (in_tmp / "run" / "eval.jsonl").read_bytes() == (in_tmp / "ref" / "eval.jsonl").read_bytes()
    assert_each_once(read_jsonl(in_tmp / "run" / "eval.jsonl"), 10)
    assert len(read_jsonl(part)) == 10
    runs = eval_run("synpref-tiny")[1]  # newest first: the resumed run, the killed one, the reference
    resumed, ref = runs[0], runs[-1]
    for key in (
        "eval/win_rate",
        "eval/tie_rate",
        "eval/n",
        "eval/avg_reward_policy",
    ):  # the metric counts the prompts from disk too
        assert resumed.data.metrics[key] == ref.data.metrics[key], key
