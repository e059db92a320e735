"""Chat-template tokenization and assistant-only loss masks: the one place messages become tokens."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

# DataError stays importable from here, where it was first defined; it lives with the errors.
from synpref.core.errors import DataError, FieldError  # noqa: F401

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# sharegpt turns ({"from", "value"}, as argilla, axolotl and LLaMA-Factory write them) -> our roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_messages(messages: Any, field: str = "messages", need_assistant: bool = True) -> list[dict]:
    """`messages` as checked {role, content} dicts; FieldError(field, problem) unless well formed.

    Each turn is OpenAI-style {role, content} or sharegpt-style {from, value} (roles mapped by
    SHAREGPT_ROLES).
    """
    if messages is None:
        raise FieldError(field, "missing")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FieldError(field, "expected a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"expected a {{role, content}} object, got {type(message).__name__}")
        if message.get("role") is None and message.get("from") is not None:
            role = SHAREGPT_ROLES.get(message["from"])
            if role is None:
                raise FieldError(
                    f"{where}.from",
                    f"unknown sharegpt role {message['from']!r}; expected one of {tuple(SHAREGPT_ROLES)}",
                )
            content_key = "value"
        else:
            role = message.get("role")
            if role not in ROLES:
                raise FieldError(f"{where}.role", f"unknown role {role!r}; expected one of {ROLES}")
            content_key = "content"
        content = message.get(content_key)
        if content is None:
            raise FieldError(f"{where}.{content_key}", "missing")
        if not isinstance(content, str):
            raise FieldError(
                f"{where}.{content_key}", f"expected a string, got {type(content).__name__} {content!r:.40}"
            )
        if not content.strip():
            raise FieldError(f"{where}.{content_key}", "empty content")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise FieldError(field, "no assistant turn")
    return out


def last_user_message(prompt: Any) -> str:
    """What a prompt asks, for a table cell: its last user message (a plain string as it is)."""
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt)


def conversation_field(row: dict) -> str:
    """The column holding a row's turns: `messages`, or `conversations` (sharegpt files) when only it is there."""
    return "conversations" if row.get("messages") is None and row.get("conversations") is not None else "messages"


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the character span the model must produce.

    A span runs from the end of the generation prompt to where the next turn starts: the content, the
    end-of-turn token (<|im_end|> in ChatML), so the model learns to stop, and the template's newline
    after it, as open-instruct's SFT masks and TRL's SFTTrainer (assistant_only_loss, prompt-completion)
    label them (docs/sft.md).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1]))
        if text[:end] != render(tokenizer, messages[: i + 1]):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((start, end))
    return text, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], max_length: Optional[int] = None
) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX on every system, user and template token).

    Truncation keeps the first `max_length` tokens (later turns are cut, as TRL does); the caller
    drops a conversation whose labels are then all IGNORE_INDEX.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[t] = input_ids[t]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[dict]) -> list[int]:
    """Token ids of a prompt conversation followed by the assistant generation prompt."""
    return tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: Sequence[dict], response: str
) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) for one assistant reply to `prompt`, split where the reply starts.

    The response ids are the reply's tokens, its end-of-turn token and the newline after it, located
    exactly as SFT labels are, so SFT, DPO, sampling and reward models all see a prompt as the same tokens.
    """
    enc = encode_conversation(tokenizer, list(prompt) + [{"role": "assistant", "content": response}])
    ids, labels = enc["input_ids"], enc["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first], ids[first : last + 1]
