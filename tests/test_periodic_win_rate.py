"""PeriodicWinRate during DPO: eval/ metrics at its steps, under the evaluation's names."""

import json

import pytest

from tests.conftest import TRAINING_EVAL_PARAMS, assert_run_params, read_jsonl
from tests.test_evaluation import baseline_model, eval_run, outcome_fractions  # noqa: F401  (fixture)


def test_periodic_win_rate_during_dpo(in_tmp, baseline_model):  # noqa: F811
    """PeriodicWinRate(every_n_steps=2) in a DPO fit config: eval/ metrics at steps 2 and 4."""
    from synpref.cli import main

    (in_tmp / "artifacts" / "tiny" / "sft").symlink_to(baseline_model)
    callback = {
        "class_path": "synpref.callbacks.PeriodicWinRate",
        "init_args": {
            "every_n_steps": 2,
            "prompts_path": "synpref://sample/test_prefs.jsonl",
            "max_prompts": 4,
            "max_prompt_length": 128,
            "batch_size": 2,
            "baseline": {"name_or_path": "artifacts/tiny/sft"},
            "decoding": {"max_new_tokens": 12},
            "reward": {"class_path": "synpref.rewards.RuleReward"},
            "output_dir": "artifacts/tiny/dpo_eval",
        },
    }
    pairs = [{"path": "synpref://sample/train_prefs.jsonl", "format": "ultrafeedback_binarized", "max_rows": 24}]
    main(
        [
            "fit",
            "--config",
            "configs/tiny/dpo.yaml",
            "--config",
            "configs/tiny/dpo_ultrafeedback.yaml",
            "--trainer.max_steps=4",
            f"--data.init_args.sources={json.dumps(pairs)}",
            "--data.init_args.val_sources=[]",
            "--data.init_args.batch_size=4",
            "--data.init_args.max_length=128",
            "--trainer.limit_val_batches=0",
            f"--trainer.callbacks+={json.dumps(callback)}",
        ]
    )
    client, runs = eval_run("synpref-tiny", "ultrafeedback·dpo")
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "eval/win_rate")
    assert sorted(h.step for h in history) == [2, 4]
    for h in history:
        rows = read_jsonl(in_tmp / "artifacts" / "tiny" / "dpo_eval" / "eval" / f"step_{h.step:06d}" / "eval.jsonl")
        assert len(rows) == 4 and all(r["step"] == h.step for r in rows)
        assert h.value == pytest.approx(outcome_fractions(rows)[0])
    params = runs[0].data.params
    assert params["eval/baseline_name"] == "sft" and params["eval/n_prompts"] == "4"
    assert_run_params(params, "dpo", TRAINING_EVAL_PARAMS)
    assert params["pairs"] == "ultrafeedback"
    names = {f.path for f in client.list_artifacts(run_id, "eval/step_000004")}
    assert {"eval/step_000004/eval.jsonl", "eval/step_000004/win_rate.png"} <= names
