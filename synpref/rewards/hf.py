"""Local HF reward models: sequence-classification heads (Skywork) and causal LMs read like Nemotron-70B-Reward."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from synpref.chat import render
from synpref.data.collate import pad
from synpref.models import load_tokenizer, resolve_dtype
from synpref.rewards.base import RewardScorer, check_lengths, length_batches


class _LocalReward(RewardScorer):
    """Tokenizes (prompt + assistant reply) with the reward model's own chat template, the same
    path SFT and DPO use (synpref.chat), and scores length-grouped batches; the model loads lazily
    so building a config does not load weights."""

    def __init__(self, model_name_or_path: str, batch_size: int = 8, max_length: Optional[int] = None,
                 dtype: Optional[str] = None, trust_remote_code: bool = False):
        self.model_name_or_path, self.batch_size, self.max_length = model_name_or_path, batch_size, max_length
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self.name = model_name_or_path
        self.device = torch.device("cpu")
        self._model = None
        self._tokenizer = None

    def _load(self, name_or_path: str, **kwargs) -> torch.nn.Module:
        raise NotImplementedError

    def _scores(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path, self.trust_remote_code)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            kwargs = {"trust_remote_code": self.trust_remote_code}
            if resolve_dtype(self.dtype) is not None:
                kwargs["dtype"] = resolve_dtype(self.dtype)
            self._model = self._load(self.model_name_or_path, **kwargs).to(self.device).eval()
        return self._model

    def to(self, device) -> "_LocalReward":
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def encode(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each conversation: synpref.chat's rendering (the ids encode_conversation gives),
        tokenized in one fast-tokenizer call, since no labels are needed here."""
        texts = [render(self.tokenizer, list(p) + [{"role": "assistant", "content": r}]) for p, r in zip(prompts, responses)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Keep the end of a long conversation: the reply (and its end-of-turn token) is what is judged.
        return [s[-self.max_length:] for s in ids] if self.max_length else ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        ids = self.encode(prompts, responses)
        out = [0.0] * len(ids)
        for batch in length_batches([len(s) for s in ids], self.batch_size):
            rows = [ids[i] for i in batch]
            input_ids, mask = self._pad(rows)
            scores = self._scores(self.model, input_ids.to(self.device), mask.to(self.device))
            for i, s in zip(batch, scores.float().tolist()):
                out[i] = s
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad(rows, self.tokenizer.pad_token_id), pad([[1] * len(r) for r in rows], 0)


class HFRewardModel(_LocalReward):
    """A sequence-classification reward model (e.g. Skywork/Skywork-Reward-V2-Qwen3-0.6B):
    score = `logits[0]` of the conversation, as its model card reads it (`logits[0][0]` per row).

    Args:
        model_name_or_path: hub id or local directory of an AutoModelForSequenceClassification.
        batch_size: conversations per forward pass (length-grouped).
        max_length: keep at most the last `max_length` tokens of a conversation (None: all).
        dtype: e.g. 'bfloat16' on GPU; None keeps the checkpoint's.
        trust_remote_code: allow custom model code from the hub.
    """

    def _load(self, name_or_path: str, **kwargs) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        if model.config.pad_token_id is None:
            # Batched classification locates each row's last real token through the pad id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _scores(self, model, input_ids, attention_mask):
        if is_causal(model):
            # Rows are right-padded: under causal attention no real token attends to a pad, and the
            # head reads each row's last non-pad token, so the padding mask would change nothing but
            # the attention kernel (without it: the fused causal kernel, ~1.7x faster on CPU here).
            return model(input_ids=input_ids).logits[:, 0]
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


def is_causal(model: torch.nn.Module) -> bool:
    """Decoder-only: every attention module says it is causal (Qwen, Llama); encoders (BERT) do not."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


class NemotronReward(_LocalReward):
    """A causal LM read the way nvidia/Llama-3.1-Nemotron-70B-Reward-HF is: generate one token after
    the conversation; the reward is that step's logit at vocabulary index 0.

    One greedy step's scores are the next-token logits at the last position, so this is a single
    forward pass (left-padded), with the LM head applied to the last position only.
    Arguments as HFRewardModel.
    """

    def _load(self, name_or_path: str, **kwargs) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)

    def _pad(self, rows):
        # Left padding puts every row's last token at position -1.
        return pad(rows, self.tokenizer.pad_token_id, left=True), pad([[1] * len(r) for r in rows], 0, left=True)

    def _scores(self, model, input_ids, attention_mask):
        # Positions count from each row's first real token, as generate() numbers left-padded rows.
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}
        if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
            return model(**kwargs).logits[:, -1, 0]
        hidden = model.base_model(**kwargs).last_hidden_state
        return model.get_output_embeddings()(hidden[:, -1])[:, 0]
