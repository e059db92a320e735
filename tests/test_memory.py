"""Memory-saving training settings change where memory goes, never what a step computes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from synpref.core.errors import ConfigError
from synpref.core.specs import ModelSpec
from synpref.data import SmolTalkDataModule
from synpref.modules import SFTModule


class Probe(SFTModule):
    """Counts the gradients still held after each backward (Lightning's on_after_backward)."""

    held: list[int]

    def on_after_backward(self) -> None:
        self.held.append(sum(p.grad is not None for p in self.model.parameters()))


def fit(tiny_model, sample_dir, tmp_path, steps=3, **trainer_kwargs):
    def run(**module_kwargs):
        L.seed_everything(0, verbose=False)
        module = Probe(ModelSpec(tiny_model, dtype="float32"), lr=1e-2, warmup_steps=1, **module_kwargs)
        module.held = []
        data = SmolTalkDataModule(
            tiny_model, path=str(sample_dir / "sft_messages.jsonl"), max_rows=12, max_length=128, batch_size=4
        )
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **trainer_kwargs,
        )
        trainer.fit(module, datamodule=data)
        return module

    return run


def test_optimizer_in_backward_trains_the_same_weights_without_holding_gradients(tiny_model, sample_dir, tmp_path):
    run = fit(tiny_model, sample_dir, tmp_path)
    plain, in_backward = run(), run(optimizer_in_backward=True)
    n_params = sum(1 for p in plain.model.parameters() if p.requires_grad)
    # Plain AdamW holds every gradient after the backward; stepped in the backward, none is left.
    assert plain.held == [n_params] * 3
    assert in_backward.held == [0, 0, 0]
    for (name, a), b in zip(plain.model.named_parameters(), in_backward.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    # ... and the steps moved the weights (same updates, not none on both sides).
    assert not torch.equal(plain.model.get_input_embeddings().weight, _initial(tiny_model))


def _initial(tiny_model) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).get_input_embeddings().weight


@pytest.mark.parametrize(
    "trainer_kwargs, named",
    [({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"), ({"gradient_clip_val": 1.0}, "gradient_clip_val")],
)
def test_optimizer_in_backward_refuses_settings_that_need_every_gradient(
    tiny_model, sample_dir, tmp_path, trainer_kwargs, named
):
    run = fit(tiny_model, sample_dir, tmp_path, steps=1, **trainer_kwargs)
    with pytest.raises(ConfigError, match=f"optimizer_in_backward.*{named}"):
        run(optimizer_in_backward=True)
