"""Load HF models and tokenizers by hub name or directory (building random ones: synpref.presets)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from synpref.core.errors import ConfigError, SynprefError
from synpref.core.specs import ModelSpec

log = logging.getLogger(__name__)

# ChatML, as Qwen2.5 writes it (without the default system prompt, so a conversation's tokens are
# exactly its messages). Used only where a tokenizer ships no template of its own (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"
TINY_BASE = "artifacts/tiny/base"  # where `synpref build-tiny` writes the tiny model by default


def resolve_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    """'bfloat16' -> torch.bfloat16; None or 'auto' leaves the choice to transformers."""
    if dtype in (None, "auto"):
        return None
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ConfigError("dtype", f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return getattr(torch, dtype)


class ModelPathError(SynprefError):
    """A model path that is neither an HF model directory nor a reachable hub id."""


def model_path_error(name_or_path: str, cause: BaseException) -> ModelPathError:
    """What is wrong with the path, and the command that creates it."""
    path, cause = Path(name_or_path).expanduser(), " ".join(str(cause).split())
    if path.is_dir():
        problem = f"model directory {name_or_path} holds no HF model/tokenizer ({cause})"
    elif re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name_or_path):  # could be a hub id: say why it failed
        problem = f"{name_or_path} is not a local directory and could not be loaded from the hub ({cause})"
    else:
        problem = f"model directory {name_or_path} does not exist (resolved: {path.resolve()})"
    return ModelPathError(f"{problem}; {creator_hint(name_or_path)}")


def creator_hint(name_or_path: str) -> str:
    """How the user gets this model: `synpref build-tiny`, or the configs/ stage that exports it."""
    import yaml

    target = Path(name_or_path).as_posix().rstrip("/")
    if target == TINY_BASE:
        return "build it with `synpref build-tiny`"
    for config in sorted(Path("configs").rglob("*.yaml")):
        try:
            tree = yaml.safe_load(config.read_text()) or {}
            exported = tree.get("export", {}).get("dirpath")
        except (yaml.YAMLError, OSError, AttributeError):
            continue
        if exported and Path(exported).as_posix().rstrip("/") == target:
            # An arm file (dpo_synthetic.yaml) sets only its data: it is composed over its base (dpo.yaml).
            base = config.with_name(config.stem.split("_")[0] + ".yaml")
            files = [base, config] if "model" not in tree and base.exists() else [config]
            command = " ".join(f"--config {f.as_posix()}" for f in files)
            return f"it is the export of `synpref fit {command}`: run that stage first"
    return (
        "give an HF model directory or hub id; synpref writes one with `synpref fit` (its export.dirpath) "
        "or `synpref build-tiny --out DIR`"
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer ready for chat training: a chat template, a pad token, right padding."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:  # transformers' word for "no such directory or hub repo", among others
        raise model_path_error(name_or_path, e) from e
    if tok.chat_template is None:
        # Base checkpoints (Qwen2.5-0.5B among them) may ship no template; ChatML is what their
        # instruct siblings use, so the SFT export speaks the same format.
        log.warning("%s ships no chat template: using ChatML (<|im_start|>role\\n...<|im_end|>)", name_or_path)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def check_same_tokenizer(
    tokenizer: PreTrainedTokenizerBase, path: str, other: PreTrainedTokenizerBase, other_path: str
) -> None:
    """ConfigError naming both paths unless the two tokenizers map the same text to the same ids
    (same vocabulary, same special tokens): a policy and its reference score the same token ids."""
    problems = []
    vocab, other_vocab = tokenizer.get_vocab(), other.get_vocab()
    if vocab != other_vocab:
        differ = sorted(set(vocab.items()) ^ set(other_vocab.items()), key=lambda kv: kv[1])[:3]
        problems.append(f"vocabularies differ ({len(vocab)} vs {len(other_vocab)} tokens; e.g. {differ})")
    specials, other_specials = tokenizer.special_tokens_map, other.special_tokens_map
    if specials != other_specials:
        problems.append(f"special tokens differ ({specials} vs {other_specials})")
    if problems:
        raise ConfigError(
            "model.init_args.ref_model.name_or_path",
            f"the tokenizers of {path} and {other_path} differ: {'; '.join(problems)}; "
            "the reference must share the policy's tokenizer (usually: the SFT export it starts from)",
        )


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: the eos token and ChatML's <|im_end|> if present."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def load_causal_lm(
    name_or_path: str,
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
) -> torch.nn.Module:
    """Any HF causal LM by hub name or local directory, the one path real and tiny models share."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if resolve_dtype(dtype) is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # e.g. a directory with a tokenizer and config but no weights
        raise model_path_error(name_or_path, e) from e


def load_frozen_causal_lm(spec: ModelSpec) -> torch.nn.Module:
    """A causal LM for inference only (eval mode, no gradients): a reference, baseline or sampler."""
    model = load_causal_lm(spec.name_or_path, spec.dtype, spec.trust_remote_code, spec.attn_implementation).eval()
    model.requires_grad_(False)
    return model
