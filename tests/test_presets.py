"""Model presets: Qwen2.5-0.5B's exact shape, and every stage run on the real 151,936-token vocabulary."""

from __future__ import annotations

import json
import math
import os

import mlflow
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

from synpref.cli import main
from synpref.core.models import load_tokenizer
from synpref.presets import PRESETS, QWEN_VOCAB
from tests.conftest import read_jsonl


def test_qwen2_5_0_5b_preset_has_the_published_size():
    with torch.device("meta"):  # the config's shape, no weights allocated
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **PRESETS["qwen2.5-0.5b"]))
    # Qwen2.5-0.5B's model card: 0.49B parameters, 0.36B without the (tied) embedding.
    assert model.num_parameters() == 494_032_768
    assert round((model.num_parameters() - QWEN_VOCAB * 896) / 1e9, 2) == 0.36


def test_build_model_command_writes_the_preset(tmp_path, sample_dir):
    out = tmp_path / "tiny"
    main(["build-model", "--preset", "tiny", "--out", str(out), "--corpus", f'["{sample_dir / "sft_messages.jsonl"}"]'])
    config = AutoConfig.from_pretrained(out)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (2048, 64, 2)


def _metric(experiment: str, run: str, key: str) -> float:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    (found,) = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run}'")
    return client.get_metric_history(found.info.run_id, key)[0].value


def test_every_stage_runs_on_the_real_vocabulary(in_tmp, qwen_small_model, sample_dir):
    """SFT, DPO (live and precomputed reference), sampling and evaluation, one step each, through the CLI
    with the tiny configs and one override of the model path."""
    tok = load_tokenizer(qwen_small_model)
    assert len(tok) == 151_665 and tok.eos_token == "<|endoftext|>"  # Qwen2.5's own tokenizer
    short = [
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--data.init_args.batch_size=2",
        "--data.init_args.max_length=128",
        "--model.init_args.logits_chunk_size=64",
    ]
    main(
        [
            "fit",
            "--config",
            "configs/tiny/sft.yaml",
            f"--model.init_args.policy.name_or_path={qwen_small_model}",
            "--trainer.logger.init_args.run_name=sft",
            "--export.dirpath=artifacts/q/sft",
            *short,
        ]
    )
    # A random model is uniform over the vocabulary: its first loss is ln(151,936) = 11.93.
    assert abs(_metric("synpref-tiny", "sft", "train/loss") - math.log(QWEN_VOCAB)) < 0.1

    pairs = lambda f, n: json.dumps([{"path": str(sample_dir / f), "format": "ultrafeedback_binarized", "max_rows": n}])
    for mode in ("live", "precomputed"):
        main(
            [
                "fit",
                "--config",
                "configs/tiny/dpo.yaml",
                "--config",
                "configs/tiny/dpo_ultrafeedback.yaml",
                "--model.init_args.policy.name_or_path=artifacts/q/sft",
                f"--data.init_args.sources={pairs('train_prefs.jsonl', 6)}",
                f"--data.init_args.val_sources={pairs('test_prefs.jsonl', 2)}",
                f"--model.init_args.precompute_ref_logps={mode == 'precomputed'}",
                "--model.init_args.ref_cache_dir=ref",
                f"--trainer.logger.init_args.run_name=dpo_{mode}",
                f"--export.dirpath=artifacts/q/dpo_{mode}",
                *short,
            ]
        )
        # Policy = reference at the first step: the DPO loss is ln 2 whatever the reference source.
        assert abs(_metric("synpref-tiny", f"dpo_{mode}", "train/loss") - math.log(2)) < 1e-4
    assert len(list((in_tmp / "ref").glob("ref_logps-*.pt"))) == 1
    before, after = (load_file(in_tmp / f"artifacts/q/{m}/model.safetensors") for m in ("sft", "dpo_live"))
    assert after["model.embed_tokens.weight"].shape[0] == QWEN_VOCAB
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])

    decode = ["--data.init_args.max_prompts=2", "--model.init_args.decoding.max_new_tokens=4"]
    main(
        [
            "predict",
            "--config",
            "configs/tiny/sample.yaml",
            "--model.init_args.policy.name_or_path=artifacts/q/sft",
            "--model.init_args.output_dir=artifacts/q/samples",
            *decode,
        ]
    )
    samples = read_jsonl(in_tmp / "artifacts/q/samples/samples.jsonl")
    assert len(samples) == 4 and len({s["prompt_id"] for s in samples}) == 2  # K = 2 samples per prompt
    main(
        [
            "predict",
            "--config",
            "configs/tiny/eval.yaml",
            "--model.init_args.policy.name_or_path=artifacts/q/dpo_live",
            "--model.init_args.baseline.name_or_path=artifacts/q/sft",
            "--model.init_args.output_dir=artifacts/q/eval",
            *decode,
        ]
    )
    assert len(read_jsonl(in_tmp / "artifacts/q/eval/eval.jsonl")) == 2


def test_estimate_adds_the_documented_terms(capsys):
    from synpref.reporting.estimate import estimate

    live = estimate(stage="dpo", preset="qwen2.5-0.5b", max_length=1024, batch_size=4, chunk=256)
    assert "494M parameters" in capsys.readouterr().out
    # By hand: 16 bytes per parameter (weights, AdamW, live reference) + 4 of gradients; 8,192 tokens x 24
    # layers x (12*896 + 2*128 + 4*4864) values x 4 bytes; 3 x 256 x 151,936 x 4 bytes of logits.
    assert live["params"] == round(16 * 494_032_768 / 1e9, 3)
    assert live["gradients"] == round(4 * 494_032_768 / 1e9, 3)
    assert live["activations"] == round(8192 * 24 * (12 * 896 + 2 * 128 + 4 * 4864) * 4 / 1e9, 3)
    assert live["logits"] == round(3 * 256 * QWEN_VOCAB * 4 / 1e9, 3)
    precomputed = estimate(stage="dpo", preset="qwen2.5-0.5b", max_length=1024, batch_size=4, precompute_ref_logps=True)
    assert precomputed["params"] == round(12 * 494_032_768 / 1e9, 3)
    lean = estimate(
        stage="dpo",
        preset="qwen2.5-0.5b",
        max_length=1024,
        batch_size=4,
        ref_bf16=True,
        gradient_checkpointing=True,
        optimizer_in_backward=True,
    )
    # Reference in bf16: 12 + 2 bytes; only the tied embedding's gradient is held whole; checkpointing keeps
    # each layer's fp32 input and fp32 attention output (8,192 x 24 x 896 x (4 + 4) bytes) and one layer's
    # saved tensors.
    assert lean["params"] == round(14 * 494_032_768 / 1e9, 3)
    assert lean["gradients"] == round(4 * QWEN_VOCAB * 896 / 1e9, 3)
    per_layer = 8192 * (12 * 896 + 2 * 128 + 4 * 4864) * 4
    assert lean["activations"] == round((per_layer + 8192 * 24 * 896 * 8) / 1e9, 3)
    unchunked = estimate(stage="sft", preset="qwen2.5-0.5b", max_length=1024, batch_size=4, chunk=0)
    assert unchunked["logits"] == round(3 * 2048 * QWEN_VOCAB * 4 / 1e9, 3)  # half of 4,096 tokens labelled
