"""Expected peak memory of an SFT or DPO step, from bytes per parameter and bytes per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from synpref.errors import ConfigError

# Calibration (benchmarks/memory_calibration.py, CPU peak RSS, fp32, AdamW, no gradient checkpointing):
# RUNTIME is the resident size of a process with torch, transformers and lightning imported and no
# model; ACTIVATION_SCALE multiplies the per-token count of saved activations below. See
# docs/benchmarks.md ("Memory planner") for the runs the constants come from and the residuals.
RUNTIME_BYTES = 0.53e9
ACTIVATION_SCALE = 1.0
LOGIT_COPIES = 3  # a chunk's logits, its softmax/log-softmax and the gradient buffer coexist


@dataclass
class Shape:
    params: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int

    @classmethod
    def from_config(cls, c) -> "Shape":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads * head_dim
        layer = (
            c.hidden_size * (c.hidden_size + 2 * kv)
            + c.hidden_size
            + 2 * kv
            + c.hidden_size**2
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
        )
        embed = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
        return cls(
            c.num_hidden_layers * layer + c.hidden_size + embed,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            kv,
        )


def peak_bytes(
    shape: Shape,
    stage: str,
    batch_size: int,
    max_length: int,
    precompute_ref_logps: bool = False,
    chunk: Optional[int] = 256,
    response_fraction: float = 0.5,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    optimizer_in_backward: bool = False,
    ref_bf16: bool = False,
) -> dict[str, float]:
    """The terms of the expected peak of one training step (fp32 master weights), in bytes.

    params: weights 4 + AdamW moments 8 bytes per parameter (+ 2 for the bf16 weight copies autocast
    keeps during a forward); a live DPO reference adds 4 per parameter (2 in bf16).
    gradients: 4 bytes per parameter; stepped in the backward, only the embedding's (tied to the LM head,
    complete at the very end of the backward) is held whole.
    activations: per token and layer, the tensors autograd saves in a Qwen2/Llama block (eager SDPA,
    repeated k/v), about 12·hidden + 2·kv + 4·intermediate values, 4 bytes each (2 under bf16 autocast);
    tokens = batch × max_length, doubled for DPO (chosen and rejected): the padded worst case. With
    gradient checkpointing: each layer's fp32 input, plus one layer's saved tensors while it recomputes.
    logits: LOGIT_COPIES × (chunk or every labelled position) × vocab × 4 bytes.
    """
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    tokens = batch_size * max_length * (2 if stage == "dpo" else 1)
    live_ref = stage == "dpo" and not precompute_ref_logps
    per_param = 12 + (2 if bf16 else 0) + ((2 if ref_bf16 else 4) if live_ref else 0)
    per_token_layer = 12 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate
    saved_layers = 1 if gradient_checkpointing else shape.layers
    activations = ACTIVATION_SCALE * tokens * saved_layers * per_token_layer * (2 if bf16 else 4)
    if gradient_checkpointing:
        activations += tokens * shape.layers * shape.hidden * 4
    labelled = max(1, int(tokens * response_fraction))
    rows = min(chunk, labelled) if chunk else labelled
    terms = {
        "runtime": RUNTIME_BYTES,
        "params": per_param * shape.params,
        "gradients": 4 * (shape.vocab * shape.hidden if optimizer_in_backward else shape.params),
        "activations": activations,
        "logits": LOGIT_COPIES * rows * shape.vocab * 4,
    }
    terms["total"] = sum(terms.values())
    return terms


# -- the `synpref estimate` command ----------------------------------------------------------------
def estimate(
    stage: str = "dpo",
    preset: Optional[str] = None,
    model: Optional[str] = None,
    max_length: int = 1024,
    batch_size: int = 8,
    precompute_ref_logps: bool = False,
    chunk: int = 256,
    response_fraction: float = 0.5,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    optimizer_in_backward: bool = False,
    ref_bf16: bool = False,
) -> dict:
    """Print the expected peak memory of one SFT or DPO training step (fp32 master weights, AdamW).

    Built from bytes per parameter and per token (synpref.estimate; calibration in docs/benchmarks.md).

    Args:
        stage: sft or dpo.
        preset: a synpref.presets preset (tiny, qwen-vocab-small, qwen-vocab-100m, qwen2.5-0.5b).
        model: an HF model directory or hub id (its config.json is read), instead of a preset.
        max_length: tokens per sequence (every sequence is assumed this long: the padded worst case).
        batch_size: sequences per step (pairs for DPO).
        precompute_ref_logps: DPO without a reference model in memory.
        chunk: logits_chunk_size (0: the LM head over every labelled position at once).
        response_fraction: share of the tokens that are labelled (matters only when chunk is 0).
        bf16: bf16 autocast over fp32 weights.
        gradient_checkpointing: recompute each layer's activations in the backward.
        optimizer_in_backward: step each parameter as its gradient completes (CausalLMModule's setting).
        ref_bf16: the frozen DPO reference held in bf16 (`ref_model.dtype: bfloat16`).
    """
    from transformers import AutoConfig, Qwen2Config

    from synpref.presets import PRESETS

    check_arguments(stage, preset, model, max_length, batch_size, chunk, response_fraction)
    if preset is not None:
        tiny = {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        config = Qwen2Config(**{"tie_word_embeddings": True, **(PRESETS[preset] or tiny)})
    else:
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            problem = " ".join(str(e).split())[:200]
            raise ConfigError(
                "model", f"no model config at {model!r} ({problem}); give an HF model directory or hub id"
            ) from e
    shape = Shape.from_config(config)
    settings = {
        "bf16": bf16,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer_in_backward": optimizer_in_backward,
        "ref_bf16": ref_bf16 and stage == "dpo" and not precompute_ref_logps,
    }
    terms = peak_bytes(shape, stage, batch_size, max_length, precompute_ref_logps, chunk, response_fraction, **settings)
    print(
        f"{stage} step, {shape.params / 1e6:.0f}M parameters, batch {batch_size} x {max_length} tokens"
        f"{', precomputed reference' if precompute_ref_logps and stage == 'dpo' else ''}, chunk {chunk or 'off'}"
        + "".join(f", {k}" for k, on in settings.items() if on)
        + ":"
    )
    for name, value in terms.items():
        print(f"  {name:12s}{value / 1e9:8.2f} GB")
    return {k: round(v / 1e9, 3) for k, v in terms.items()}


def check_arguments(stage, preset, model, max_length, batch_size, chunk, response_fraction) -> None:
    """A ConfigError naming the first argument that cannot describe a training step."""
    from synpref.presets import PRESETS

    if (preset is None) == (model is None):
        raise ConfigError("preset", "give exactly one of --preset or --model")
    if preset is not None and preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if stage not in ("sft", "dpo"):
        raise ConfigError("stage", f"unknown stage {stage!r}; choose sft or dpo")
    for key, value, least in (("max_length", max_length, 1), ("batch_size", batch_size, 1), ("chunk", chunk, 0)):
        if value < least:
            raise ConfigError(key, f"must be ≥ {least}, got {value}")
    if not 0 < response_fraction <= 1:
        raise ConfigError("response_fraction", f"must be in (0, 1], got {response_fraction}")
