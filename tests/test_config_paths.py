"""Where a pipeline file's `config:` entries and `--config synpref://...` arguments are found."""

from __future__ import annotations

from synpref.core.resources import config_path, resolve, resolve_config_args


def test_config_entries_resolve_relative_to_the_pipeline_file_then_the_folders_above(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs" / "tiny").mkdir(parents=True)
    for name in ("paper.yaml", "sft.yaml", "own.yaml"):
        (project / "configs" / "tiny" / name).write_text("{}")
    pipeline = str(project / "configs" / "tiny" / "paper.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Next to the pipeline file, and the repository-root form from a folder above it.
    assert config_path("own.yaml", pipeline) == str(project / "configs" / "tiny" / "own.yaml")
    assert config_path("configs/tiny/sft.yaml", pipeline) == str(project / "configs" / "tiny" / "sft.yaml")
    # Not found there: left to the working directory, as before; absolute paths unchanged.
    assert config_path("configs/other.yaml", pipeline) == "configs/other.yaml"
    assert config_path(str(tmp_path / "x.yaml"), pipeline) == str(tmp_path / "x.yaml")
    # From the project root, a path found in the working directory's tree stays relative to it.
    monkeypatch.chdir(project)
    assert config_path("configs/tiny/sft.yaml", "configs/tiny/paper.yaml") == "configs/tiny/sft.yaml"
    # The packaged pipeline's entries are the packaged configs.
    packaged = "synpref://configs/tiny/paper.yaml"
    assert config_path("configs/tiny/sft.yaml", packaged) == resolve("synpref://configs/tiny/sft.yaml")
    assert config_path("synpref://configs/tiny/dpo.yaml", None) == resolve("synpref://configs/tiny/dpo.yaml")


def test_config_arguments_name_packaged_files():
    args = [
        "reproduce",
        "--config",
        "synpref://configs/tiny/paper.yaml",
        "--config=synpref://configs/sft.yaml",
        "--x=synpref://a",
    ]
    assert resolve_config_args(args) == [
        "reproduce",
        "--config",
        resolve("synpref://configs/tiny/paper.yaml"),
        "--config=" + resolve("synpref://configs/sft.yaml"),
        "--x=synpref://a",
    ]
