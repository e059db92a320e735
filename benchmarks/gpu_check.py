"""The real shapes on an offline CUDA machine, one command: SFT and DPO steps in bf16, tokens/s, MFU, memory.

    git clone ... && cd synpref
    pip install torch --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[dev]"
    python benchmarks/gpu_check.py [--presets qwen2.5-0.5b qwen2.5-1.5b] [--steps 10] [--max-length 1024]

Needs no network: each preset's random model (exact config, Qwen2.5's tokenizer) is built into
artifacts/presets/ first (1.5B: 6 GB of fp32 weights). Then, on one GPU, each stage runs `--warmup` +
`--steps` optimizer steps of synpref's own module loss (SFTModule.sft_loss, DPOModule.dpo_step with a
live bf16 reference) on full-length random batches, as configs/sft.yaml and dpo.yaml train: fp32
master weights, bf16 autocast, fused AdamW, gradient checkpointing where the config turns it on for the
size. Reported per case: trained tokens/s, MFU (matmul FLOPs of the steps / time / a bf16 matmul peak
measured in this run on this GPU) and peak CUDA memory beside `synpref estimate` for the same settings.
With 2 or more GPUs, each case runs again through Lightning with DDP and with FSDP (Qwen2 decoder layers
wrapped) on every GPU: tokens/s over all ranks. Results go to stdout and --out (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape import preset_model, random_batch, shape, step_flops  # noqa: E402

# Rows (SFT) or pairs (DPO) per step; --batch-size overrides them.
CASES = {"sft": 8, "dpo": 4}


def need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: error: no CUDA device visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'no, a CPU build'}); run it on a machine with an NVIDIA GPU "
            "and a CUDA build of torch (README, Install). The CPU rehearsal of the same configs is "
            "`synpref reproduce --config configs/paper.yaml --config configs/rehearsal.yaml`."
        )


def cuda_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """This GPU's bf16 matmul FLOP/s now: the best of `repeats` timed (n, n) @ (n, n) products."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def module_for(stage: str, model: str, lean: bool):
    from synpref.core.specs import ModelSpec
    from synpref.modules import DPOModule, SFTModule

    if stage == "sft":
        return SFTModule(ModelSpec(model, dtype="float32"), lr=1e-5, gradient_checkpointing=lean)
    return DPOModule(
        ModelSpec(model, dtype="float32"), ModelSpec(model, dtype="bfloat16"), lr=1e-7, gradient_checkpointing=lean
    )


def one_gpu(a) -> dict:
    """The child: `warmup` + `steps` steps on cuda:0; tokens/s, matmul FLOP/s, peak memory."""
    import torch

    module = module_for(a.stage, a.model, a.lean)
    module.configure_model()
    module.to("cuda").train()  # from_pretrained leaves eval mode, where HF skips gradient checkpointing
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-6, fused=True)
    vocab = module.model.config.vocab_size
    batch = {k: v.cuda() for k, v in random_batch(a.stage, a.batch, a.length, vocab).items()}
    torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.sft_loss(batch)[0] if a.stage == "sft" else module.dpo_step(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = batch["input_ids"].shape[0]
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    s = shape(a.model)
    # DPO: policy forward + backward (3 passes) and the reference's forward (1) over the same tokens.
    per_step = step_flops(s, [a.length] * rows, labelled, 3) + (
        step_flops(s, [a.length] * rows, labelled, 1) if a.stage == "dpo" else 0
    )
    return {
        "tokens_per_s": rows * a.length * a.steps / seconds,
        "flops_per_s": per_step * a.steps / seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def distributed(a) -> dict:
    """The child under Lightning with DDP or FSDP on every GPU (Lightning starts the other ranks)."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    module = module_for(a.stage, a.model, a.lean)
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    batches = [random_batch(a.stage, a.batch, a.length, vocab)] * (a.warmup + a.steps)
    ends = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    strategy = "ddp" if a.strategy == "ddp" else FSDPStrategy(auto_wrap_policy={Qwen2DecoderLayer})
    trainer = L.Trainer(
        accelerator="gpu",
        devices=torch.cuda.device_count(),
        strategy=strategy,
        precision="bf16-mixed",
        gradient_clip_val=1.0 if a.strategy == "ddp" else None,
        max_steps=a.warmup + a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[Clock()],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    seconds = ends[-1] - ends[a.warmup - 1]
    rows = batches[0]["input_ids"].shape[0]
    return {
        "tokens_per_s": trainer.world_size * rows * a.length * a.steps / seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "rank": trainer.global_rank,
    }


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(lines[0][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    p.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=0, help="rows (SFT) or pairs (DPO) per step; 0: 8 / 4")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/gpu_check.jsonl")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="one", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    need_cuda()
    if a.child:
        result = one_gpu(a) if a.strategy == "one" else distributed(a)
        if result.get("rank", 0) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    from synpref.reporting.estimate import estimate

    gpus, peak = torch.cuda.device_count(), cuda_matmul_peak()
    print(f"{gpus} × {torch.cuda.get_device_name(0)}; bf16 matmul peak measured now: {peak / 1e12:.1f} TFLOP/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a", encoding="utf-8") as log:
        for preset in a.presets:
            model = preset_model(preset)
            for stage in a.stages:
                batch = a.batch_size or CASES[stage]
                lean = preset != "qwen2.5-0.5b"  # 1.5B fits 80 GB with checkpointing (README's table)
                argv = ["--stage", stage, "--model", model, "--batch", str(batch), "--length", str(a.max_length)]
                argv += ["--steps", str(a.steps), "--warmup", str(a.warmup)] + ["--lean"] * lean
                planned = estimate(
                    stage=stage,
                    model=model,
                    max_length=a.max_length,
                    batch_size=batch,
                    bf16=True,
                    gradient_checkpointing=lean,
                    ref_bf16=stage == "dpo",
                )
                for strategy in ["one"] + (["ddp", "fsdp"] if gpus >= 2 else []):
                    got = run_child(argv + ["--strategy", strategy])
                    row = {"preset": preset, "stage": stage, "strategy": strategy, "batch": batch, **got}
                    if "flops_per_s" in got:
                        row["mfu"] = got["flops_per_s"] / peak
                    # The planner's runtime term is the CPU process's own size, not CUDA memory.
                    row["estimate_gb"] = round(planned["total"] - planned["runtime"], 2)
                    print(json.dumps(row), flush=True)
                    log.write(json.dumps({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


if __name__ == "__main__":
    main()
