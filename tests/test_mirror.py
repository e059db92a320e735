"""Hub-layout mirrors of the packaged sample, the stand-in reward server's replies, and pipeline overlays."""

from __future__ import annotations

import datasets
import yaml

from synpref.cli import main
from synpref.data.io import load_rows
from synpref.data.mirror import SMOLTALK, UF_SPLITS, ULTRAFEEDBACK
from synpref.pipeline.stages import Stage, with_overlays
from synpref.rewards import EndpointReward, RuleReward
from synpref.rewards.standin import reply
from tests.conftest import read_jsonl

UF_COLUMNS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]


def test_mirrors_load_as_hub_snapshots(tmp_path, sample_dir, capsys):
    main(["mirror", "--out", str(tmp_path)])
    assert str(tmp_path / SMOLTALK) in capsys.readouterr().out
    smol, uf = tmp_path / SMOLTALK, tmp_path / ULTRAFEEDBACK
    card = yaml.safe_load((smol / "README.md").read_text().split("---")[1])
    assert card["configs"][0]["config_name"] == "all"
    assert sorted(p.relative_to(smol).as_posix() for p in smol.rglob("*.parquet")) == [
        "data/all/test-00000-of-00001.parquet",
        "data/all/train-00000-of-00001.parquet",
    ]
    train = datasets.load_dataset(str(smol), "all", split="train")
    test = datasets.load_dataset(str(smol), "all", split="test")
    assert (len(train), len(test)) == (450, 50) and train.column_names == ["messages", "source"]
    assert train[0]["messages"] == read_jsonl(sample_dir / "sft_messages.jsonl")[0]["messages"]
    for split in UF_SPLITS:
        rows = datasets.load_dataset(str(uf), split=split)
        assert rows.column_names == UF_COLUMNS and len(rows) == (400 if split.startswith("train") else 100)
    held_out = read_jsonl(sample_dir / "test_prefs.jsonl")
    # synpref reads a mirror by config and split, as it reads the hub (not as a folder of files).
    got = load_rows(str(uf), "test_prefs", None)
    assert len(got) == 100 and got[0]["prompt_id"] == held_out[0]["prompt_id"]
    assert len(load_rows(str(smol), "test", "all")) == 50


def test_standin_replies_as_the_nemotron_endpoint(sample_dir):
    row = read_jsonl(sample_dir / "test_prefs.jsonl")[0]
    prompt, response = row["chosen"][:-1], row["chosen"][-1]["content"]
    body = {"model": "nvidia/llama-3.1-nemotron-70b-reward", "messages": prompt + [row["chosen"][-1]]}
    expected = RuleReward().score([prompt], [response])[0]
    for source in ("content", "logprob"):
        assert abs(EndpointReward(source=source).parse(reply(body, RuleReward())) - expected) < 1e-4


def test_overlays_follow_the_files_a_stage_composes():
    stages = [
        Stage("sft", "fit", config=["configs/sft.yaml"]),
        Stage("dpo", "fit", config=["configs/dpo.yaml", "configs/dpo_ultrafeedback.yaml"], args=["--x=1"]),
    ]
    overlays = {
        "configs/dpo.yaml": ["r/dpo.yaml"],
        "configs/dpo_ultrafeedback.yaml": ["r/uf.yaml"],
        "configs/eval.yaml": ["r/eval.yaml"],  # composed by no stage here: unused
    }
    sft, dpo = with_overlays(stages, overlays)
    assert sft.config == ["configs/sft.yaml"]
    assert dpo.config == ["configs/dpo.yaml", "configs/dpo_ultrafeedback.yaml", "r/dpo.yaml", "r/uf.yaml"]
    assert dpo.args == ["--x=1"]
