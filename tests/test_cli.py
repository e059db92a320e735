"""The `synpref` command: fit on the tiny config end to end, config composition, --print_config, --help."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from synpref.cli import main
from tests.conftest import assert_run_params, read_jsonl

FAST = [
    "--trainer.max_epochs=1",
    "--data.init_args.max_rows=64",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_fit_logs_to_mlflow_and_exports(in_tmp, sample_dir, tiny_model):
    main(["fit", "--config", "configs/tiny/sft.yaml", *FAST])

    client = mlflow.MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synpref-tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "sft"
    metrics = run.data.metrics
    for key in ("train/loss", "val/loss", "train/tokens_per_sec", "train/learning_rate"):
        assert key in metrics and math.isfinite(metrics[key]), key
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert metrics["train/tokens_per_sec"] > 0
    # The logged learning rate follows warmup + cosine: up from near 0, never above the peak, back to 0.
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/learning_rate")]
    assert 0 < lrs[0] < max(lrs) == pytest.approx(3.0e-3) and lrs[-1] < max(lrs)
    assert float(run.data.params["lr"]) == 3.0e-3
    assert_run_params(run.data.params, "sft")
    assert run.data.params["policy_name"] == "base" and run.data.params["max_epochs"] == "1"

    # The resolved config, command-line overrides included, is an artifact of the run.
    config_path = client.download_artifacts(run.info.run_id, "config.yaml", str(in_tmp))
    config = yaml.safe_load(Path(config_path).read_text())
    assert config["model"]["class_path"] == "synpref.modules.SFTModule"
    assert config["trainer"]["max_epochs"] == 1 and config["data"]["init_args"]["max_rows"] == 64

    # The export is a plain HF directory: it reloads with the Auto classes and generates.
    export = in_tmp / "artifacts" / "tiny" / "sft"
    assert run.data.tags["synpref.export_dir"] == str(export.resolve())
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight), "weights were not trained"
    prompt = read_jsonl(sample_dir / "test_prefs.jsonl")[0]["prompt"]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_print_config_does_not_run(in_tmp, capsys):
    config = print_config(capsys, "--config", "configs/tiny/sft.yaml")
    assert config["model"]["init_args"]["policy"]["name_or_path"] == "artifacts/tiny/base"
    assert config["data"]["class_path"] == "synpref.data.SmolTalkDataModule"
    assert config["export"]["dirpath"] == "artifacts/tiny/sft"
    assert config["trainer"]["logger"]["class_path"].endswith("MLFlowLogger")
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "artifacts" / "tiny" / "sft").exists()


def test_configs_compose_and_dotted_overrides_win(in_tmp, capsys, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "model:\n  init_args:\n    lr: 1.0e-2\ntrainer:\n  max_steps: 7\ndata:\n  init_args:\n    batch_size: 5\n"
    )
    config = print_config(
        capsys,
        "--config",
        "configs/tiny/sft.yaml",
        "--config",
        str(extra),
        "--data.init_args.batch_size=3",
        "--model.init_args.scheduler=linear",
    )
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["lr"] == 1.0e-2 and config["trainer"]["max_steps"] == 7  # second file
    assert data["batch_size"] == 3 and model["scheduler"] == "linear"  # command line, after both files
    assert data["max_length"] == 512 and model["warmup_ratio"] == 0.05  # first file, untouched


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "build-tiny"):
        assert sub in out, sub
