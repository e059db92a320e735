"""`synpref mirror`: the packaged rows as local folders laid out like the hub data sets they sample."""

from __future__ import annotations

import json
from pathlib import Path

from synpref.core.resources import sample

# The hub's layouts (README.md's `configs:` YAML block and parquet files under data/), as on
# huggingface.co/datasets/HuggingFaceTB/smoltalk (data/all/train-0000N-of-00009.parquet,
# data/all/test-00000-of-00001.parquet; config `all`; columns messages, source) and
# huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized (config `default`; splits
# train_prefs, test_prefs, train_sft, test_sft, train_gen, test_gen as data/<split>-00000-of-00001.parquet;
# columns prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected).
SMOLTALK, ULTRAFEEDBACK = "HuggingFaceTB/smoltalk", "HuggingFaceH4/ultrafeedback_binarized"
UF_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
SMOLTALK_TEST_ROWS = 50  # the packaged 500 SmolTalk-schema rows: the last 50 become `test`


def _rows(name: str) -> list[dict]:
    with open(sample(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(folder: Path, config: str, files: dict[str, tuple[str, list[dict]]], pretty: str) -> None:
    """Parquet files (split -> (relative path, rows)) and a README whose YAML names them, as the hub's."""
    import datasets

    for relative, rows in files.values():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, (relative, _) in files.items():
        pattern = relative.rsplit("-00000-of-", 1)[0] + "-*"
        lines += [f"  - split: {split}", f"    path: {pattern}"]
    counts = ", ".join(f"{split} {len(rows)}" for split, (_, rows) in files.items())
    lines += [
        "---",
        "",
        f"# {pretty} (local mirror)",
        "",
        f"synpref's packaged sample rows ({counts}) laid out as",
        f"the hub's {pretty}; see synpref/sample/README.md for source and licence.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_mirrors(out: str | Path) -> dict[str, Path]:
    """Both mirrors under `out/<owner>/<name>`; `datasets.load_dataset(folder, config, split=...)` reads them."""
    out = Path(out)
    smol = _rows("sft_messages.jsonl")
    cut = len(smol) - SMOLTALK_TEST_ROWS
    smol_folder = out / SMOLTALK
    _write(
        smol_folder,
        "all",
        {
            "train": ("data/all/train-00000-of-00001.parquet", smol[:cut]),
            "test": ("data/all/test-00000-of-00001.parquet", smol[cut:]),
        },
        SMOLTALK,
    )
    train, test = _rows("train_prefs.jsonl"), _rows("test_prefs.jsonl")
    # The _sft splits hold the same rows as _prefs (as on the hub: chosen conversations, `messages`);
    # the _gen splits hold the prompts with the same columns, for generation.
    uf = {}
    for split in UF_SPLITS:
        rows = train if split.startswith("train") else test
        uf[split] = (f"data/{split}-00000-of-00001.parquet", rows)
    uf_folder = out / ULTRAFEEDBACK
    _write(uf_folder, "default", uf, ULTRAFEEDBACK)
    return {SMOLTALK: smol_folder, ULTRAFEEDBACK: uf_folder}


def mirror(out: str = "artifacts/mirror") -> None:
    """Write the packaged sample as hub-layout folders: OUT/HuggingFaceTB/smoltalk (config `all`, splits
    train/test) and OUT/HuggingFaceH4/ultrafeedback_binarized (splits train_prefs, test_prefs, train_sft,
    test_sft, train_gen, test_gen). Configs then read them by path where they name the hub data set
    (configs/rehearsal.yaml).

    Args:
        out: folder to write the two mirrors under.
    """
    for name, folder in write_mirrors(out).items():
        print(f"{name}: {folder}")
