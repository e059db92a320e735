"""Every LightningCLI YAML under configs/ parses against `synpref` (without loading any model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from synpref.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Pipeline configs for `synpref reproduce`, not LightningCLI configs (tested with the pipeline).
PIPELINE_NAMES = {"paper.yaml", "paper_served.yaml", "scaling.yaml", "losses.yaml", "rehearsal.yaml"}


def cli_configs() -> list[Path]:
    paths = sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("configs/**/*.yml"))
    return [p for p in paths if p.name not in PIPELINE_NAMES]


def subcommand(path: Path) -> str:
    """The subcommand the config's own usage comment runs it with (`synpref predict --config
    configs/x.yaml`); else predict for sampling/evaluation configs by name, fit otherwise."""
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    found = re.search(rf"synpref ({'|'.join(SUBCOMMANDS)}) --config {re.escape(rel)}\b", text)
    if found:
        return found.group(1)
    return "predict" if path.stem.startswith(("sample", "eval")) or "predict" in path.parts else "fit"


def test_configs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in cli_configs()}
    assert {"configs/sft.yaml", "configs/tiny/sft.yaml"} <= names


def base_configs(path: Path) -> list[str]:
    """An overlay (configs/x_served.yaml) names the config it goes on in its usage comment:
    `synpref predict --config configs/x.yaml --config configs/x_served.yaml`."""
    rel = re.escape(path.relative_to(ROOT).as_posix())
    found = re.search(rf"synpref \w+ ((?:--config \S+ )+)--config {rel}\b", path.read_text(encoding="utf-8"))
    return found.group(1).replace("--config", "").split() if found else []


@pytest.mark.parametrize("path", cli_configs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_parses(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bases = [arg for base in base_configs(path) for arg in ("--config", base)]
    with pytest.raises(SystemExit) as exit_:
        main([subcommand(path), *bases, "--config", str(path.relative_to(ROOT)), "--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    # What the file names is what the CLI resolved: the same classes, the same trainer settings.
    for group in ("model", "data"):
        if isinstance(written.get(group), dict) and "class_path" in written[group]:
            assert resolved[group]["class_path"].endswith(written[group]["class_path"].split(".")[-1])
    for key, value in (written.get("trainer") or {}).items():
        if not isinstance(value, (dict, list)):
            assert resolved["trainer"][key] == value, key
