"""Measured peak RSS of SFT and DPO steps on the presets against `synpref estimate`'s prediction.

    python benchmarks/memory_calibration.py [--presets qwen-vocab-small qwen-vocab-100m]

Each case runs in its own subprocess: import, load the module's model, then two optimizer steps
(AdamW) of the module's own loss on full-length batches of random tokens (the first half of every
sequence is prompt, the second half labelled). Peak = the subprocess's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape import preset_model, random_batch  # noqa: E402

# stage, batch, max_length, precompute, chunk, gradient checkpointing + optimizer in backward
# (small: the machine is 2 shared cores)
CASES = [
    ("sft", 2, 256, False, 256, False),
    ("sft", 2, 256, False, 0, False),
    ("dpo", 1, 256, False, 256, False),
    ("dpo", 1, 256, True, 256, False),
    ("sft", 2, 1024, False, 256, True),
    ("dpo", 1, 1024, False, 256, True),
]


def child(a) -> None:
    import torch

    if a.stage == "runtime":
        import lightning  # noqa: F401
        import transformers  # noqa: F401

        from synpref.modules import DPOModule  # noqa: F401
    else:
        from synpref.core.specs import ModelSpec
        from synpref.modules import DPOModule, SFTModule
        from synpref.modules.base import step_in_backward

        stage = SFTModule if a.stage == "sft" else DPOModule
        module = stage(ModelSpec(a.model), logits_chunk_size=a.chunk, gradient_checkpointing=a.lean)
        module.configure_model()
        opt = torch.optim.AdamW(module.model.parameters(), lr=1e-5, fused=True)  # as the module's
        if a.lean:
            step_in_backward(module.model, opt)
        batch = random_batch(a.stage, a.batch, a.length, module.model.config.vocab_size)
        if a.stage == "dpo" and a.precompute:
            module.hparams.precompute_ref_logps = True
            module._ref_table = torch.zeros(a.batch, 2)  # as a precomputation leaves it: no reference model
        for _ in range(2):
            loss = module.sft_loss(batch)[0] if a.stage == "sft" else module.dpo_step(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)


def measure(argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK ")]
    if out.returncode or not line:
        raise SystemExit(f"case {argv} failed:\n{out.stderr[-2000:]}")
    return float(line[-1].split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["qwen-vocab-small", "qwen-vocab-100m"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("stage", "model"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("batch", "length", "chunk"):
        p.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    from transformers import AutoConfig

    from synpref.reporting.estimate import Shape, peak_bytes

    print(f"runtime (imports, no model): {measure(['--stage', 'runtime']) / 1e9:.2f} GB")
    for preset in a.presets:
        model = preset_model(preset)
        shape = Shape.from_config(AutoConfig.from_pretrained(model))
        for stage, batch, length, precompute, chunk, lean in CASES:
            argv = [
                "--stage",
                stage,
                "--model",
                model,
                "--batch",
                str(batch),
                "--length",
                str(length),
                "--chunk",
                str(chunk),
            ]
            measured = measure(argv + ["--precompute"] * precompute + ["--lean"] * lean)
            predicted = peak_bytes(
                shape, stage, batch, length, precompute, chunk, gradient_checkpointing=lean, optimizer_in_backward=lean
            )
            print(
                "CASE "
                + json.dumps(
                    {
                        "preset": preset,
                        "stage": stage,
                        "batch": batch,
                        "max_length": length,
                        "precompute": precompute,
                        "chunk": chunk,
                        "checkpointing_and_optimizer_in_backward": lean,
                        "measured_gb": round(measured / 1e9, 3),
                        "predicted_gb": round(predicted["total"] / 1e9, 3),
                        "error": round(predicted["total"] / measured - 1, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
