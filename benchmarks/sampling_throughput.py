"""Sampling and scoring throughput of `synpref predict` vs one-prompt-at-a-time generate and a batch-1 pipeline.

    python benchmarks/sampling_throughput.py [--model artifacts/tiny/sft] [--prompts 48]

Same model, prompts, decoding (K=2, top-k 50, T=0.7) and reward model on both sides, one run.
Last line: `RESULT sampling speedup_generate=<x> speedup_score=<y>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification, pipeline  # noqa: E402

from synpref.chat import render  # noqa: E402
from synpref.data import PromptDataModule  # noqa: E402
from synpref.generation import generate  # noqa: E402
from synpref.models import build_tiny_model, end_of_turn_ids, load_causal_lm, load_tokenizer  # noqa: E402
from synpref.rewards import HFRewardModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "ultrafeedback_sample"


def tiny_classifier(tokenizer_dir: str, out: Path) -> str:
    """A 1-label Qwen2ForSequenceClassification as wide as the tiny policy, with its tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
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
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="synpref-bench-"))
    model_dir = a.model if Path(a.model, "config.json").exists() else str(build_tiny_model(tmp / "tiny", [DATA / "sft_messages.jsonl"]))
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    dm = PromptDataModule(model_dir, str(DATA / "train_prefs.jsonl"), max_prompts=a.prompts,
                          batch_size=a.batch_size, max_prompt_length=256)
    dm.setup("predict")
    decoding = {"max_new_tokens": a.max_new_tokens, "temperature": 0.7, "top_k": 50, "top_p": 1.0}
    print(f"model {model_dir} ({model.num_parameters():,} params), {len(dm.prompts)} prompts, K={a.num_samples}, "
          f"{torch.get_num_threads()} threads")

    # synpref: length-grouped batches of prompts, K samples each, one generate() call per batch.
    start, tokens, prompts, responses = time.perf_counter(), 0, [], []
    for batch in dm.predict_dataloader():
        texts, counts = generate(model, tok, batch["prompt"], a.num_samples, seed=batch["index"][0], **decoding)
        tokens += sum(map(sum, counts))
        for p, row in zip(batch["prompt"], texts):
            prompts += [p] * len(row)
            responses += row
    ours = tokens / (time.perf_counter() - start)

    # Baseline: a plain loop, one prompt per model.generate call (K samples via num_return_sequences).
    stops = end_of_turn_ids(tok)
    start, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for p in dm.prompts["prompt"]:
            ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, do_sample=True, num_return_sequences=a.num_samples, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, **decoding)
            new = out[:, ids["input_ids"].shape[1]:]
            for row in new.tolist():
                tokens += next((i for i, t in enumerate(row) if t in stops), len(row))
    loop = tokens / (time.perf_counter() - start)

    # Scoring: synpref's length-grouped batches vs transformers' text-classification pipeline, batch 1.
    rm_dir = tiny_classifier(model_dir, tmp / "rm")
    scorer = HFRewardModel(rm_dir, batch_size=32)
    scorer.score(prompts[:4], responses[:4])  # load weights outside the timing
    start = time.perf_counter()
    scorer.score(prompts, responses)
    ours_score = len(responses) / (time.perf_counter() - start)
    rm_tok = scorer.tokenizer
    pipe = pipeline("text-classification", model=rm_dir, tokenizer=rm_dir, device=-1)
    pipe(["warm up"] * 4, batch_size=1, function_to_apply="none")
    start = time.perf_counter()
    # The pipeline reads text: rendering the chat template is part of its work, as it is of ours.
    texts = [render(rm_tok, list(p) + [{"role": "assistant", "content": r}]) for p, r in zip(prompts, responses)]
    pipe(texts, batch_size=1, function_to_apply="none")
    pipe_score = len(texts) / (time.perf_counter() - start)

    print(f"{'':28s}{'synpref':>12s}{'baseline':>12s}{'speedup':>10s}")
    print(f"{'generate (tokens/s)':28s}{ours:12.1f}{loop:12.1f}{ours / loop:10.2f}")
    print(f"{'score (samples/s)':28s}{ours_score:12.1f}{pipe_score:12.1f}{ours_score / pipe_score:10.2f}")
    print(f"RESULT sampling speedup_generate={ours / loop:.2f} speedup_score={ours_score / pipe_score:.2f}")


if __name__ == "__main__":
    main()
