"""DPOModule: parity with TRL's DPOTrainer, frozen reference, checkpoints, learning, precomputed reference."""

from __future__ import annotations

import copy
import logging

import lightning as L
import pytest
import torch

from synpref.core.losses import PreferenceLoss
from synpref.core.models import load_causal_lm
from synpref.core.specs import ModelSpec
from synpref.data.preferences import PreferenceDataModule, PreferenceSource
from synpref.modules.dpo import DPOModule, sequence_logps

UF = {"format": "ultrafeedback_binarized"}


def data(sample_dir, n=None, max_length=128, batch_size=8, val_fraction=0.0, tiny_model=None, **kw):
    src = PreferenceSource(str(sample_dir / "train_prefs.jsonl"), max_rows=n, **UF)
    return PreferenceDataModule(
        tiny_model,
        [src],
        max_length=max_length,
        batch_size=batch_size,
        val_fraction=val_fraction,
        on_bad_row="skip",
        **kw,
    )


@pytest.fixture(scope="module")
def small(sample_dir, tiny_model):
    dm = data(sample_dir, 24, tiny_model=tiny_model)
    dm.setup("fit")
    return dm


# -- parity with TRL ---------------------------------------------------------------------------
def exact_log_probs(model):
    """Swap the per-token log-probs of TRL's fused LM head for a full-vocabulary float64 log-softmax.

    On CPU, TRL 1.16's tiled log-prob fold deviates from the exact log-softmax by up to ~3e-3 per
    token in fp32 (sums of ~100 tokens then differ by ~1e-4 relative), more than the 1e-5 this
    test checks; everything else (collator, masks, shift, sums, losses, metrics) stays TRL's.
    Both sides run in float64, so the 1e-5 tolerance measures the code, not fp32 rounding.
    """
    fused = model.forward

    def forward(*args, fused_lm_head=False, labels=None, **kw):
        out = fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kw)
        if fused_lm_head:
            with torch.no_grad() if not torch.is_grad_enabled() else torch.enable_grad():
                hidden = model.base_model(
                    input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]
                ).last_hidden_state
                logp = torch.log_softmax(model.get_output_embeddings()(hidden[:, :-1]).double(), -1)
                target = labels[:, 1:]
                out.log_probs = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(target == -100, 0)
        return out

    model.forward = forward


def trl_metrics(policy, ref, tok, items, loss_type, exact=True):
    """TRL 1.16 DPOTrainer's loss and logged metrics on our tokens (its own collator and loss code)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir="unused",
        report_to="none",
        beta=0.1,
        loss_type=[loss_type],
        use_cpu=True,
        per_device_train_batch_size=len(items),
        max_length=None,
    )
    dummy = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=dummy, processing_class=tok
    )
    if exact:
        for model in (trainer.model, trainer.ref_model):
            exact_log_probs(model)
    inputs = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in items])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    return {"loss": loss.item(), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.2)])
def test_matches_trl(small, tiny_model, loss_type, label_smoothing):
    torch.manual_seed(0)
    ref = load_causal_lm(tiny_model, dtype="float64")
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [small.train_set[i] for i in range(6)]
    batch = small.collate(items)
    logps, lengths = sequence_logps(policy, batch)
    ref_logps, _ = sequence_logps(ref, batch)
    losses, rc, rr = PreferenceLoss(loss_type, 0.1, label_smoothing)(
        logps[:6], logps[6:], ref_logps[:6], ref_logps[6:], lengths[:6], lengths[6:]
    )
    ours = {
        "loss": losses.mean().item(),
        "rewards/chosen": rc.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (rc > rr).float().mean().item(),
        "rewards/margins": (rc - rr).mean().item(),
        "logps/chosen": logps[:6].mean().item(),
        "logps/rejected": logps[6:].mean().item(),
    }
    tok = small.tokenizer
    trl = trl_metrics(policy, ref, tok, items, loss_type)
    # Unpatched TRL (its fp32 tiled head) agrees to ~1e-4: the difference is its rounding, not ours.
    assert label_smoothing or ours["loss"] == pytest.approx(
        trl_metrics(policy, ref, tok, items, loss_type, exact=False)["loss"], rel=1e-3
    )
    if label_smoothing:
        # TRL 1.16 dropped cDPO from its sigmoid loss; cDPO = (1-ε)·DPO(pairs) + ε·DPO(swapped pairs).
        swapped = [{**r, "chosen_ids": r["rejected_ids"], "rejected_ids": r["chosen_ids"]} for r in items]
        flipped = trl_metrics(policy, ref, tok, swapped, loss_type)
        trl["loss"] = (1 - label_smoothing) * trl["loss"] + label_smoothing * flipped["loss"]
    assert 0 < ours["rewards/accuracies"] < 1 and abs(ours["rewards/margins"]) > 1e-3  # a non-trivial batch
    for key, value in ours.items():
        assert value == pytest.approx(trl[key], abs=1e-5), key


# -- training ----------------------------------------------------------------------------------
class Record(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(module, dm, tmp_path, max_epochs=2, ckpt=None, **trainer_kw):
    rec = Record()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[rec, *trainer_kw.pop("callbacks", [])],
        num_sanity_val_steps=0,
        **trainer_kw,
    )
    trainer.fit(module, dm, ckpt_path=ckpt)
    return rec.steps


def test_frozen_reference_checkpoint_and_exact_resume(sample_dir, tiny_model, tmp_path):
    L.seed_everything(0)
    module = DPOModule(ModelSpec(tiny_model), lr=1e-3, warmup_steps=0)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    steps = fit(module, data(sample_dir, 40, tiny_model=tiny_model), tmp_path, callbacks=[saver])
    ref = module.reference()
    fresh = load_causal_lm(tiny_model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    for (name, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # bitwise unchanged
    optimised = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in ref.parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(module.model.parameters(), fresh.parameters()))

    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    state = torch.load(first, weights_only=True)["state_dict"]
    assert set(state) == {f"model.{k}" for k in fresh.state_dict()}  # the policy only, no reference
    per_epoch = len(steps) // 2

    L.seed_everything(0)
    resumed = fit(
        DPOModule(ModelSpec(tiny_model), lr=1e-3, warmup_steps=0),
        data(sample_dir, 40, tiny_model=tiny_model),
        tmp_path / "resume",
        ckpt=str(first),
    )
    assert len(resumed) == per_epoch
    for a, b in zip(resumed, steps[per_epoch:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)


def test_dpo_learns_the_preferences(sample_dir, tiny_model, tmp_path):
    """The 400 shared pairs (ties, unusable rows and prompts ≥ 128 tokens dropped and counted):
    train accuracy over the last of 3 epochs > 0.9 (epoch 1 is at chance, ~0.5)."""
    L.seed_everything(0)
    dm = data(sample_dir, None, max_length=128, batch_size=16, tiny_model=tiny_model)
    module = DPOModule(ModelSpec(tiny_model), beta=0.1, lr=5e-3, warmup_steps=2, scheduler="constant")
    steps = fit(module, dm, tmp_path, max_epochs=3)
    last = steps[-len(steps) // 3 :]
    acc = sum(s["train/rewards/accuracies"] for s in last) / len(last)
    assert len(dm.train_set) > 150 and acc > 0.9, acc
    assert steps[-1]["train/rewards/margins"] > steps[0]["train/rewards/margins"]


def test_precomputed_reference_equals_live_and_is_cached(sample_dir, tiny_model, tmp_path, caplog):
    def validate(**kw):
        L.seed_everything(0)
        module = DPOModule(ModelSpec(tiny_model), ref_cache_dir=str(tmp_path / "cache"), **kw)
        dm = data(sample_dir, 24, batch_size=4, val_fraction=0.25, tiny_model=tiny_model)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        module.model = load_causal_lm(tiny_model)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # policy ≠ reference
        return module, trainer.validate(module, dm)[0], dm

    live, live_metrics, dm = validate()
    pre, pre_metrics, _ = validate(precompute_ref_logps=True)
    ref = load_causal_lm(tiny_model)
    for ds in (dm.train_set, dm.val_set):
        batch = dm.collate([ds[i] for i in range(len(ds))])
        logps = sequence_logps(ref, batch)[0]
        n = len(ds)
        table = pre._ref_table[batch["index"]]
        assert torch.allclose(table[:, 0], logps[:n], rtol=1e-6) and torch.allclose(table[:, 1], logps[n:], rtol=1e-6)
    assert pre._ref == [] and len(list((tmp_path / "cache").iterdir())) == 1  # freed, one cache file
    for key, value in live_metrics.items():
        assert pre_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    with caplog.at_level(logging.INFO, logger="synpref.modules.dpo"):
        again, _, _ = validate(precompute_ref_logps=True)
    assert "reusing cached reference log-probs" in caplog.text
    assert torch.equal(again._ref_table, pre._ref_table)
