"""KTO: unpaired examples from samples and pairs, the loss by hand, and 3 training steps against TRL's KTOTrainer."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from synpref.callbacks.prediction_writer import sample_rows
from synpref.core.errors import ConfigError, DataError
from synpref.core.losses import kto_loss
from synpref.core.models import load_causal_lm
from synpref.core.specs import ModelSpec
from synpref.data.unpaired import UnpairedDataModule, UnpairedSource, sample_labels
from synpref.modules.kto import KTOModule
from tests.test_dpo import exact_log_probs


def write_samples(path, records: list[dict]):
    """samples.jsonl as `synpref predict` writes it (SampleWriter's rows: one per sample) from per-prompt records."""
    rows = [
        row
        for i, rec in enumerate(records)
        for row in sample_rows(
            {
                "index": i,
                "prompt_id": rec.get("prompt_id", str(i)),
                "prompt": rec["prompt"],
                "samples": [{"num_tokens": 1, **x} for x in rec["samples"]],
            }
        )
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_samples_in_the_old_grouped_shape_are_a_named_error(tmp_path, tiny_model):
    path = tmp_path / "samples.jsonl"
    path.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "samples": [{"text": "a", "score": 1}]}) + "\n"
    )
    dm = UnpairedDataModule(tiny_model, [UnpairedSource(str(path))], batch_size=2)
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert (e.value.source, e.value.field) == (str(path), "index")


def test_label_rules():
    assert sample_labels([1.0, 3.0, 2.0], "median", 0) == [False, True, None]  # the median sample is dropped
    assert sample_labels([1.0, 4.0, 2.0, 3.0], "median", 0) == [False, True, False, True]
    assert sample_labels([0.2, 0.5, 0.9], "threshold", 0.5) == [False, True, True]


def test_samples_and_pairs_become_unpaired_examples(tmp_path, tiny_model, sample_dir):
    prompt = [{"role": "user", "content": "Name a colour."}]
    records = [
        {"prompt": prompt, "samples": [{"text": t, "score": s} for t, s in (("Blue.", 3.0), ("Cheese.", 1.0))]},
        {"prompt": prompt, "samples": [{"text": t, "score": 2.0} for t in ("Red.", "Green.")]},  # all at the median
    ]
    samples = write_samples(tmp_path / "samples.jsonl", records)
    dm = UnpairedDataModule(tiny_model, [UnpairedSource(str(samples))], batch_size=2)
    dm.setup("fit")
    tok = dm.tokenizer
    texts = {tok.decode(r["completion_ids"]).split("<")[0]: r["label"] for r in dm.train_set}
    assert texts == {"Blue.": True, "Cheese.": False} and dm.drop_counts == {"train/at_median": 1}
    dm = UnpairedDataModule(
        tiny_model, [UnpairedSource(str(samples), label_rule="threshold", threshold=2.0)], batch_size=2
    )
    dm.setup("fit")
    assert sorted(dm.train_set["label"]) == [False, True, True, True]

    uf = UnpairedSource(str(sample_dir / "train_prefs.jsonl"), "ultrafeedback_binarized", max_rows=8)
    dm = UnpairedDataModule(tiny_model, [uf], batch_size=2, max_length=4096, on_bad_row="skip")
    dm.setup("fit")
    pairs = [json.loads(x) for x in (sample_dir / "train_prefs.jsonl").read_text().splitlines()[:8]]
    kept = [p for p in pairs if p["score_chosen"] != p["score_rejected"] and p["chosen"][-1] != p["rejected"][-1]]
    assert dm.train_set["label"] == [True, False] * len(kept)
    first = tok.decode(dm.train_set[0]["completion_ids"], skip_special_tokens=True).strip()
    assert first == kept[0]["chosen"][-1]["content"].strip()


def test_collate_rotates_completions_for_the_kl_sequences(tiny_model, tmp_path):
    dm = UnpairedDataModule(tiny_model, [UnpairedSource(str(tmp_path / "unused"))], batch_size=2, max_length=6)
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3, 4], "label": True, "index": 0}]
    rows += [{"prompt_ids": [5], "completion_ids": [6, 7, 8, 9, 10, 11], "label": False, "index": 1}]
    batch = dm.collate(rows)
    pad = dm.tokenizer.pad_token_id
    assert batch["kl_input_ids"].tolist() == [[1, 2, 6, 7, 8, 9], [5, 3, 4, pad, pad, pad]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 6, 7, 8, 9], [-100, 3, 4, -100, -100, -100]]
    assert batch["input_ids"][1].tolist() == [5, 6, 7, 8, 9, 10]  # cut to max_length
    assert batch["label"].tolist() == [True, False]


def test_kto_loss_on_hand_values():
    logps, ref = torch.tensor([-10.0, -12.0, -9.0]), torch.tensor([-11.0, -11.0, -9.5])
    kl_logps, ref_kl = torch.tensor([-20.0, -21.0, -19.0]), torch.tensor([-20.5, -21.5, -19.2])
    desirable = torch.tensor([True, False, False])
    losses, rewards, kl = kto_loss(logps, ref, kl_logps, ref_kl, desirable, beta=0.5, undesirable_weight=2.0)
    z0 = (0.5 + 0.5 + 0.2) / 3
    sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x))).item()
    assert kl.item() == pytest.approx(z0)
    assert losses.tolist() == pytest.approx(
        [1 - sig(0.5 * (1 - z0)), 2 * (1 - sig(0.5 * (z0 + 1))), 2 * (1 - sig(0.5 * (z0 - 0.5)))]
    )
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.25])
    _, _, floored = kto_loss(logps, ref, ref_kl, kl_logps, desirable)  # a negative estimate is floored at 0
    assert floored.item() == 0


def test_bad_kto_settings(tiny_model, tmp_path):
    with pytest.raises(ConfigError) as err:
        UnpairedDataModule(tiny_model, [UnpairedSource("x")], batch_size=1)
    assert err.value.key == "data.init_args.batch_size"
    with pytest.raises(ConfigError) as err:
        KTOModule(ModelSpec(tiny_model), undesirable_weight=0.0)
    assert err.value.key == "model.init_args.undesirable_weight"


# -- parity with TRL's KTOTrainer ------------------------------------------------------------------
STEPS, BATCH, LR, BETA = 3, 4, 5e-3, 0.1


def trl_run(tiny_model, tok, examples, tmp_path):
    """TRL 1.16 KTOTrainer trained STEPS steps on our tokenized examples (its collator, loss and loop)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=BATCH,
        max_length=128, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", save_strategy="no",
        logging_steps=1, beta=BETA, seed=0, disable_tqdm=True, gradient_checkpointing=False,
    )  # fmt: skip
    dummy = Dataset.from_list(
        [{"prompt": "q", "completion": c, "label": lab} for c, lab in (("a", True), ("b", False))]
    )
    trainer = KTOTrainer(
        model=load_causal_lm(tiny_model, dtype="float64"),
        ref_model=load_causal_lm(tiny_model, dtype="float64"),
        args=args,
        train_dataset=dummy,
        processing_class=tok,
    )
    rows = [{k: e[k] for k in ("prompt_ids", "completion_ids", "label")} for e in examples]
    for s in range(0, len(rows), BATCH):  # TRL's rotation within each batch, as its _prepare_dataset does
        batch = rows[s : s + BATCH]
        for r, c in zip(batch, [batch[-1]["completion_ids"]] + [x["completion_ids"] for x in batch[:-1]]):
            r["KL_completion_ids"] = c
    trainer.train_dataset = Dataset.from_list(rows)
    for model in (trainer.model, trainer.ref_model):
        exact_log_probs(model)  # TRL's fp32-tiled head is ~3e-3 per token off on CPU; see tests/test_dpo.py
    losses, compute = [], trainer.compute_loss

    def record(*a, **kw):
        loss = compute(*a, **kw)
        losses.append(loss.item())
        return loss

    trainer.compute_loss = record
    trainer.train()
    return losses, trainer.model


def test_kto_matches_trl_over_three_steps(sample_dir, tiny_model, tmp_path):
    """Per-step losses and the weights after 3 optimizer steps (AdamW, linear decay, float64) within 1e-5."""
    uf = UnpairedSource(str(sample_dir / "train_prefs.jsonl"), "ultrafeedback_binarized", max_rows=16)
    dm = UnpairedDataModule(
        tiny_model, [uf], batch_size=BATCH, max_length=128, on_bad_row="skip", group_by_length=False
    )
    dm.setup("fit")
    dm.train_dataloader = lambda: dm._loader(dm.train_set, BATCH, shuffle=False)  # TRL's sequential order
    examples = [dm.train_set[i] for i in range(STEPS * BATCH)]
    assert len(dm.train_set) >= STEPS * BATCH

    L.seed_everything(0)
    module = KTOModule(ModelSpec(tiny_model, dtype="float64"), beta=BETA, lr=LR, scheduler="linear", warmup_steps=0)
    ours = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ours.append(outputs["loss"].item())

    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, precision="64-true", logger=False, callbacks=[Record()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm)

    theirs, trl_model = trl_run(tiny_model, dm.tokenizer, examples, tmp_path)
    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert abs(ours[-1] - ours[0]) > 1e-4  # the steps moved the policy
    for (name, a), b in zip(module.model.named_parameters(), trl_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_tiny_kto_config_runs_and_exports(in_tmp, tiny_model, sample_dir):
    """configs/tiny/dpo.yaml + kto.yaml unmodified, on a samples.jsonl as `synpref predict` writes it."""
    from synpref.cli import main

    (in_tmp / "artifacts" / "tiny" / "sft").symlink_to(tiny_model)
    rows = [json.loads(x) for x in (sample_dir / "train_prefs.jsonl").read_text().splitlines()[:40]]
    samples = in_tmp / "artifacts" / "tiny" / "samples" / "samples.jsonl"
    samples.parent.mkdir(parents=True)
    records = [
        {
            "prompt_id": r["prompt_id"],
            "prompt": r["chosen"][:-1],
            "samples": [
                {"text": r["chosen"][-1]["content"], "score": r["score_chosen"]},
                {"text": r["rejected"][-1]["content"], "score": r["score_rejected"]},
                {"text": "I do not know.", "score": 0.0},
            ],
        }
        for r in rows
    ]
    write_samples(samples, records)
    args = ["fit", "--config", "configs/tiny/dpo.yaml", "--config", "configs/tiny/kto.yaml", "--trainer.max_steps=3"]
    main([*args, "--trainer.enable_progress_bar=false", "--data.init_args.max_length=128"])
    assert (in_tmp / "artifacts" / "tiny" / "kto_synthetic" / "config.json").exists()
