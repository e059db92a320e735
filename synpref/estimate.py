"""Expected peak memory of an SFT or DPO step, from bytes per parameter and bytes per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
) -> dict[str, float]:
    """The terms of the expected peak of one training step (fp32 master weights), in bytes.

    params: weights 4 + gradients 4 + AdamW moments 8 bytes per parameter (+ 2 for the bf16 weight
    copies autocast keeps during a forward); a live DPO reference adds 4 per parameter.
    activations: per token and layer, the tensors autograd saves in a Qwen2/Llama block (eager SDPA,
    repeated k/v), about 12·hidden + 2·kv + 4·intermediate values, 4 bytes each (2 under bf16 autocast);
    tokens = batch × max_length, doubled for DPO (chosen and rejected): the padded worst case.
    logits: LOGIT_COPIES × (chunk or every labelled position) × vocab × 4 bytes.
    """
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    tokens = batch_size * max_length * (2 if stage == "dpo" else 1)
    per_param = 16 + (2 if bf16 else 0) + (4 if stage == "dpo" and not precompute_ref_logps else 0)
    per_token_layer = 12 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate
    activations = ACTIVATION_SCALE * tokens * shape.layers * per_token_layer * (2 if bf16 else 4)
    labelled = max(1, int(tokens * response_fraction))
    rows = min(chunk, labelled) if chunk else labelled
    terms = {
        "runtime": RUNTIME_BYTES,
        "params": per_param * shape.params,
        "activations": activations,
        "logits": LOGIT_COPIES * rows * shape.vocab * 4,
    }
    terms["total"] = sum(terms.values())
    return terms
