"""Batched chat generation with the KV cache: prompts (message lists) in, completions (text) out."""

from __future__ import annotations

from typing import Sequence

import torch

from synpref.core.batching import pad
from synpref.core.chat import encode_prompt
from synpref.core.models import end_of_turn_ids
from synpref.core.specs import Decoding


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    decoding: Decoding = Decoding(),
    num_return_sequences: int = 1,
) -> tuple[list[list[str]], list[list[int]]]:
    """`num_return_sequences` completions per prompt, as text and as generated-token counts.

    Prompts are left-padded into one batch and decoded with the KV cache; generation stops at the
    end of the assistant turn (<|im_end|> or eos); ids with no token are never sampled. `decoding.seed` seeds the sampling RNG for this
    call, so a batch gives the same completions whatever ran before it.
    """
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    input_ids = pad(ids, tokenizer.pad_token_id, left=True).to(model.device)
    attention_mask = pad([[1] * len(s) for s in ids], 0, left=True).to(model.device)
    torch.manual_seed(decoding.seed)
    d = decoding
    sampling = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p} if d.do_sample else {}
    # Embedding rows beyond the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens) are padding for
    # hardware-friendly shapes: no text maps to them, so they are never sampled.
    rows = model.get_output_embeddings().weight.shape[0]
    beyond = {"suppress_tokens": list(range(len(tokenizer), rows))} if rows > len(tokenizer) else {}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=d.max_new_tokens,
        do_sample=d.do_sample,
        num_return_sequences=num_return_sequences,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
        **beyond,
    )
    new = out[:, input_ids.shape[1] :]
    stop = torch.tensor(end_of_turn_ids(tokenizer), device=new.device)
    # Tokens up to (excluding) the first stop token; after it generate() only pads.
    is_stop = torch.isin(new, stop)
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(new[:, 0], new.shape[1]))
    texts = [
        tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new.tolist(), lengths.tolist())
    ]
    counts = lengths.tolist()
    k = num_return_sequences
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))], [
        counts[i * k : (i + 1) * k] for i in range(len(prompts))
    ]
