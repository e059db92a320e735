"""SFT loss: the mean assistant-token NLL, by hand and as TRL's SFTTrainer computes it."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from synpref.core.chat import IGNORE_INDEX, encode_conversation
from synpref.core.models import load_tokenizer
from synpref.core.specs import ModelSpec
from synpref.data.collate import collate_sft
from synpref.modules import SFTModule
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with large random embeddings (tied to the LM head): a freshly initialised model
    predicts nearly uniformly, which would hide a shifted or misplaced label behind equal NLLs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(out)
    load_tokenizer(tiny_model).save_pretrained(out)
    return str(out)


MAX_LENGTH = 512


@pytest.fixture(scope="module")
def conversations(sample_dir, tiny_model):
    """The first four real conversations that fit MAX_LENGTH (no truncation: both sides see all)."""
    tok = load_tokenizer(tiny_model)
    rows = [r["messages"] for r in read_jsonl(sample_dir / "sft_messages.jsonl")[:40]]
    fits = [m for m in rows if len(encode_conversation(tok, m)["input_ids"]) <= MAX_LENGTH]
    return fits[:4]


@pytest.fixture(scope="module")
def batch(sharp_model, conversations):
    tok = load_tokenizer(sharp_model)
    rows = [encode_conversation(tok, m, max_length=MAX_LENGTH) for m in conversations]
    out = collate_sft(rows, tok.pad_token_id)
    assert (out["attention_mask"] == 0).any(), "the batch should include padding"
    return out


@pytest.fixture(scope="module")
def module(sharp_model):
    m = SFTModule(ModelSpec(sharp_model, dtype="float32"))
    m.configure_model()
    return m


def reference_nll(model, batch, shift: int = 1) -> torch.Tensor:
    """Mean NLL of labelled tokens from the full logits: log_softmax, gather, mask, mean."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-shift]
    labels = batch["labels"][:, shift:]
    mask = labels != IGNORE_INDEX
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(token_logp * mask).sum() / mask.sum()


def test_loss_is_mean_assistant_token_nll(module, batch):
    with torch.no_grad():
        loss, n = module.sft_loss(batch)
    ref = reference_nll(module.model, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(loss.item() - ref.item()) < 1e-5
    # The check discriminates: a label shifted by one more position gives a clearly different NLL.
    assert abs(reference_nll(module.model, batch, shift=2).item() - ref.item()) > 1e-2


def trl_trainer(sharp_model, conversations, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(sharp_model)
    rows = [{"prompt": m[:-1], "completion": m[-1:]} for m in conversations]
    args = SFTConfig(
        output_dir=str(tmp_path),
        completion_only_loss=True,
        max_length=MAX_LENGTH,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=4,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32)
    return SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


def test_loss_and_labels_match_trl(sharp_model, conversations, module, batch, tmp_path):
    trainer = trl_trainer(sharp_model, conversations, tmp_path)

    # Labels: TRL's completion mask (prompt-completion format) covers the reply, <|im_end|> and the
    # template's newline after it; so do synpref's.
    trl_rows = [trainer.train_dataset[i] for i in range(len(conversations))]
    tok = load_tokenizer(sharp_model)
    for messages, trl_row in zip(conversations, trl_rows):
        ours = encode_conversation(tok, messages, max_length=MAX_LENGTH)
        assert ours["input_ids"] == trl_row["input_ids"]
        assert tok.decode(trl_row["input_ids"][-1:]) == "\n"
        assert ours["labels"] == trl_row["labels"]

    # Loss: the same input_ids/labels through TRL's compute_loss and synpref's sft_loss.
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
        ours, _ = module.sft_loss(batch)
    assert abs(trl_loss.item() - ours.item()) < 1e-5


def test_no_forward_holds_the_previous_steps_gradients(tiny_model, sample_dir, tmp_path):
    """Gradients are freed right after each optimizer step: a forward never holds the previous step's
    gradients beside its activations (Lightning alone zeroes them only after the next forward)."""
    import lightning as L

    from synpref.data import SmolTalkDataModule

    held = []

    class Probe(SFTModule):
        def training_step(self, batch, batch_idx):
            held.append(sum(p.grad is not None for p in self.model.parameters()))
            return super().training_step(batch, batch_idx)

    module = Probe(ModelSpec(tiny_model, dtype="float32"), lr=1e-2)
    data = SmolTalkDataModule(
        tiny_model, path=str(sample_dir / "sft_messages.jsonl"), max_rows=12, max_length=128, batch_size=4
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert held == [0, 0, 0]
    trained = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # The steps still trained: the weights moved away from the initial ones.
    assert not torch.equal(trained.get_input_embeddings().weight, module.model.get_input_embeddings().weight)
