"""Local HF reward models: sequence-classification heads (Skywork) and causal LMs read like Nemotron-70B-Reward."""

from __future__ import annotations

import inspect
import json
from typing import Callable, Optional, Sequence

import torch

from synpref.core.batching import length_batches, pad
from synpref.core.chat import render
from synpref.core.fingerprints import model_digest
from synpref.core.models import load_tokenizer, resolve_dtype
from synpref.rewards.base import RewardScorer, check_lengths


class _LocalReward(RewardScorer):
    """Tokenizes (prompt + assistant reply) with the reward model's own chat template, the same
    path SFT and DPO use (synpref.core.chat), and scores length-grouped batches; the model loads lazily
    so building a config does not load weights.

    With `share_prefix` (decoder-only models), the K samples of one prompt are scored against a
    single forward pass of their common token prefix (the prompt): its key/value cache is reused by
    every sample, so the prompt is encoded once instead of K times. The prefix is found on the token
    ids themselves (longest common prefix), so any chat template and truncation is handled exactly.
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        dtype: Optional[str] = None,
        trust_remote_code: bool = False,
        share_prefix: bool = True,
    ):
        self.model_name_or_path, self.batch_size, self.max_length = model_name_or_path, batch_size, max_length
        self.dtype, self.trust_remote_code, self.share_prefix = dtype, trust_remote_code, share_prefix
        self.name = model_name_or_path
        self.device = torch.device("cpu")
        self._model = None
        self._tokenizer = None

    def _load(self, name_or_path: str, **kwargs) -> torch.nn.Module:
        raise NotImplementedError

    def _scores(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, model) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Last real token's hidden state -> reward, for prefix sharing; None where it does not apply."""
        return None

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

    def identity(self) -> str:
        return f"{self.name}@{model_digest(self.model_name_or_path)}"

    def to(self, device) -> "_LocalReward":
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def encode(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each conversation: synpref.core.chat's rendering (the ids encode_conversation gives),
        tokenized in one fast-tokenizer call, since no labels are needed here."""
        texts = [
            render(self.tokenizer, list(p) + [{"role": "assistant", "content": r}]) for p, r in zip(prompts, responses)
        ]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Keep the end of a long conversation: the reply (and its end-of-turn token) is what is judged.
        return [s[-self.max_length :] for s in ids] if self.max_length else ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        ids = self.encode(prompts, responses)
        out = [0.0] * len(ids)
        head = self._head(self.model) if self.share_prefix and is_causal(self.model) else None
        groups, alone = prefix_groups(prompts, ids) if head is not None else ([], list(range(len(ids))))
        if groups:
            self._score_shared(head, ids, groups, out)
        for batch in length_batches([len(ids[i]) for i in alone], self.batch_size):
            rows = [ids[alone[j]] for j in batch]
            input_ids, mask = self._pad(rows)
            scores = self._scores(self.model, input_ids.to(self.device), mask.to(self.device))
            for j, s in zip(batch, scores.float().tolist()):
                out[alone[j]] = s
        return out

    def _score_shared(self, head, ids: list[list[int]], groups: list[tuple[int, list[int]]], out: list[float]) -> None:
        """Per batch of groups: one causal pass over the right-padded prefixes (no mask needed: pads
        come after every real token), then one pass over all their suffixes on top of the cache,
        masked so each suffix sees only its own prefix's real tokens and itself."""
        base, dev = self.model.base_model, self.device
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        groups = sorted(groups, key=lambda g: (-g[0], g[1][0]))
        for batch in _group_batches(groups, self.batch_size):
            prefix_lens = [p for p, _ in batch]
            width = max(prefix_lens)
            prefixes = pad([ids[members[0]][:p] for p, members in batch], self.tokenizer.pad_token_id)
            first = base(input_ids=prefixes.to(dev), use_cache=True)
            cache = first[cache_arg] if cache_arg in first else first.past_key_values
            rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members]
            cache.batch_select_indices(torch.tensor([g for g, _ in rows], device=dev))
            suffixes = [ids[i][prefix_lens[g] :] for g, i in rows]
            lengths = torch.tensor([len(s) for s in suffixes])
            starts = torch.tensor([prefix_lens[g] for g, _ in rows])
            span = torch.arange(int(lengths.max()))
            mask = torch.cat([torch.arange(width)[None] < starts[:, None], span[None] < lengths[:, None]], 1)
            hidden = base(
                input_ids=pad(suffixes, self.tokenizer.pad_token_id).to(dev),
                attention_mask=mask.long().to(dev),
                position_ids=(starts[:, None] + span[None]).to(dev),
                **{cache_arg: cache},
            ).last_hidden_state
            scores = head(hidden[torch.arange(len(rows), device=dev), (lengths - 1).to(dev)])
            for (_, i), s in zip(rows, scores.float().tolist()):
                out[i] = s

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
        head = self._head(model) if is_causal(model) else None
        if head is not None:
            # Each row's last real token is found by the mask, as in the prefix-shared path, never
            # by the pad id: with pad = eos = the end-of-turn token (Llama-3-style templates), HF's
            # own head would take the trailing end-of-turn token for padding and read the one before.
            last = attention_mask.sum(1) - 1
            hidden = model.base_model(input_ids=input_ids).last_hidden_state
            return head(hidden[torch.arange(len(last), device=hidden.device), last.to(hidden.device)])
        if is_causal(model):
            # Rows are right-padded: under causal attention no real token attends to a pad, and the
            # head reads each row's last non-pad token, so the padding mask would change nothing but
            # the attention kernel (without it: the fused causal kernel, ~1.7x faster on CPU here).
            return model(input_ids=input_ids).logits[:, 0]
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    def _head(self, model):
        # The generic decoder classifier (Qwen, Llama, Mistral, Gemma ...ForSequenceClassification):
        # a bias-free `score` projection of the last real token; other heads take the plain path.
        score = getattr(model, "score", None)
        if not (type(model).__name__.endswith("ForSequenceClassification") and isinstance(score, torch.nn.Linear)):
            return None
        return lambda hidden: score(hidden)[:, 0]


def prefix_groups(
    prompts: Sequence[Sequence[dict]], ids: list[list[int]]
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Conversations of the same prompt, with the length of their common token prefix (at least one
    token short of the shortest, so every member keeps a token to read the score from); conversations
    with nothing to share come back on their own."""
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(json.dumps(list(prompt), sort_keys=True), []).append(i)
    groups, alone = [], []
    for members in by_prompt.values():
        first = ids[members[0]]
        common = min(len(ids[i]) for i in members) - 1
        for i in members[1:]:
            common = next((k for k in range(common) if ids[i][k] != first[k]), common)
        if len(members) > 1 and common > 0:
            groups.append((common, members))
        else:
            alone += members
    return groups, sorted(alone)


def _group_batches(groups: list[tuple[int, list[int]]], batch_size: int):
    """Consecutive groups holding about `batch_size` conversations (a group is never split)."""
    batch, rows = [], 0
    for group in groups:
        if batch and rows + len(group[1]) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group[1])
    if batch:
        yield batch


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
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        }
        head = self._head(model)
        if head is None:
            return model(**kwargs).logits[:, -1, 0]
        return head(model.base_model(**kwargs).last_hidden_state[:, -1])

    def _head(self, model):
        # Logit softcapping or scaling happens inside the model's own forward: no shortcut then.
        if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
            return None
        return lambda hidden: model.get_output_embeddings()(hidden)[:, 0]
