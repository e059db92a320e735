"""Where one synpref SFT or DPO step spends memory and time: peak RSS per phase and torch.profiler's top ops.

    python benchmarks/step_profile.py --preset qwen2.5-0.5b --stage dpo --dtype bf16 --batch-size 1 --max-length 1024

One process: load the module's model (and a live reference), AdamW, then steps on a full-length batch
of random tokens (prompt = the first quarter of each sequence, the rest labelled). Step 1 is a
warm-up that also fills the optimizer state; step 2 runs under torch.profiler (CPU, no memory
profiling, so the RSS figures stay the step's own). A thread samples RSS every 2 ms and keeps the
highest value per phase: ref (live reference forward), forward, backward, optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape import lora_group, preset_model, random_batch  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PhasePeaks:
    """The highest RSS seen while each named phase ran (a sampling thread, every 2 ms)."""

    def __init__(self):
        self.phase, self.peaks, self._stop = "load", {}, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss())
            time.sleep(0.002)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.peaks[name] = max(self.peaks.get(name, 0), rss())
        self.phase = name
        yield
        self.peaks[name] = max(self.peaks[name], rss())
        self.phase = "between"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--stage", choices=["sft", "dpo"], default="dpo")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batch-size", type=int, default=1, help="rows (SFT) or pairs (DPO)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--precompute", action="store_true", help="DPO without a live reference")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear layer of the blocks (0: full)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    a = p.parse_args()

    import torch

    from synpref.core.specs import ModelSpec
    from synpref.modules import DPOModule, SFTModule

    peaks = PhasePeaks()
    base = rss()
    model = preset_model(a.preset)
    module = (SFTModule if a.stage == "sft" else DPOModule)(
        ModelSpec(model), logits_chunk_size=a.chunk, lora=lora_group(a), gradient_checkpointing=a.checkpointing
    )
    module.configure_model()
    loaded = rss()
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-5)
    batch = random_batch(a.stage, a.batch_size, a.max_length, module.model.config.vocab_size, prompt_fraction=0.25)
    live = a.stage == "dpo" and not a.precompute
    if a.stage == "dpo" and a.precompute:
        module._ref_table = torch.zeros(a.batch_size, 2)  # as a precomputation leaves it: no reference model
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=a.dtype == "bf16")

    def step() -> None:
        with autocast:
            if a.stage == "dpo":
                with peaks("ref"), torch.profiler.record_function("## reference"):
                    ref = DPOModule.ref_logps(module, batch)  # what dpo_step does first
                module.ref_logps = lambda _: ref  # so that dpo_step does not run the reference again
            with peaks("forward"), torch.profiler.record_function("## forward"):
                loss = module.sft_loss(batch)[0] if a.stage == "sft" else module.dpo_step(batch)["loss"]
        with peaks("backward"), torch.profiler.record_function("## backward"):
            loss.backward()
        with peaks("optimizer"), torch.profiler.record_function("## optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    warm = time.perf_counter() - start
    peaks.peaks = {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    peaks._stop = True
    gb = 1e9
    print(
        f"{a.stage} {a.preset} {a.dtype} batch {a.batch_size} x {a.max_length} chunk {a.chunk} "
        f"{'live' if live else ''} lora {a.lora} checkpointing {a.checkpointing} threads {torch.get_num_threads()}"
    )
    print(f"RSS: imports {base / gb:.2f} GB, after model load {loaded / gb:.2f} GB")
    print("peak RSS per phase (GB), profiled step: " + ", ".join(f"{k} {v / gb:.2f}" for k, v in peaks.peaks.items()))
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb:.2f} GB")
    print(f"step seconds: warm-up {warm:.1f}, profiled {seconds:.1f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=40))
    phases = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("## ")}
    print("phase CPU time (s): " + ", ".join(f"{k[3:]} {v / 1e6:.1f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
