"""Preference pairs (UltraFeedback, openbmb, synpref's synthetic pairs, any TRL file), mixed by weight."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Optional

import datasets
import torch

from synpref.core.batching import pad
from synpref.core.chat import IGNORE_INDEX, chat_messages, encode_prompt_response
from synpref.core.errors import FieldError
from synpref.data.base import TokenizedDataModule
from synpref.data.io import Dropped, require

Format = Literal["ultrafeedback_binarized", "openbmb", "synpref", "trl"]
COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "length"]


@dataclass
class PreferenceSource:
    """One source of pairs.

    Args:
        path: hub dataset id or local jsonl/parquet file or folder.
        split: hub split (`train_prefs` for HuggingFaceH4/ultrafeedback_binarized); ignored for files.
        format: row layout:
            `ultrafeedback_binarized`: `chosen`/`rejected` full conversations (the prompt is all but
            their last message), `score_chosen`/`score_rejected`.
            `openbmb`: openbmb/UltraFeedback's `instruction` + 4 `completions` with `overall_score`,
            binarized as HuggingFaceH4 did: chosen = highest `overall_score` (first on ties),
            rejected = one of the other completions drawn at random (seeded by `seed` and the
            instruction), or the lowest-scored with `binarize: lowest`.
            `synpref`: `synpref predict`'s pairs.jsonl: `prompt` messages, one-message `chosen`/
            `rejected` lists, `score_chosen`/`score_rejected`.
            `trl`: TRL's preference format: `prompt`/`chosen`/`rejected` as plain strings or
            conversational lists, or implicit prompt (full conversations sharing all but the last turn).
        config_name: hub dataset config.
        weight: share of this source's usable pairs in the mixture: 1.0 = all once, 0.5 = a seeded
            random half, 2.0 = each twice.
        max_rows: read only the first rows (before filtering).
        binarize: openbmb rejected choice: `random` (HuggingFaceH4's rule) or `lowest`.
    """

    path: str
    format: Format = "trl"
    split: str = "train"
    config_name: Optional[str] = None
    weight: float = 1.0
    max_rows: Optional[int] = None
    binarize: Literal["random", "lowest"] = "random"


def _as_messages(value, field: str, role: str) -> list[dict]:
    """A plain string becomes one `role` message; a list is checked as a conversation."""
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, "empty content")
        return [{"role": role, "content": value}]
    return chat_messages(value, field, need_assistant=False)


def _split_pair(prompt, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) from full conversations or prompt + replies."""
    if prompt is None:
        # Implicit prompt: every turn before the final assistant reply.
        prompt, c_prompt = chosen[:-1], chosen[:-1]
        r_prompt = rejected[:-1]
        if c_prompt != r_prompt:
            raise FieldError("rejected", "conversation before the last turn differs from chosen's (different prompts)")
    elif len(chosen) > 1 or len(rejected) > 1:
        # Full conversations next to an explicit prompt (UltraFeedback repeats the prompt in both).
        if chosen[:-1] and chosen[:-1] != prompt:
            raise FieldError("chosen", "conversation before the reply differs from the prompt")
        if rejected[:-1] and rejected[:-1] != prompt:
            raise FieldError("rejected", "conversation before the reply differs from the prompt (different prompts)")
    if not prompt:
        raise FieldError("prompt", "missing or empty")
    for field, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise FieldError(field, "last message is not an assistant reply")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise FieldError("rejected", "identical to chosen")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _binarize_openbmb(row: dict, rule: str, seed: int) -> dict:
    require(row, ["instruction", "completions"])
    done = [
        c
        for c in row["completions"]
        if isinstance(c, dict) and c.get("response") and c.get("overall_score") is not None
    ]
    if len(done) < 2:
        raise FieldError("completions", "fewer than two scored completions")
    best = max(range(len(done)), key=lambda i: (done[i]["overall_score"], -i))
    others = [c for i, c in enumerate(done) if i != best]
    if rule == "lowest":
        worst = min(others, key=lambda c: c["overall_score"])
    else:
        worst = random.Random(f"{seed}:{row['instruction']}").choice(others)
    return {
        "prompt": row["instruction"],
        "chosen": done[best]["response"],
        "rejected": worst["response"],
        "score_chosen": done[best]["overall_score"],
        "score_rejected": worst["overall_score"],
    }


def to_pair(
    row: dict, fmt: str, binarize: str = "random", seed: int = 0
) -> tuple[list[dict], str, str, Optional[float], Optional[float]]:
    """(prompt messages, chosen text, rejected text, score_chosen, score_rejected) of a raw row."""
    if fmt == "openbmb":
        row = _binarize_openbmb(row, binarize, seed)
    require(row, ["chosen", "rejected"])
    prompt = row.get("prompt")
    if fmt == "ultrafeedback_binarized":
        prompt = None  # its `prompt` string is the first user turn; the conversations carry it
    elif prompt is not None:
        prompt = _as_messages(prompt, "prompt", "user")
    chosen = _as_messages(row["chosen"], "chosen", "assistant")
    rejected = _as_messages(row["rejected"], "rejected", "assistant")
    prompt, c, r = _split_pair(prompt, chosen, rejected)
    return prompt, c, r, row.get("score_chosen"), row.get("score_rejected")


class PreferenceDataModule(TokenizedDataModule):
    """Tokenized pairs (prompt_ids, chosen_ids, rejected_ids, index) from one or more `sources`.

    Tokens come from `encode_prompt_response`, as for SFT and sampling. `prompt + response` is cut
    to its first `max_length` tokens (TRL's `keep_start`); a pair left with no chosen or rejected
    token is dropped and counted (`truncated`). Ties (equal scores) are dropped and counted unless
    `drop_ties: false`. Bad rows raise a DataError (file, row, field), or with `on_bad_row: skip`
    are counted. Every kept pair has a stable `index` (its row in the mixture) that keys cached
    reference log-probs. Validation: `val_sources`, else a `val_fraction` of the training pairs.
    """

    numbered = True

    def __init__(
        self,
        tokenizer_name_or_path: str,
        sources: list[PreferenceSource],
        val_sources: Optional[list[PreferenceSource]] = None,
        max_length: int = 1024,
        drop_ties: bool = True,
        **loader,
    ):
        """`loader`: TokenizedDataModule's settings (batch_size, val_fraction, on_bad_row, seed, ...)."""
        super().__init__(tokenizer_name_or_path, **loader)
        self.save_hyperparameters(logger=False)  # MLflow params: the module's run_params()
        self.keep_sources(PreferenceSource, sources, val_sources)
        self.max_length, self.drop_ties = max_length, drop_ties

    # -- one row -------------------------------------------------------------------------------
    def to_pair(
        self, row: dict, fmt: str, binarize: str = "random"
    ) -> tuple[list[dict], str, str, Optional[float], Optional[float]]:
        return to_pair(row, fmt, binarize, self.seed)

    def encode(self, row: dict, fmt: str, binarize: str = "random") -> dict:
        prompt, chosen, rejected, s_c, s_r = self.to_pair(row, fmt, binarize)
        if self.drop_ties and s_c is not None and s_r is not None and s_c == s_r:
            raise Dropped("tie")
        prompt_ids, chosen_ids = encode_prompt_response(self.tokenizer, prompt, chosen)
        prompt_ids_r, rejected_ids = encode_prompt_response(self.tokenizer, prompt, rejected)
        if prompt_ids_r != prompt_ids:
            raise FieldError("rejected", "prompt tokenizes differently from chosen's")
        room = self.max_length - len(prompt_ids)
        if room <= 0:
            raise Dropped("truncated")
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)),
        }

    # -- data sets -----------------------------------------------------------------------------
    def prepare(self, split: str) -> Optional[datasets.Dataset]:
        sources = self.sources if split == "train" else self.val_sources
        if not sources:
            return None
        encode = lambda row, src: self.encode(row, src.format, src.binarize)  # noqa: E731
        return self.mix(sources, split, encode, COLUMNS, "preference pairs")

    def data_inputs(self) -> list[dict]:
        """What it reads, as MLflow dataset inputs (synpref.core.lineage.log_lineage)."""
        groups = (("training", self.sources), ("validation", self.val_sources))
        return [
            {"path": s.path, "context": context, "split": s.split, "config_name": s.config_name}
            for context, sources in groups
            for s in sources
        ]

    def collate(self, rows: list[dict]) -> dict:
        """Chosen sequences then rejected ones, right-padded together: one forward for both."""
        seqs, labels = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                seqs.append(r["prompt_ids"] + r[key])
                labels.append([IGNORE_INDEX] * len(r["prompt_ids"]) + r[key])
        return {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),
            "labels": pad(labels, IGNORE_INDEX),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        }
