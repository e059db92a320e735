"""synpref DPO vs TRL DPOTrainer: train tokens/s and peak RSS, live and precomputed reference, one run.

    python benchmarks/dpo_throughput.py [--pairs 256 --batch-size 8 --max-length 512] [--loss simpo]

Same tiny model, same real pairs (the first usable rows of the shared train_prefs.jsonl, written
once in TRL's conversational format and read by both), batch size, max length, fp32, one epoch.
Each of the four runs is its own subprocess (peak RSS = its ru_maxrss) and is timed from building
the trainer (tokenization, model and reference loading, reference precomputation) to the end of
training. Tokens = non-padding tokens of the chosen and rejected sequences each framework trains on.

Equal work (`--equal-work`, on by default with `--preset`): with `--steps`, only a few steps are timed,
which compare only if both sides train the same sequences. Both then get the same pairs in the same
order (sequential, no shuffling or length grouping), each with chosen and rejected longer than
max_length, so every sequence is cut to exactly max_length tokens; the run exits non-zero if the
timed non-padding tokens of the two sides differ by more than 1 %.

`--loss NAME`: synpref trains that loss; TRL the same one if it has it, else its sigmoid DPO. A
reference-free loss (simpo) loads no reference, so it runs one setting, against TRL's live reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synpref.core.losses import LOSSES, PreferenceLoss
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
SAMPLE = Path(sample("train_prefs.jsonl"))


def write_pairs(path: Path, n: int, max_length: int, model: str, full_length: bool = False) -> None:
    """The first n rows with a real preference whose prompt fits in max_length, as TRL conversational rows.

    full_length: only pairs whose chosen and rejected sequences are both longer than max_length (+8, a
    margin for the two tokenizations), so each side trains every sequence at exactly max_length tokens.
    """
    from synpref.core.chat import encode_prompt, encode_prompt_response
    from synpref.core.models import load_tokenizer

    tok = load_tokenizer(model)
    out = []
    for line in SAMPLE.read_text().splitlines():
        r = json.loads(line)
        c, rj = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        if r["score_chosen"] == r["score_rejected"] or c == rj or not c.strip() or not rj.strip():
            continue
        if len(encode_prompt(tok, r["chosen"][:-1])) >= max_length - 8:
            continue
        if full_length and min(sum(map(len, encode_prompt_response(tok, r["chosen"][:-1], x))) for x in (c, rj)) < (
            max_length + 8
        ):
            continue
        out.append({"prompt": r["chosen"][:-1], "chosen": [r["chosen"][-1]], "rejected": [r["rejected"][-1]]})
    if len(out) < n:
        longer = f" longer than {max_length} tokens" if full_length else ""
        raise SystemExit(f"only {len(out)} usable pairs{longer} in {SAMPLE}; ask for fewer")
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:n]))


class Meter(StepMeter):
    """Counts only the batches of training steps (not those of a reference precomputation)."""

    training = False

    def wrap(self, collate):
        counted = super().wrap(collate)
        return lambda rows: counted(rows) if self.training else collate(rows)


def stepped(a, meter: Meter, result: dict) -> dict:
    """With --steps: tokens, seconds and FLOPs of the steps after the warm-up ones, not of the whole run."""
    if not a.steps:
        return result
    no_reference = a.precompute or (
        a.framework == "synpref" and PreferenceLoss(a.loss, **loss_args(a.loss)).reference_free
    )
    return meter.timed(a.warmup, shape(a.model), passes=3 if no_reference else 4)  # live: + reference forward


def run_synpref(a) -> dict:
    from synpref.core.host_memory import release_freed_memory

    release_freed_memory()  # as every `synpref` command does first (synpref.cli.main)
    import lightning as L

    from synpref.core.specs import ModelSpec
    from synpref.data.preferences import PreferenceDataModule, PreferenceSource
    from synpref.modules.dpo import DPOModule

    L.seed_everything(0, verbose=False)
    meter = Meter()
    start = time.perf_counter()
    dm = PreferenceDataModule(
        a.model,
        [PreferenceSource(a.pairs, "trl")],
        max_length=a.max_length,
        batch_size=a.batch_size,
        group_by_length=not a.equal_work,
    )
    dm.collate = meter.wrap(dm.collate)
    if a.equal_work:  # file order, as TRL's sequential sampler
        dm.train_dataloader = lambda: dm._loader(dm.train_set, dm.batch_size, shuffle=False)
    module = DPOModule(
        ModelSpec(a.model),
        lr=a.lr,
        precompute_ref_logps=a.precompute,
        ref_cache_dir=tempfile.mkdtemp(),
        logits_chunk_size=a.chunk,
        gradient_checkpointing=a.gradient_checkpointing,
        recompute_attention=a.recompute_attention,
        optimizer_in_backward=a.optimizer_in_backward,
        loss_type=a.loss,
        **loss_args(a.loss),
        lora=lora_group(a),
        optim=a.optim,
    )

    class Timer(L.Callback):
        def on_train_start(self, *_):
            meter.training = True

        def on_train_batch_end(self, *_):
            meter.step_end()

    trainer = L.Trainer(
        max_epochs=1,
        max_steps=a.steps or -1,
        accelerator="cpu",
        devices=1,
        logger=False,
        precision="bf16-mixed" if a.dtype == "bf16" else "32-true",
        callbacks=[Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in dm.train_set)
    return stepped(a, meter, {"tokens": tokens, "seconds": seconds})


def loss_args(loss: str) -> dict:
    """EXO is undefined at label_smoothing 0: its paper's 1e-3."""
    return {"label_smoothing": 1e-3} if loss == "exo_pair" else {}


def trl_loss(loss: str) -> str:
    """The loss TRL trains against synpref's `loss`: the same one, or sigmoid DPO where TRL has none."""
    from synpref.core.losses import TRL_LOSSES

    return loss if loss in TRL_LOSSES else "sigmoid"


def run_trl(a) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from synpref.core.models import load_causal_lm, load_tokenizer

    meter = Meter()
    ds = load_dataset("json", data_files=a.pairs, split="train")
    start = time.perf_counter()
    optim, peft_kwargs = trl_lean_args(a)
    args = DPOConfig(
        **optim,
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a.batch_size,
        max_length=a.max_length,
        num_train_epochs=1,
        max_steps=a.steps or -1,
        learning_rate=a.lr,
        precompute_ref_log_probs=a.precompute,
        loss_type=[trl_loss(a.loss)],
        **loss_args(trl_loss(a.loss)),
        gradient_checkpointing=a.gradient_checkpointing,
        report_to="none",
        use_cpu=True,
        bf16=a.dtype == "bf16",
        fp16=False,
        save_strategy="no",
        logging_steps=10**6,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        train_sampling_strategy="sequential" if a.equal_work else "random",
    )

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            meter.training = True

        def on_step_end(self, *_, **__):
            meter.step_end()

    trainer = DPOTrainer(
        model=load_causal_lm(a.model),
        args=args,
        train_dataset=ds,
        processing_class=load_tokenizer(a.model),
        callbacks=[Timer()],
        **peft_kwargs,
    )
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.train()
    seconds = time.perf_counter() - start
    data = trainer.train_dataset
    tokens = sum(
        min(len(p) + len(c), a.max_length) + min(len(p) + len(r), a.max_length)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    )
    return stepped(a, meter, {"tokens": tokens, "seconds": seconds})


def child(a) -> None:
    result = (run_trl if a.framework == "trl" else run_synpref)(a)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="default 512, with --preset 1024")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny" / "sft"))
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
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="train this many steps and time those after --warmup (0: one epoch, timed from building the trainer)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--equal-work",
        action=argparse.BooleanOptionalAction,
        help="same full-length pairs in the same order on both sides, checked (default: on with --preset)",
    )
    add_memory_args(p)
    p.add_argument("--settings", nargs="+", choices=["live", "precomputed"], default=["live", "precomputed"])
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="synpref's loss_type (TRL: see trl_loss)")
    p.add_argument("--json-out", help="also write every run's figures and the matmul peak to this JSON file")
    p.add_argument("--framework", choices=["synpref", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", dest="pairs_file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.framework:
        a.pairs = a.pairs_file
        return child(a)

    if a.preset:
        a.model = preset_model(a.preset)
    a.max_length = a.max_length or (1024 if a.preset else 512)
    if not (Path(a.model) / "config.json").exists():
        from synpref.presets import build_tiny_model

        a.model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", [SAMPLE.parent / "sft_messages.jsonl"]))
    if a.equal_work is None:
        a.equal_work = bool(a.preset)
    if PreferenceLoss(a.loss, **loss_args(a.loss)).reference_free:
        a.settings = ["live"]  # nothing to precompute; TRL keeps its live reference
    pairs = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    write_pairs(pairs, a.pairs, a.max_length, a.model, full_length=a.equal_work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    import torch

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    print(
        f"model={a.model} pairs/step={a.batch_size} max_length={a.max_length} {a.dtype} steps={a.steps} "
        f"equal_work={a.equal_work} {' '.join(memory_argv(a))}",
        flush=True,
    )
    results = {}
    for setting in a.settings:
        for fw in ("synpref", "trl"):
            cmd = [
                sys.executable,
                __file__,
                "--framework",
                fw,
                "--pairs-file",
                str(pairs),
                "--model",
                a.model,
                "--batch-size",
                str(a.batch_size),
                "--max-length",
                str(a.max_length),
                "--lr",
                str(a.lr),
                "--dtype",
                a.dtype,
                "--chunk",
                str(a.chunk),
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
                "--loss",
                a.loss,
            ]
            cmd += ["--precompute"] if setting == "precomputed" else []
            cmd += ["--equal-work" if a.equal_work else "--no-equal-work", *memory_argv(a)]
            out = subprocess.run(cmd, env=worker_env(fw, env), capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("BENCH ")]
            if out.returncode or not line:
                raise SystemExit(f"{fw} {setting} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[-1][6:])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            results[(fw, setting)] = r
            labelled = f" (labelled {r['labelled']})" if "labelled" in r else ""
            print(
                f"{setting:12s} {fw:8s} {r['tokens']:8d} tokens{labelled} {r['seconds']:7.1f} s "
                f"{r['tokens_per_s']:9.0f} tokens/s  peak RSS {r['peak_rss_mb']:7.0f} MiB",
                flush=True,
            )
    if a.equal_work:
        check_equal_work({" ".join(key): r["tokens"] for key, r in results.items()})
    speed = {s: results[("synpref", s)]["tokens_per_s"] / results[("trl", s)]["tokens_per_s"] for s in a.settings}
    memory = max(results[("synpref", s)]["peak_rss_mb"] / results[("trl", s)]["peak_rss_mb"] for s in a.settings)
    peak = max(peak, matmul_peak(dtype))  # measured before and after the runs; the higher counts
    mfu = {}
    for key, r in results.items():
        if "flops" in r:
            mfu[key] = r["flops"] / r["seconds"] / peak
            print(mfu_line(" ".join(key), r["flops"], r["seconds"], peak))
    if a.json_out:
        runs = {" ".join(key): r for key, r in results.items()}
        Path(a.json_out).write_text(json.dumps({"runs": runs, "matmul_peak": peak}, indent=1))
    print(
        f"pairs={a.pairs} batch_size={a.batch_size} max_length={a.max_length} precision={a.dtype} model={a.model} "
        f"steps={a.steps or 'one epoch'} loss={a.loss} trl_loss={trl_loss(a.loss)}"
    )
    if a.loss != "sigmoid":
        s = a.settings[0]
        ratio = results[("synpref", s)]["peak_rss_mb"] / results[("trl", s)]["peak_rss_mb"]
        # The floor holds a reference only where this loss keeps one live (SimPO has none).
        held_ref = s == "live" and not PreferenceLoss(a.loss, **loss_args(a.loss)).reference_free
        floor = None if a.lora else results[("synpref", s)]["peak_rss_mb"] * 2**20 / floor_bytes(a.model, a, held_ref)
        print(
            f"RESULT dpo loss={a.loss} against={trl_loss(a.loss)}:{s} speedup={speed[s]:.2f} memory_ratio={ratio:.2f}"
            f"{lean_fields(a, floor)}"
        )
        return
    if len(a.settings) < 2:
        return  # the RESULT line compares both settings
    tail = f" mfu={mfu[('synpref', 'live')]:.3f}" if mfu else ""
    live = results[("synpref", "live")]["peak_rss_mb"] * 2**20
    floor = None if a.lora else live / floor_bytes(a.model, a, reference=True)
    print(
        f"RESULT dpo speedup_live={speed['live']:.2f} speedup_precomputed={speed['precomputed']:.2f} "
        f"memory_ratio={memory:.2f}{tail}{lean_fields(a, floor)}"
    )


if __name__ == "__main__":
    main()
