"""Sampling and scoring throughput of `synpref predict` vs one-prompt-at-a-time generate and a batch-1 pipeline.

    python benchmarks/sampling_throughput.py [--model artifacts/tiny/sft] [--prompts 64] [--dtype float32]
    python benchmarks/sampling_throughput.py --backend served [--concurrency 32]

Same model, prompts, decoding (K=2, top-k 50, T=0.7) and reward model on both sides, one run.
Last line: `RESULT sampling speedup_generate=<x> speedup_score=<y>`. With `--backend served`:
generation only, synpref's in-process batched generate() against `transformers serve
--continuous-batching` (started here on 127.0.0.1) asked through OpenAIGenerator with `--concurrency`
requests in flight; last line `RESULT sampling_served in_process_tok_s=<x> served_tok_s=<y> served_over_in_process=<y/x>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification, pipeline  # noqa: E402

from synpref.core.chat import render  # noqa: E402
from synpref.core.models import end_of_turn_ids, load_causal_lm, load_tokenizer  # noqa: E402
from synpref.core.resources import sample  # noqa: E402
from synpref.core.specs import Decoding  # noqa: E402
from synpref.data import PromptDataModule  # noqa: E402
from synpref.generation import generate  # noqa: E402
from synpref.presets import build_tiny_model  # noqa: E402
from synpref.rewards import HFRewardModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape import matmul_peak, mfu_line, preset_model, shape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(sample("README.md")).parent


def tiny_classifier(tokenizer_dir: str, out: Path) -> str:
    """A 1-label Qwen2ForSequenceClassification as wide as the tiny policy, with its tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "artifacts/tiny/sft"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per synpref generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed scoring runs per side (median counts)")
    ap.add_argument("--dtype", default="float32", help="reward model dtype on both sides (public recipes: bfloat16)")
    ap.add_argument(
        "--backend",
        choices=["in-process", "served"],
        default="in-process",
        help="served: in-process generate() vs transformers serve with continuous batching",
    )
    ap.add_argument("--concurrency", type=int, default=32, help="--backend served: requests in flight")
    ap.add_argument("--preset", help="a synpref.presets preset (qwen2.5-0.5b, qwen-vocab-small, ...) as the policy")
    ap.add_argument(
        "--policy-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="generation in fp32, or fp32 weights under bf16 autocast (both sides)",
    )
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="synpref-bench-"))
    if a.preset:
        a.model = preset_model(a.preset)
    model_dir = (
        a.model
        if Path(a.model, "config.json").exists()
        else str(build_tiny_model(tmp / "tiny", [DATA / "sft_messages.jsonl"]))
    )
    policy_dtype = torch.bfloat16 if a.policy_dtype == "bf16" else torch.float32

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if a.policy_dtype == "bf16" else contextlib.nullcontext()

    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    dm = PromptDataModule(
        model_dir,
        str(DATA / "train_prefs.jsonl"),
        max_prompts=a.prompts,
        batch_size=a.batch_size,
        max_prompt_length=256,
    )
    dm.setup("predict")
    decoding = {"max_new_tokens": a.max_new_tokens, "temperature": 0.7, "top_k": 50, "top_p": 1.0}
    print(
        f"model {model_dir} ({model.num_parameters():,} params), {len(dm.prompts)} prompts, K={a.num_samples}, "
        f"{torch.get_num_threads()} threads"
    )

    # Matmul FLOPs of a forward over each prompt once and each generated token (2·N per token; attention left out).
    s = shape(model_dir)
    prompt_tokens = sum(len(tok.apply_chat_template(p, add_generation_prompt=True)) for p in dm.prompts["prompt"])
    flops = lambda generated: 2 * (s["body"] + s["head"]) * generated + 2 * s["body"] * prompt_tokens
    peak = matmul_peak(policy_dtype)

    # synpref: length-grouped batches of prompts, K samples each, one generate() call per batch.
    start, tokens, prompts, responses = time.perf_counter(), 0, [], []
    for batch in dm.predict_dataloader():
        with autocast():
            texts, counts = generate(
                model, tok, batch["prompt"], Decoding(**decoding, seed=batch["index"][0]), a.num_samples
            )
        tokens += sum(map(sum, counts))
        for p, row in zip(batch["prompt"], texts):
            prompts += [p] * len(row)
            responses += row
    ours_seconds = time.perf_counter() - start
    ours, ours_flops = tokens / ours_seconds, flops(tokens)

    if a.backend == "served":
        return served(a, model_dir, tok, dm, decoding, ours, tmp)

    # Baseline: a plain loop, one prompt per model.generate call (K samples via num_return_sequences).
    stops = end_of_turn_ids(tok)
    start, tokens = time.perf_counter(), 0
    with torch.no_grad(), autocast():
        for p in dm.prompts["prompt"]:
            ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(
                **ids,
                do_sample=True,
                num_return_sequences=a.num_samples,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
                **decoding,
            )
            new = out[:, ids["input_ids"].shape[1] :]
            for row in new.tolist():
                tokens += next((i for i, t in enumerate(row) if t in stops), len(row))
    loop_seconds = time.perf_counter() - start
    loop, loop_flops = tokens / loop_seconds, flops(tokens)
    peak = max(peak, matmul_peak(policy_dtype))

    # Scoring: synpref's length-grouped batches (with and without prefix sharing) vs transformers'
    # text-classification pipeline at batch size 1. Each side runs `--repeats` times, interleaved so
    # that drift in machine speed hits all sides alike; the median time counts.
    rm_dir = tiny_classifier(model_dir, tmp / "rm")
    dtype = getattr(torch, a.dtype)
    shared, plain = (HFRewardModel(rm_dir, batch_size=32, dtype=a.dtype, share_prefix=s) for s in (True, False))
    pipe = pipeline("text-classification", model=rm_dir, tokenizer=rm_dir, device=-1, dtype=dtype)
    rm_tok = shared.tokenizer

    def run_pipeline() -> list[float]:
        # The pipeline reads text: rendering the chat template is part of its work, as it is of ours.
        texts = [render(rm_tok, list(p) + [{"role": "assistant", "content": r}]) for p, r in zip(prompts, responses)]
        return [o["score"] for o in pipe(texts, batch_size=1, function_to_apply="none")]

    sides = {
        "synpref": lambda: shared.score(prompts, responses),
        "plain": lambda: plain.score(prompts, responses),
        "pipeline": run_pipeline,
    }
    for fn in (
        lambda: shared.score(prompts[:4], responses[:4]),
        lambda: plain.score(prompts[:4], responses[:4]),
        lambda: pipe(["warm up"] * 4, batch_size=1, function_to_apply="none"),
    ):
        fn()  # load weights and warm up outside the timing
    seconds, scores = {k: [] for k in sides}, {}
    for _ in range(a.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            scores[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    print("scoring seconds per run:", {k: [round(x, 3) for x in v] for k, v in seconds.items()})
    rate = {k: len(responses) / statistics.median(v) for k, v in seconds.items()}
    ours_score, plain_score, pipe_score = rate["synpref"], rate["plain"], rate["pipeline"]
    gap = max(abs(x - y) for x, y in zip(scores["synpref"], scores["pipeline"]))
    print(
        f"{len(responses)} conversations scored, {a.dtype}, median of {a.repeats}; "
        f"largest |synpref - pipeline| score difference {gap:.1e}"
    )

    print(f"{'':28s}{'synpref':>12s}{'baseline':>12s}{'speedup':>10s}")
    print(f"{'generate (tokens/s)':28s}{ours:12.1f}{loop:12.1f}{ours / loop:10.2f}")
    print(f"{'score, no prefix sharing':28s}{plain_score:12.1f}{pipe_score:12.1f}{plain_score / pipe_score:10.2f}")
    print(f"{'score (samples/s)':28s}{ours_score:12.1f}{pipe_score:12.1f}{ours_score / pipe_score:10.2f}")
    print(mfu_line("generate synpref", ours_flops, ours_seconds, peak))
    print(mfu_line("generate loop", loop_flops, loop_seconds, peak))
    print(
        f"RESULT sampling speedup_generate={ours / loop:.2f} speedup_score={ours_score / pipe_score:.2f} "
        f"mfu={ours_flops / ours_seconds / peak:.3f}"
    )


def served(a, model_dir: str, tok, dm, decoding: dict, in_process: float, tmp: Path) -> None:
    """The same prompts and decoding through `transformers serve --continuous-batching` on this machine."""
    import socket

    from synpref.generators import OpenAIGenerator
    from synpref.http import HttpSettings
    from synpref.pipeline.services import Service, running

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The paged KV cache is bounded: unbounded, transformers 5.24 sized it from free memory (12 GB
    # for a 230k-parameter model here) and the OOM killer took the server.
    svc = Service(
        "bench",
        f"transformers serve --host 127.0.0.1 --port {port} --device cpu --dtype float32 "
        f"--continuous-batching --cb-block-size 32 --cb-num-blocks 256 --cb-max-batch-tokens 2048",
        f"http://127.0.0.1:{port}/health",
    )
    prompts = list(dm.prompts["prompt"])
    with running(svc, tmp / "serve.log"):
        http = HttpSettings(base_url=f"http://127.0.0.1:{port}/v1", max_concurrency=a.concurrency)
        gen = OpenAIGenerator(http, server="transformers")
        # One request first: it loads the model (two at once crashed transformers 5.24's CB worker here).
        gen.generate(model_dir, tok, prompts[:1], [0], Decoding(**decoding), num_return_sequences=1)
        gen.stats.clear()  # the first request loads the model: not timed
        start = time.perf_counter()
        _, counts = gen.generate(
            model_dir,
            tok,
            prompts,
            list(range(len(prompts))),
            Decoding(**decoding),
            num_return_sequences=a.num_samples,
        )
        rate = sum(map(sum, counts)) / (time.perf_counter() - start)
    print(
        f"server requests {gen.stats['requests']}, replies {gen.stats['replies']}, cut at max_tokens {gen.stats['truncated']}, "
        f"usage completion_tokens {gen.stats['completion_tokens']}"
    )
    print(f"{'generate (tokens/s)':28s}{'in-process':>12s}{'served':>12s}{'served/in-process':>20s}")
    print(f"{'':28s}{in_process:12.1f}{rate:12.1f}{rate / in_process:20.2f}")
    print(
        f"RESULT sampling_served in_process_tok_s={in_process:.1f} served_tok_s={rate:.1f} "
        f"served_over_in_process={rate / in_process:.2f}"
    )


if __name__ == "__main__":
    main()
