"""Lineage in MLflow: each stage's data as dataset inputs with source and digest, and the runs that made them as tags."""

from __future__ import annotations

import os

import mlflow

from synpref.cli import main
from synpref.core.fingerprints import file_sha256
from synpref.core.resources import resolve

FAST_FIT = ["--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
FAST_FIT += ["--trainer.enable_progress_bar=false"]
FAST_PREDICT = ["--model.init_args.decoding.max_new_tokens=8", "--trainer.enable_progress_bar=false"]


def inputs(run) -> dict[str, tuple[str, str, dict]]:
    """name → (context, digest, other tags) of a run's dataset inputs."""
    out = {}
    for d in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        out[d.dataset.name] = (tags.pop("mlflow.data.context"), d.dataset.digest, tags)
    return out


def test_stages_log_their_data_and_link_to_the_runs_that_made_it(in_tmp):
    main(["fit", "--config", "configs/tiny/sft.yaml", *FAST_FIT, "--data.init_args.max_rows=32"])
    main(["predict", "--config", "configs/tiny/sample.yaml", *FAST_PREDICT, "--data.init_args.max_prompts=8"])
    dpo = ["--config", "configs/tiny/dpo.yaml", "--config", "configs/tiny/dpo_synthetic.yaml"]
    main(["fit", *dpo, *FAST_FIT, "--model.init_args.lr=1e-4"])
    main(["predict", "--config", "configs/tiny/eval.yaml", *FAST_PREDICT, "--data.init_args.max_prompts=4"])

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synpref-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    sft, sample, dpo, ev = (runs[n] for n in ("sft", "sample", "synthetic·dpo", "synthetic·eval"))
    digest = lambda path: file_sha256(resolve(path))[:32]

    assert inputs(sft) == {
        "synpref://sample/sft_messages.jsonl": ("training", digest("synpref://sample/sft_messages.jsonl"), {})
    }
    assert inputs(sample) == {
        "synpref://sample/train_prefs.jsonl": ("sampling", digest("synpref://sample/train_prefs.jsonl"), {}),
        "synpref://sample/test_prefs.jsonl": ("excluded", digest("synpref://sample/test_prefs.jsonl"), {}),
    }
    # The synthetic pairs: the sampling run that wrote them, found by their content.
    pairs = "artifacts/tiny/samples/pairs.jsonl"
    assert inputs(dpo) == {
        pairs: ("training", digest(pairs), {"synpref.made_by_run": sample.info.run_id}),
        "synpref://sample/test_prefs.jsonl": ("validation", digest("synpref://sample/test_prefs.jsonl"), {}),
    }
    assert dpo.data.tags["synpref.sampling_run_id"] == sample.info.run_id
    assert dpo.data.tags["synpref.sft_run_id"] == sft.info.run_id
    assert inputs(ev) == {
        "synpref://sample/test_prefs.jsonl": ("evaluation", digest("synpref://sample/test_prefs.jsonl"), {})
    }
    assert (ev.data.tags["synpref.policy_run_id"], ev.data.tags["synpref.baseline_run_id"]) == (
        dpo.info.run_id,
        sft.info.run_id,
    )
    source = next(d.dataset.source for d in sft.inputs.dataset_inputs)
    assert resolve("synpref://sample/sft_messages.jsonl") in source
