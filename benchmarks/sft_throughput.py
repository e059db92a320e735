"""SFT throughput and peak memory: synpref (Lightning) against TRL's SFTTrainer, same model, data and steps.

    python benchmarks/sft_throughput.py [--steps 40 --warmup 5 --repeats 2 --batch-size 8 --max-length 512]

Each trainer runs in its own subprocess (so peak memories do not mix), on the tiny offline model,
the shared SmolTalk-schema sample, fp32, AdamW, one optimizer step per batch, no tracking, no
checkpoints, no validation. Both count non-padding tokens of each trained batch (attention mask)
and time optimizer steps after `--warmup` steps: model loading, tokenization and warm-up are out.
Peak memory: the subprocess's peak RSS (ru_maxrss), and its growth over the post-load baseline.
Runs alternate (TRL, synpref, TRL, ...) `--repeats` times; each side's best tokens/s and largest
peak are reported, so a busy machine disturbs both alike.

Equal work (`--equal-work`, on by default with `--preset`): a few-step run compares only if both sides
train the same sequences. Both then get the same conversations in the same order (sequential, no
shuffling or length grouping), each longer than max_length so every sequence is cut to exactly
max_length tokens; the run exits non-zero if the timed non-padding tokens differ by more than 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from synpref.core.resources import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape import (
    StepMeter,
    add_memory_args,
    check_equal_work,
    floor_bytes,
    lean_fields,
    lora_group,
    matmul_peak,
    memory_argv,
    mfu_line,
    preset_model,
    shape,
    trl_lean_args,
    worker_env,
)  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(sample("sft_messages.jsonl"))


def full_length_rows(model: str, max_length: int, n: int, out: Path) -> Path:
    """The first n sample conversations still longer than max_length (+8, a margin for the two
    tokenizations) with a prompt shorter than max_length - 8, written to `out`."""
    from synpref.core.chat import IGNORE_INDEX, encode_conversation
    from synpref.core.models import load_tokenizer

    tok = load_tokenizer(model)
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        enc = encode_conversation(tok, json.loads(line)["messages"])
        first_label = next(i for i, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
        if len(enc["input_ids"]) >= max_length + 8 and first_label < max_length - 8:
            rows.append(line)
    if len(rows) < n:
        sys.exit(f"only {len(rows)} conversations in {DATA} are longer than {max_length} tokens; {n} needed")
    out.write_text("".join(r + "\n" for r in rows[:n]), encoding="utf-8")
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Meter(StepMeter):
    """StepMeter, plus RSS after the first step (the baseline that training growth is measured from)."""

    baseline_mb = 0.0

    def step_end(self) -> None:
        if not self.step_ends:
            self.baseline_mb = rss_mb()  # after load, first batch and first step
        super().step_end()

    def report(self, name: str, args) -> dict:
        timed = self.timed(args.warmup, shape(args.model))
        return {
            "name": name,
            "steps": len(self.step_ends),
            **timed,
            "tokens_per_sec": timed["tokens"] / timed["seconds"],
            "peak_rss_mb": peak_mb(),
            "train_growth_mb": peak_mb() - self.baseline_mb,
        }


def run_synpref(args) -> dict:
    from synpref.core.host_memory import release_freed_memory

    release_freed_memory()  # as every `synpref` command does first (synpref.cli.main)
    import lightning as L
    import torch

    from synpref.core.specs import ModelSpec
    from synpref.data import SmolTalkDataModule
    from synpref.modules import SFTModule

    torch.manual_seed(0)
    meter = Meter()
    dm = SmolTalkDataModule(
        args.model,
        path=args.data,
        max_length=args.max_length,
        batch_size=args.batch_size,
        group_by_length=not args.equal_work,
    )
    dm.collate = meter.wrap(dm.collate)
    if args.equal_work:  # file order, as TRL's sequential sampler
        dm.train_dataloader = lambda: dm._loader(dm.train_set, dm.batch_size, shuffle=False)
    module = SFTModule(
        ModelSpec(args.model, dtype="float32"),
        lr=args.lr,
        warmup_ratio=0.1,
        logits_chunk_size=args.chunk,
        gradient_checkpointing=args.gradient_checkpointing,
        recompute_attention=args.recompute_attention,
        optimizer_in_backward=args.optimizer_in_backward,
        lora=lora_group(args),
        optim=args.optim,
    )

    class Timer(L.Callback):
        def on_train_batch_end(self, *_):
            meter.step_end()

    precision = "bf16-mixed" if args.dtype == "bf16" else "32-true"
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=dm)
    return meter.report("synpref", args)


def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from synpref.core.models import load_tokenizer

    torch.manual_seed(0)
    meter = Meter()
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    optim, peft_kwargs = trl_lean_args(args)
    # Single-turn rows: prompt = the user turn, completion = the reply; completion-only loss.
    ds = datasets.Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    config = SFTConfig(
        **optim,
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_length=args.max_length,
        completion_only_loss=True,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.dtype == "bf16",
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential"
        if args.equal_work
        else ("group_by_length" if args.trl_group_by_length else "random"),
    )

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            meter.step_end()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=ds,
        processing_class=load_tokenizer(args.model),
        callbacks=[Timer()],
        **peft_kwargs,
    )
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.train()
    return meter.report("trl", args)


def worker(name: str, args) -> None:
    result = (run_synpref if name == "synpref" else run_trl)(args)
    print("WORKER " + json.dumps(result), flush=True)


def spawn(name: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", name, *argv],
        capture_output=True,
        text=True,
        env=worker_env(name, {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}),
    )
    lines = [l for l in out.stdout.splitlines() if l.startswith("WORKER ")]
    if out.returncode or not lines:
        sys.exit(f"{name} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("WORKER ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model dir (default: build the tiny model into a temp dir)")
    p.add_argument(
        "--preset",
        help="a synpref.presets preset (qwen2.5-0.5b, qwen-vocab-small, ...), built once into artifacts/presets/",
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="fp32, or fp32 weights under bf16 autocast"
    )
    p.add_argument(
        "--chunk", type=int, default=256, help="synpref's logits_chunk_size (0 = all labelled positions at once)"
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per trainer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="default 512, with --preset 1024")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--trl-group-by-length", action="store_true", help="give TRL length grouping too")
    p.add_argument(
        "--equal-work",
        action=argparse.BooleanOptionalAction,
        help="same full-length rows in the same order on both sides, checked (default: on with --preset)",
    )
    add_memory_args(p)
    p.add_argument("--data", default=str(DATA), help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["synpref", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)

    if args.preset:
        args.model = preset_model(args.preset)
    args.max_length = args.max_length or (1024 if args.preset else 512)
    if args.model is None:
        from synpref.presets import build_tiny_model

        args.model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", [DATA]))
    if args.equal_work is None:
        args.equal_work = bool(args.preset)
    if args.equal_work:
        rows = args.steps * args.batch_size
        args.data = str(full_length_rows(args.model, args.max_length, rows, Path(tempfile.mkdtemp()) / "sft.jsonl"))
    argv = [
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--dtype",
        args.dtype,
        "--chunk",
        str(args.chunk),
        "--data",
        args.data,
    ]
    argv += ["--trl-group-by-length"] * args.trl_group_by_length
    argv += ["--equal-work" if args.equal_work else "--no-equal-work", *memory_argv(args)]
    print(
        f"model={args.model} batch={args.batch_size} max_length={args.max_length} {args.dtype} steps={args.steps} "
        f"(first {args.warmup} not timed) cpus={os.cpu_count()} trl_group_by_length={args.trl_group_by_length} "
        f"equal_work={args.equal_work} {' '.join(memory_argv(args))}"
    )
    peak = matmul_peak(torch_dtype(args.dtype))
    runs = {"trl": [], "synpref": []}
    for _ in range(args.repeats):
        for name, done in runs.items():
            r = spawn(name, argv)
            done.append(r)
            print(
                f"{name:8s} tokens/s={r['tokens_per_sec']:7.0f}  non-pad tokens={r['tokens']:7d} "
                f"(labelled {r['labelled']}) in {r['seconds']:6.2f}s  peak RSS={r['peak_rss_mb']:5.0f} MB  (growth in training "
                f"{r['train_growth_mb']:.0f} MB)",
                flush=True,
            )
    if args.equal_work:
        check_equal_work(
            {f"{r['name']} run {i + 1}": r["tokens"] for i, rs in enumerate(zip(*runs.values())) for r in rs}
        )
    speed = {k: max(r["tokens_per_sec"] for r in v) for k, v in runs.items()}
    memory = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    # The peak is measured again after the runs, and the higher of the two counts: same load as the runs.
    peak = max(peak, matmul_peak(torch_dtype(args.dtype)))
    mfu = {}
    for k, v in runs.items():
        best = max(v, key=lambda r: r["tokens_per_sec"])
        mfu[k] = best["flops"] / best["seconds"] / peak
        print(mfu_line(k, best["flops"], best["seconds"], peak))
    print(
        f"best tokens/s: synpref {speed['synpref']:.0f}, TRL {speed['trl']:.0f}; "
        f"peak RSS: synpref {memory['synpref']:.0f} MB, TRL {memory['trl']:.0f} MB"
    )
    floor = None if args.lora else memory["synpref"] * 2**20 / floor_bytes(args.model, args, reference=False)
    print(
        f"RESULT sft speedup={speed['synpref'] / speed['trl']:.2f} memory_ratio={memory['synpref'] / memory['trl']:.2f} "
        f"mfu={mfu['synpref']:.3f}{lean_fields(args, floor)}"
    )


def torch_dtype(name: str):
    import torch

    return torch.bfloat16 if name == "bf16" else torch.float32


if __name__ == "__main__":
    main()
