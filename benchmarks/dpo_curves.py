"""How DPO's cost grows: synpref and TRL tokens/s and peak RSS against max length and model size.

    python benchmarks/dpo_curves.py [--budget 4096] [--lengths 256 512 1024 2048]
        [--sizes tiny qwen-vocab-small qwen-vocab-100m] [--out benchmarks/results]

Each point is one `dpo_throughput.py` run (live reference, equal work, bf16 autocast, gradient
checkpointing on both sides, one warm-up step and --steps - 1 timed steps): synpref against TRL
DPOTrainer on the same full-length pairs. A step holds a fixed token budget, so pairs per step =
budget / (2 × max length). Writes dpo_vs_length.csv, dpo_vs_size.csv and one PNG of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIELDS = ["preset", "parameters", "max_length", "pairs_per_step", "framework", "tokens_per_s", "peak_rss_mb", "mfu"]


def point(preset: str, length: int, budget: int, steps: int, extra: list[str]) -> list[dict]:
    """Both frameworks' figures for one (preset, max length) point."""
    pairs = max(1, budget // (2 * length))
    out = Path(tempfile.mkdtemp()) / "point.json"
    cmd = [sys.executable, str(HERE / "dpo_throughput.py"), "--preset", preset, "--max-length", str(length)]
    cmd += ["--batch-size", str(pairs), "--pairs", str(pairs * steps), "--steps", str(steps), "--warmup", "1"]
    cmd += ["--dtype", "bf16", "--settings", "live", "--json-out", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{preset} at {length}: failed\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    data = json.loads(out.read_text())
    from transformers import AutoConfig

    from synpref.reporting.estimate import Shape

    sys.path.insert(0, str(HERE))
    from realshape import preset_model

    parameters = Shape.from_config(AutoConfig.from_pretrained(preset_model(preset))).params
    rows = []
    for fw in ("synpref", "trl"):
        r = data["runs"][f"{fw} live"]
        rows.append(
            {
                "preset": preset,
                "parameters": parameters,
                "max_length": length,
                "pairs_per_step": pairs,
                "framework": fw,
                "tokens_per_s": round(r["tokens_per_s"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "mfu": round(r["flops"] / r["seconds"] / data["matmul_peak"], 4) if "flops" in r else "",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], x: str, path: Path, log_base: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for fw in ("synpref", "trl"):
        mine = [r for r in rows if r["framework"] == fw]
        xs = [float(r[x]) for r in mine]
        speed.plot(xs, [r["tokens_per_s"] for r in mine], "o-", label=fw)
        memory.plot(xs, [r["peak_rss_mb"] / 1024 for r in mine], "o-", label=fw)
    for ax, label in ((speed, "train tokens/s"), (memory, "peak RSS (GiB)")):
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xscale("log", base=log_base)
    if log_base == 10:  # sizes span 0.2M to 0.5B parameters: tokens/s spans two orders of magnitude too
        speed.set_yscale("log")
    fig.suptitle(f"DPO, live reference, bf16 autocast, fixed tokens per step: {path.stem.replace('_', ' ')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=4096, help="tokens per step (chosen + rejected)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--length-preset", default="qwen-vocab-small")
    p.add_argument("--sizes", nargs="+", default=["tiny", "qwen-vocab-small", "qwen-vocab-100m"])
    p.add_argument("--size-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="steps per run, the first not timed")
    p.add_argument("--out", default=str(HERE / "results"))
    a, extra = p.parse_known_args()  # the rest goes to dpo_throughput.py (e.g. --no-gradient-checkpointing)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    by_length = [r for n in a.lengths for r in point(a.length_preset, n, a.budget, a.steps, extra)]
    write(by_length, out / "dpo_vs_length.csv")
    plot(by_length, "max_length", out / "dpo_vs_length.png", log_base=2)
    by_size = [r for s in a.sizes for r in point(s, a.size_length, a.budget, a.steps, extra)]
    write(by_size, out / "dpo_vs_size.csv")
    plot(by_size, "parameters", out / "dpo_vs_size.png", log_base=10)
    print(f"wrote {out}/dpo_vs_length.{{csv,png}} and dpo_vs_size.{{csv,png}}")


if __name__ == "__main__":
    main()
