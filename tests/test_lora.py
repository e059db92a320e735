"""LoRA through peft: DPO and SFT parity with TRL + peft, the merged export, adapter-only checkpoints, refused settings."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch

from synpref.core.errors import ConfigError
from synpref.core.models import load_causal_lm, load_tokenizer
from synpref.core.specs import LoRA, ModelSpec
from synpref.modules.dpo import DPOModule
from synpref.modules.sft import SFTModule
from tests.test_dpo import data, exact_log_probs, fit

peft = pytest.importorskip("peft")

ADAPTER = LoRA(r=4, alpha=8.0)
STEPS = 3


def adapter_state(module) -> dict:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(module._peft[0]).items()}


def trl_lora_run(tiny_model, items, tokenizer, start: dict, lr: float) -> tuple[list[dict], dict]:
    """TRL 1.16's DPOTrainer with the same peft config, adapters starting from `start`, stepped on
    the whole batch by its own collator, loss and (HF Trainer's) AdamW: per-step metrics, final adapters.

    Its `train()` re-tokenizes text columns; our pairs come tokenized, so the loop is written out:
    one batch per step, as `fit` runs it (6 pairs, batch size 6)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir="unused",
        report_to="none",
        beta=0.1,
        loss_type=["sigmoid"],
        use_cpu=True,
        per_device_train_batch_size=len(items),
        max_length=None,
        learning_rate=lr,
        weight_decay=0.0,
        optim="adamw_torch",
    )
    dummy = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(
        model=load_causal_lm(tiny_model, dtype="float64"),
        args=args,
        train_dataset=dummy,
        processing_class=tokenizer,
        peft_config=ADAPTER.config(),
    )
    peft.set_peft_model_state_dict(trainer.model, start)
    exact_log_probs(trainer.model.get_base_model())
    optimizer = trainer.create_optimizer()
    inputs = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in items])
    trainer.model.train()
    logs = []
    for _ in range(STEPS):
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logs.append({"loss": loss.item(), **{k: v[-1] for k, v in trainer._metrics["train"].items()}})
    return logs, {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(trainer.model).items()}


def test_lora_dpo_matches_trl_with_peft_over_three_steps(sample_dir, tiny_model, tmp_path):
    """Losses, chosen/rejected log-ratios and the adapters after 3 steps equal TRL + peft's within 1e-5
    (both float64 with an exact log-softmax: the tolerance measures the code, as in test_dpo)."""
    dm = data(sample_dir, 6, batch_size=6, tiny_model=tiny_model)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    L.seed_everything(0)
    policy = ModelSpec(tiny_model, dtype="float64")
    # Chunks of 8 positions: the frozen head's fused gradient (synpref.core.logprobs), over many chunks.
    module = DPOModule(policy, lora=ADAPTER, lr=1e-2, warmup_steps=0, scheduler="constant", logits_chunk_size=8)
    module.configure_model()
    with torch.no_grad():  # a non-zero start, so the first step's log-ratios are not all 0
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    start = adapter_state(module)
    steps = fit(module, dm, tmp_path, max_epochs=STEPS)
    logs, trl_adapters = trl_lora_run(tiny_model, items, dm.tokenizer, start, lr=1e-2)
    assert len(steps) == len(logs) == STEPS
    for ours, theirs in zip(steps, logs):
        assert ours["train/loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        for key in ("rewards/chosen", "rewards/rejected"):
            assert ours[f"train/{key}"] == pytest.approx(theirs[key], abs=1e-5), key
    final = adapter_state(module)
    assert set(final) == set(trl_adapters)
    for name, value in final.items():
        assert torch.allclose(value, trl_adapters[name], atol=1e-5), name
        assert name not in start or not torch.equal(value, start[name]) or "lora_A" in name
    # Only the adapters moved: the base weights are the starting model's, bit for bit.
    base = load_causal_lm(tiny_model, dtype="float64").state_dict()
    for name, p in module.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name


def trl_lora_sft_run(tiny_model, conversations, start: dict, lr: float, out) -> tuple[list[float], dict]:
    """TRL 1.16's SFTTrainer, its own `train()` end to end (tokenization of prompt-completion rows,
    collator, completion-only loss, AdamW, linear schedule) with the same peft config, adapters
    starting from `start`: per-step losses, final adapters. One batch of every row per epoch."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        report_to="none",
        use_cpu=True,
        bf16=False,  # SFTConfig's default autocasts to bf16
        completion_only_loss=True,
        max_length=None,
        per_device_train_batch_size=len(conversations),
        num_train_epochs=STEPS,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # synpref's fit here clips nothing
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    rows = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in conversations])
    trainer = SFTTrainer(
        model=load_causal_lm(tiny_model, dtype="float32"),
        args=args,
        train_dataset=rows,
        processing_class=load_tokenizer(tiny_model),
        peft_config=ADAPTER.config(),
    )
    peft.set_peft_model_state_dict(trainer.model, start)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(trainer.model).items()}


def test_lora_sft_matches_trl_sft_trainer_with_peft_over_three_steps(sample_dir, tiny_model, tmp_path):
    """Per-step losses and the adapters after 3 steps (linear decay: lr, 2/3 lr, 1/3 lr) equal TRL's
    SFTTrainer with the same peft config within 1e-5, both in fp32."""
    from synpref.core.chat import encode_conversation
    from synpref.data.smoltalk import SmolTalkDataModule
    from tests.conftest import read_jsonl

    tok = load_tokenizer(tiny_model)
    rows = read_jsonl(sample_dir / "sft_messages.jsonl")[:40]
    # Short single-turn conversations, untruncated on both sides: TRL's prompt-completion rows.
    rows = [r for r in rows if len(encode_conversation(tok, r["messages"])["input_ids"]) <= 256][:4]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SmolTalkDataModule(tiny_model, str(path), max_length=256, batch_size=len(rows))
    L.seed_everything(0)
    module = SFTModule(
        ModelSpec(tiny_model, dtype="float32"), lora=ADAPTER, lr=1e-2, warmup_steps=0, scheduler="linear"
    )
    module.configure_model()
    with torch.no_grad():  # a non-zero start, so lora_A has a gradient from the first step
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    start = adapter_state(module)
    steps = fit(module, dm, tmp_path / "ours", max_epochs=STEPS)
    losses, trl_adapters = trl_lora_sft_run(tiny_model, [r["messages"] for r in rows], start, 1e-2, tmp_path / "trl")
    assert len(steps) == len(losses) == STEPS
    for ours, theirs in zip(steps, losses):
        assert ours["train/loss"] == pytest.approx(theirs, abs=1e-5)
    final = adapter_state(module)
    assert set(final) == set(trl_adapters)
    for name, value in final.items():
        assert torch.allclose(value, trl_adapters[name], atol=1e-5), name
        assert not torch.equal(value, start[name]), name  # every adapter trained


def test_lora_export_is_merged_checkpoint_holds_adapters_and_resume_is_exact(sample_dir, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    def module():
        return SFTModule(ModelSpec(tiny_model), lora=ADAPTER, lr=1e-2, warmup_steps=0, scheduler="constant")

    from synpref.data.smoltalk import SmolTalkDataModule

    def sft_data():
        return SmolTalkDataModule(tiny_model, str(sample_dir / "sft_messages.jsonl"), max_rows=16, batch_size=4)

    L.seed_everything(0)
    trained = module()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    steps = fit(trained, sft_data(), tmp_path / "a", max_epochs=2, callbacks=[saver])
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    state = torch.load(first, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # the adapters only, not the base weights
    L.seed_everything(0)
    resumed = fit(module(), sft_data(), tmp_path / "b", max_epochs=2, ckpt=str(first))
    per_epoch = len(steps) // 2
    for a, b in zip(resumed, steps[per_epoch:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)

    out = trained.export(tmp_path / "export")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())  # a plain HF model
    adapter_model = peft.PeftModel.from_pretrained(load_causal_lm(tiny_model), out / "adapter")
    tok = load_tokenizer(str(out))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tok.pad_token_id}
    merged_ids = merged.generate(ids, **kw)
    assert torch.equal(merged_ids, adapter_model.generate(input_ids=ids, **kw))
    plain = load_causal_lm(tiny_model).generate(ids, **kw)
    assert not torch.equal(merged_ids, plain)  # the adapters changed what it says


def test_lora_with_a_separate_reference_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="with lora the reference is the policy's base model"):
        DPOModule(ModelSpec(tiny_model), ref_model=ModelSpec("other/model"), lora=ADAPTER)
    with pytest.raises(ConfigError, match="model.init_args.lora.target_modules"):
        LoRA(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="model.init_args.lora.r"):
        LoRA(r=0)
    copy.deepcopy(ADAPTER)  # a frozen group: copies as configs are composed


def test_planner_counts_the_adapters_peft_makes_and_shards_what_trains(tiny_model):
    from transformers import AutoConfig

    from synpref.presets import PRESETS
    from synpref.reporting.estimate import Shape, lora_params, peak_bytes

    model = peft.get_peft_model(load_causal_lm(tiny_model), LoRA(r=8).config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(Shape.from_config(AutoConfig.from_pretrained(tiny_model)), 8) == trainable

    from transformers import Qwen2Config

    shape = Shape.from_config(Qwen2Config(**PRESETS["qwen2.5-7b"]))
    one = peak_bytes(shape, "dpo", 2, 1024)
    fsdp = peak_bytes(shape, "dpo", 2, 1024, gpus=8, strategy="fsdp")
    # 4 weight + 8 AdamW bytes per parameter, an eighth of them per GPU, + the 4-byte reference, whole.
    assert one["params"] == pytest.approx(16 * shape.params)
    assert fsdp["params"] == pytest.approx(12 * shape.params / 8 + 4 * shape.params)
    assert fsdp["gradients"] == pytest.approx(one["gradients"] / 8)
    lora = peak_bytes(shape, "dpo", 2, 1024, bf16=True, lora_r=16, optim="adamw_8bit")
    # bf16 frozen base (also the reference: none held) + fp32 adapters with 8-bit state.
    assert lora["params"] == pytest.approx(2 * shape.params + 6 * lora_params(shape, 16))
    ddp = peak_bytes(shape, "dpo", 2, 1024, bf16=True, lora_r=16, gpus=8)
    assert ddp["gradients"] == pytest.approx(8 * lora_params(shape, 16))  # gradients + DDP's bucket copy
