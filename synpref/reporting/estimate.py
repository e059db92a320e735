"""Expected peak memory of an SFT or DPO step, from bytes per parameter and bytes per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from synpref.core.errors import ConfigError

# Calibration (benchmarks/memory_calibration.py, CPU peak RSS, fp32, AdamW, no gradient checkpointing):
# RUNTIME is the resident size of a process with torch, transformers and lightning imported and no
# model; ACTIVATION_SCALE multiplies the per-token count of saved activations below. See
# docs/benchmarks.md ("Memory planner") for the runs the constants come from and the residuals.
RUNTIME_BYTES = 0.53e9
ACTIVATION_SCALE = 1.0
LOGIT_COPIES = 3  # a chunk's logits, its softmax/log-softmax and the gradient buffer coexist
# Optimizer state per trained parameter: AdamW's two fp32 moments, two bf16 ones, two 8-bit ones
# (blockwise scales add ~1%, left out).
OPTIM_STATE_BYTES = {"adamw": 8, "adamw_bf16": 4, "adamw_8bit": 2}
STRATEGIES = ("ddp", "fsdp")


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


def lora_params(shape: Shape, r: int) -> int:
    """Adapter parameters of rank-r LoRA on every linear layer of the blocks (`all-linear`):
    r·(inputs + outputs) for q, k, v, o, gate, up and down."""
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    return r * shape.layers * (9 * h + 2 * kv + 3 * i)


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
    recompute_attention: bool = False,
    lora_r: Optional[int] = None,
    optim: str = "adamw",
    gpus: int = 1,
    strategy: str = "ddp",
) -> dict[str, float]:
    """The terms of the expected peak of one training step on one GPU (or the CPU), in bytes.

    params: weights 4 + AdamW moments 8 bytes per parameter (+ 2 for the bf16 weight copies autocast
    keeps during a forward); a live DPO reference adds 4 per parameter (2 in bf16).
    gradients: 4 bytes per parameter; stepped in the backward, only the embedding's (tied to the LM head,
    complete at the very end of the backward) is held whole.
    activations: per token and layer, the tensors autograd saves in a Qwen2/Llama block (eager SDPA,
    repeated k/v), about 12·hidden + 2·kv + 4·intermediate values, 4 bytes each (2 under bf16 autocast);
    tokens = batch × max_length, doubled for DPO (chosen and rejected): the padded worst case. With
    gradient checkpointing: each layer's fp32 input and attention output (not with `recompute_attention`),
    plus one layer's saved tensors while it recomputes.
    logits: LOGIT_COPIES × (chunk or every labelled position) × vocab × 4 bytes.

    `optim` sets the state bytes per trained parameter (OPTIM_STATE_BYTES). With `lora_r`, only the
    adapters train (weights, gradients and state of lora_params); the base is frozen in its load
    dtype (`bf16`: loaded in bf16, no autocast copies) and is also the DPO reference (adapters off),
    so no reference is held. With `gpus` > 1 every term is per GPU and `batch_size` is per GPU: DDP
    holds everything one GPU does plus a gradient bucket copy of what trains; FSDP shards the
    weights, gradients and optimizer state of what trains (the whole model, or with LoRA only the
    adapters, the frozen base staying whole; a live DPO reference stays whole too, as DPOModule holds
    it outside the wrapped module), and gathers one unit (a block, or the embedding) at a time in
    the compute dtype, with the next prefetched.
    """
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    tokens = batch_size * max_length * (2 if stage == "dpo" else 1)
    live_ref = stage == "dpo" and not precompute_ref_logps and not lora_r
    shards = gpus if strategy == "fsdp" else 1
    state = OPTIM_STATE_BYTES[optim]
    if lora_r:
        trained = lora_params(shape, lora_r)
        params = (2 if bf16 else 4) * shape.params + (4 + state) * trained / shards
    else:
        trained = shape.params
        reference = (2 if ref_bf16 else 4) if live_ref else 0
        # The frozen reference is not wrapped by FSDP (it lives outside the module's parameters): whole.
        params = (4 + state) * shape.params / shards + reference * shape.params
        params += 0 if shards > 1 else (2 if bf16 else 0) * shape.params  # autocast's bf16 weight copies
    per_token_layer = 12 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate
    saved_layers = 1 if gradient_checkpointing else shape.layers
    activations = ACTIVATION_SCALE * tokens * saved_layers * per_token_layer * (2 if bf16 else 4)
    if gradient_checkpointing:
        # Each layer's fp32 input, and its attention output unless that is recomputed too
        # (synpref.core.checkpointing; the log-sum-exp, 4 bytes per head, is left out).
        kept = 4 + (0 if recompute_attention else (2 if bf16 else 4))
        activations += tokens * shape.layers * shape.hidden * kept
    labelled = max(1, int(tokens * response_fraction))
    rows = min(chunk, labelled) if chunk else labelled
    if optimizer_in_backward and not lora_r:
        gradients = 4 * shape.vocab * shape.hidden
    else:
        gradients = 4 * trained / shards + (4 * trained if gpus > 1 and strategy == "ddp" else 0)
    terms = {
        "runtime": RUNTIME_BYTES,
        "params": params,
        "gradients": gradients,
        "activations": activations,
        "logits": LOGIT_COPIES * rows * shape.vocab * 4,
    }
    if shards > 1 and not lora_r:  # the unit being computed and the one prefetched, unsharded
        unit = max(shape.vocab * shape.hidden, (shape.params - shape.vocab * shape.hidden) // shape.layers)
        terms["gathered"] = 2 * unit * (2 if bf16 else 4)
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
    recompute_attention: bool = False,
    lora: Optional[int] = None,
    optim: str = "adamw",
    gpus: int = 1,
    strategy: str = "ddp",
) -> dict:
    """Print the expected peak memory of one SFT or DPO training step, per GPU (fp32 master weights).

    Built from bytes per parameter and per token (synpref.reporting.estimate; calibration in docs/benchmarks.md).

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
        recompute_attention: with checkpointing, recompute attention too instead of keeping its output.
        lora: train rank-`lora` adapters on every linear layer (`lora: {r: ...}`) instead of every
            weight; with --bf16 the frozen base is loaded in bf16 (`policy.dtype: bfloat16`).
        optim: adamw (fp32 moments), adamw_bf16 or adamw_8bit.
        gpus: GPUs the step is spread over (batch_size is per GPU).
        strategy: ddp (every GPU holds the model) or fsdp (weights, gradients and optimizer state
            of what trains are sharded).
    """
    from transformers import AutoConfig, Qwen2Config

    from synpref.presets import PRESETS

    check_arguments(stage, preset, model, max_length, batch_size, chunk, response_fraction)
    check_plan(lora, optim, gpus, strategy)
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
        "recompute_attention": recompute_attention and gradient_checkpointing,
    }
    plan = {"lora_r": lora, "optim": optim, "gpus": gpus, "strategy": strategy}
    terms = peak_bytes(
        shape, stage, batch_size, max_length, precompute_ref_logps, chunk, response_fraction, **settings, **plan
    )
    where = f", per GPU of {gpus} ({strategy})" if gpus > 1 else ""
    trains = f", LoRA r={lora} ({lora_params(shape, lora) / 1e6:.1f}M trained)" if lora else ""
    print(
        f"{stage} step{where}, {shape.params / 1e6:.0f}M parameters{trains}, {optim}, batch {batch_size} x {max_length} tokens"
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


def check_plan(lora: Optional[int], optim: str, gpus: int, strategy: str) -> None:
    """A ConfigError naming the first of the planning arguments that cannot be."""
    for key, value, ok, expected in (
        ("lora", lora, lora is None or lora >= 1, "a rank ≥ 1"),
        ("optim", optim, optim in OPTIM_STATE_BYTES, f"one of {', '.join(OPTIM_STATE_BYTES)}"),
        ("gpus", gpus, gpus >= 1, "≥ 1"),
        ("strategy", strategy, strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    ):
        if not ok:
            raise ConfigError(key, f"must be {expected}, got {value!r}")
