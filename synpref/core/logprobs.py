"""Log-probs of labelled tokens with the LM head run over chunks of positions, never the full logits; per-sequence sums."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from synpref.core.chat import IGNORE_INDEX

# Rows of the weight gradient formed per matmul when it is accumulated in another dtype.
VOCAB_BLOCK = 16384


def labelled_hidden(model: torch.nn.Module, input_ids, attention_mask, labels):
    """Final hidden states at positions whose next token carries a label: (n, d), targets (n,), rows (n,).

    Prompt and padding positions never reach the loss, so they never reach the LM head.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding only: under causal attention no real token attends to a pad, and pads never
        # reach the loss, so the mask changes nothing but the kernel. Without it SDPA takes its fused
        # causal path, which never materialises the (batch, heads, length, length) weights.
        attention_mask = None
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    return hidden[:, :-1][keep], targets[keep], rows


def plain_head(model: torch.nn.Module) -> bool:
    """Whether logits are exactly `lm_head(hidden)`: no soft-capping or scaling (Gemma 2, Cohere)."""
    config = model.config
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and not getattr(config, "final_logit_softcapping", None)
        and not getattr(config, "logit_scale", None)
    )


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # The softmax runs in fp32 (never rounds a float64 model down).
    return logits if logits.dtype == torch.float64 else logits.float()


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] per row, `chunk` rows at a time; backward recomputes each chunk.

    Only (chunk, vocab) logits exist at any time, in forward and in backward. The gradient is exact:
    d logp / d logits = onehot(target) - softmax, times the incoming gradient of each row.
    `compute_dtype` is the matmul dtype (the autocast dtype under autocast, else the weight's).

    `frozen_head` (only the hidden states need a gradient, as under LoRA): each row's log-prob is a
    scalar, so its whole gradient is one vector, d logp / d h = (onehot(target) - softmax) W. The
    forward computes it from the logits it already holds and keeps it instead of `hidden`; the
    backward only scales it by the incoming gradient, with no second pass over the vocabulary (one
    of the head's three vocabulary-sized matmuls, and its softmax, saved).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, compute_dtype: torch.dtype, frozen_head: bool):
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are explicit
            if frozen_head:
                return ChunkedTokenLogps._forward_with_gradient(
                    ctx, hidden, weight, bias, targets, chunk, compute_dtype
                )
            return ChunkedTokenLogps._forward(ctx, hidden, weight, bias, targets, chunk, compute_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.frozen_head:
            (d_logp_d_hidden,) = ctx.saved_tensors
            grad_h = _upcast(d_logp_d_hidden) * grad_out[:, None].to(_upcast(d_logp_d_hidden[:0]).dtype)
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None
        with torch.autocast(grad_out.device.type, enabled=False):
            return ChunkedTokenLogps._backward(ctx, grad_out) + (None,)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, chunk, compute_dtype):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = torch.empty(hidden.shape[0], dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _upcast(F.linear(hidden[s : s + chunk].to(compute_dtype), w, b))
            out[s : s + chunk] = torch.log_softmax(logits, -1).gather(1, targets[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.compute_dtype, ctx.frozen_head = chunk, compute_dtype, False
        return out

    @staticmethod
    def _forward_with_gradient(ctx, hidden, weight, bias, targets, chunk, compute_dtype):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = torch.empty(hidden.shape[0], dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        # In the matmul's dtype, as the two-pass backward's product is: the same rounding, half the bytes
        # of an fp32 `hidden` under bf16 autocast.
        d_logp_d_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _upcast(F.linear(hidden[s : s + chunk].to(compute_dtype), w, b))
            t = targets[s : s + chunk, None]
            logp = torch.log_softmax(logits, -1)
            del logits
            out[s : s + chunk] = logp.gather(1, t).squeeze(1)
            # softmax - onehot(target), in place in the log-softmax's buffer; negated after the matmul,
            # on (chunk, hidden) values rather than (chunk, vocab).
            g = logp.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logp.dtype))
            d_logp_d_hidden[s : s + chunk] = (g.to(compute_dtype) @ w).neg_()
        ctx.save_for_backward(d_logp_d_hidden)
        ctx.frozen_head, ctx.hidden_dtype = True, hidden.dtype
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        cd = ctx.compute_dtype
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight[:0]).dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=_upcast(bias[:0]).dtype) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].to(cd)
            go = grad_out[s : s + ctx.chunk, None].to(_upcast(h[:0]).dtype)
            # g = go · (onehot(target) - softmax(logits)), built in place in the logits' buffer.
            g = torch.softmax(_upcast(F.linear(h, w, b)), -1).mul_(-go)
            g.scatter_add_(1, targets[s : s + ctx.chunk, None], go)
            g = g.to(cd)
            if need_h:
                grad_h[s : s + ctx.chunk] = g @ w
            if need_w and grad_w.dtype == cd:
                grad_w.addmm_(g.t(), h)  # in place: no weight-sized temporary per chunk
            elif need_w:
                # bf16 product, accumulated in fp32 a vocabulary block at a time: the temporary is
                # (block, hidden), not weight-sized (0.27 GB per chunk at Qwen2.5-0.5B's head).
                for v in range(0, g.shape[1], VOCAB_BLOCK):
                    grad_w[v : v + VOCAB_BLOCK].add_(g[:, v : v + VOCAB_BLOCK].t() @ h)
            if need_b:
                grad_b.add_(g.sum(0))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def head_token_logps(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk_size: Optional[int]
) -> torch.Tensor:
    """log p(target) per row of `hidden` under the LM head; chunked unless `chunk_size` is None or 0."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = head.weight.dtype
    if not chunk_size:
        logits = _upcast(
            F.linear(
                hidden.to(compute_dtype),
                head.weight.to(compute_dtype),
                None if head.bias is None else head.bias.to(compute_dtype),
            )
        )
        return -F.cross_entropy(logits, targets, reduction="none")
    # Only the hidden states train (LoRA, a frozen head): the forward can form their gradient itself.
    frozen_head = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )
    return ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, int(chunk_size), compute_dtype, frozen_head)


def token_logps(model: torch.nn.Module, batch: dict, chunk_size: Optional[int] = 256):
    """log p of each labelled token, (n,) in fp32 (fp64 for fp64 models), and its row in the batch (n,).

    The LM head runs on labelled positions only, `chunk_size` at a time (None or 0: all at once).
    Models that post-process logits (soft-capping, scaling) go through their own forward, unchunked.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if not plain_head(model):
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = _upcast(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep])
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
        return -F.cross_entropy(logits, targets[keep], reduction="none"), rows
    hidden, targets, rows = labelled_hidden(model, input_ids, attention_mask, labels)
    return head_token_logps(hidden, model.get_output_embeddings(), targets, chunk_size), rows


def sequence_logps(
    model: torch.nn.Module, batch: dict, chunk_size: Optional[int] = 256, ld_alpha: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the labelled (response) tokens per sequence, and their count.

    The LM head runs on response positions only, `chunk_size` at a time (`synpref.core.logprobs`):
    prompt and padding positions never reach the vocabulary projection. `ld_alpha`: see `row_sums`.
    """
    per_token, rows = token_logps(model, batch, chunk_size)
    return row_sums(per_token, rows, batch["input_ids"].shape[0], ld_alpha)


def row_sums(
    per_token: torch.Tensor, rows: torch.Tensor, n: int, ld_alpha: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of token log-probs and token counts; rows [0, n/2) are chosen, [n/2, n) rejected.

    With `ld_alpha` (LD-DPO, Liu et al. 2024) the tokens of a reply beyond the length the pair's two
    replies share count α times: a longer reply's log-prob no longer grows with its verbose tail.
    """
    ones = torch.ones_like(per_token)
    lengths = per_token.new_zeros(n).index_add(0, rows, ones)
    if ld_alpha is not None:
        # Tokens come row by row in order, so a token's place in its reply is its index minus the row's start.
        counts = lengths.long()
        position = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        shared = torch.minimum(counts[: n // 2], counts[n // 2 :]).repeat(2)
        per_token = per_token * torch.where(position < shared[rows], ones, ones * ld_alpha)
    return per_token.new_zeros(n).index_add(0, rows, per_token), lengths
