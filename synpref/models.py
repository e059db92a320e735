"""Load HF models and tokenizers by hub name or directory, and build the tiny offline model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from synpref.errors import ConfigError, SynprefError
from synpref.resources import resolve

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
            "model.init_args.ref_model_name_or_path",
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


def load_frozen_causal_lm(
    name_or_path: str,
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
) -> torch.nn.Module:
    """A causal LM for inference only (eval mode, no gradients): a reference, baseline or sampler."""
    model = load_causal_lm(name_or_path, dtype, trust_remote_code, attn_implementation).eval()
    model.requires_grad_(False)
    return model


def _corpus_from_jsonl(paths: Iterable[str | Path]) -> Iterable[str]:
    """Every message text of jsonl files (OpenAI or sharegpt turns, prompts); a DataError names a
    missing, non-UTF-8 or non-JSON file and row."""
    from synpref.chat import DataError
    from synpref.data.io import check_json_file

    for path in paths:
        local = Path(resolve(path))
        if not local.is_file():
            raise DataError(
                str(path),
                None,
                "path",
                f"corpus file does not exist (resolved: {local.resolve()}); "
                "give jsonl files with messages, e.g. synpref://sample/sft_messages.jsonl",
            )
        check_json_file(local)
        with open(local, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                row = json.loads(line)
                for key in ("messages", "conversations", "chosen", "rejected"):
                    for message in row.get(key) or []:
                        text = message.get("content", message.get("value")) if isinstance(message, dict) else None
                        if isinstance(text, str):
                            yield text
                if isinstance(row.get("prompt"), str):
                    yield row["prompt"]


def train_chat_tokenizer(
    corpus: Iterable[str | Path], bpe_size: int, total_size: Optional[int] = None, max_length: int = 2048
) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on local jsonl text (ChatML specials, template), `bpe_size` tokens.

    With `total_size`, the vocabulary is filled up to that many ids with filler words (" a", " b", ...,
    " zzq") that no merge produces: encoding is the small BPE's, yet every id a large-vocabulary model
    can sample decodes to text, as with a real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus_from_jsonl(corpus), trainer=trainer)
    if total_size is not None and total_size > bpe.get_vocab_size():
        spec = json.loads(bpe.to_str())
        vocab, k = spec["model"]["vocab"], 0
        while len(vocab) < total_size:
            word, n = "", k
            while True:  # k in base 26, letters: a, b, ..., z, ba, bb, ...
                word, n = chr(97 + n % 26) + word, n // 26
                if not n:
                    break
            vocab.setdefault("\u0120" + word, len(vocab))  # \u0120 = byte-level space
            k += 1
        bpe = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_length,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def save_random_qwen2(out: Path, tok: PreTrainedTokenizerBase, seed: int = 0, dtype: str = "float32", **config) -> Path:
    """A randomly initialised Qwen2ForCausalLM with `config` (and the tokenizer) saved as an HF directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen2Config(
        **{"tie_word_embeddings": True, **config},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).to(resolve_dtype(dtype))
    model.generation_config.eos_token_id = end_of_turn_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("built random Qwen2 model (%d params, %s) at %s", model.num_parameters(), dtype, out)
    return out


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str | Path],
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 192,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer on local jsonl text and save a random Qwen2 model beside it.

    The result is an ordinary HF directory (config.json, model.safetensors, tokenizer.json with a
    ChatML template) that `load_causal_lm`/`load_tokenizer` open like any hub checkpoint.
    """
    for key, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if value < 1:
            raise ConfigError(key, f"must be ≥ 1, got {value}")
    if hidden_size % num_heads:
        raise ConfigError("hidden_size", f"must be a multiple of the {num_heads} attention heads, got {hidden_size}")
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        log.info("tiny model already at %s", out)
        return out
    tok = train_chat_tokenizer(corpus, vocab_size, max_length=max_position_embeddings)
    return save_random_qwen2(
        out,
        tok,
        seed,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )


QWEN_VOCAB = 151_936
_QWEN = {"vocab_size": QWEN_VOCAB, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
# name -> Qwen2 config. Real-vocabulary presets keep Qwen2.5's 151,936-id LM head, which is what a
# step costs at this size; their tokenizer is the tiny BPE filled up to that many ids.
PRESETS: dict[str, dict] = {
    "tiny": {},  # build_tiny_model's own defaults: 2,048-token vocabulary, 230k parameters
    "qwen-vocab-small": {
        **_QWEN,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },  # 43M, 39M of them the embedding
    "qwen-vocab-100m": {
        **_QWEN,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },  # 100M
    "qwen2.5-0.5b": {
        **_QWEN,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },  # 494M, Qwen2.5-0.5B's config
    # The next two serve `synpref estimate` (building them writes 6 and 30 GB of random weights).
    "qwen2.5-1.5b": {
        **_QWEN,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
    },  # 1.54B
    "qwen2.5-7b": {
        **_QWEN,
        "vocab_size": 152_064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },  # 7.62B
}


def build_preset_model(
    preset: str, out_dir: str | Path, corpus: Iterable[str | Path] = (), seed: int = 0, dtype: str = "float32"
) -> Path:
    """A randomly initialised model with a preset's config (see PRESETS) at `out_dir` (kept if present)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    corpus = list(corpus) or ["synpref://sample/sft_messages.jsonl"]
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        log.info("model already at %s", out)
        return out
    if preset == "tiny":
        return build_tiny_model(out, corpus, seed=seed)
    config = PRESETS[preset]
    tok = train_chat_tokenizer(corpus, 2048, config["vocab_size"], max_length=config["max_position_embeddings"])
    return save_random_qwen2(out, tok, seed, dtype, **config)
