"""The MLflow side a user sees: run statuses and tags over the REST client, a store that survives a
copied project folder, and (marked `ui`) the pages in a real Chromium."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from synpref.callbacks.mlflow_config import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from tests.conftest import ROOT


def load_screenshots():
    """docs/screenshots.py, the script that takes the docs' screenshots (not a package module)."""
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_failing_before_training_ends_failed_with_its_config(in_tmp):
    from synpref.cli import main
    from synpref.core.errors import DataError

    # The data module's setup fails: before any step, before Lightning's config-saving hook.
    with pytest.raises((DataError, SystemExit)):
        main(
            [
                "fit",
                "--config",
                "configs/tiny/sft.yaml",
                "--data.init_args.path=missing.jsonl",
                "--trainer.enable_progress_bar=false",
            ]
        )
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synpref-tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["synpref.command"] == "fit"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # The experiment is tagged as model training (the runs table, not the GenAI overview).
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_copied_project_reads_and_writes_its_own_artifacts(tmp_path):
    """The documented recipe (docs/evaluation.md): `mlflow ui` started in the project folder with
    `--artifacts-destination ./mlartifacts` records `mlflow-artifacts:/` locations, resolved by
    whichever server runs, so a copied folder keeps working after the original is gone."""
    screenshots = load_screenshots()
    recipe = ("--artifacts-destination", "./mlartifacts")
    project = tmp_path / "project"
    project.mkdir()
    port = screenshots.free_port()  # the same address after the move (the client caches a run's artifact location)
    proc, url = screenshots.start_ui("sqlite:///mlflow.db", port, extra_args=recipe, cwd=project)
    try:
        client = MlflowClient(url)
        exp_id = client.create_experiment("portable")
        run_id = client.create_run(exp_id, run_name="synthetic·eval").info.run_id
        client.log_text(run_id, "outcome,policy_reward\nwin,1.5\n", "eval/records.csv")
        client.set_terminated(run_id)
        assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    finally:
        screenshots.stop_ui(proc)

    moved = tmp_path / "moved"
    shutil.copytree(project, moved)
    shutil.rmtree(project)  # nothing may be read from (or written to) the original folder
    proc, url = screenshots.start_ui("sqlite:///mlflow.db", port, extra_args=recipe, cwd=moved)
    try:
        client = MlflowClient(url)
        local = client.download_artifacts(run_id, "eval/records.csv", str(tmp_path))
        assert Path(local).read_text() == "outcome,policy_reward\nwin,1.5\n"
        client.log_text(run_id, "later", "note.txt")
        assert not project.exists()
        assert list(moved.glob(f"mlartifacts/**/{run_id}/artifacts/note.txt"))
    finally:
        screenshots.stop_ui(proc)


HELD_OUT = "synpref://sample/test_prefs.jsonl"  # configs/tiny/eval.yaml's prompts


def parent_store(folder: Path) -> tuple[str, str, str, list[str], dict]:
    """A store shaped like `synpref reproduce`'s: a parent with per-arm win rates, SFT, sampling and
    DPO children, two eval children on the packaged held-out prompts. What the UI shows of the data
    is logged by synpref's own code: dataset inputs and lineage tags by log_lineage, the parent's
    replies table by compare. Returns the ids the pages should show (the DPO run's, its SFT and
    sampling runs', the held-out prompts)."""
    from synpref.core.fingerprints import file_sha256, model_digest
    from synpref.core.lineage import EXPORT_TAG, PAIRS_TAG, log_lineage
    from synpref.core.resources import resolve
    from synpref.reporting.compare import compare

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("synpref-tiny", artifact_location=(folder / "mlruns").as_uri())
    parent = client.create_run(exp_id, run_name="tiny-paper").info.run_id

    def child(name: str, tags: dict = {}) -> str:
        return client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent, **tags}).info.run_id

    # What the SFT export's and the sampling run's callbacks tag (HFExportCallback, SamplingModule).
    sft_dir, pairs = folder / "sft", folder / "pairs.jsonl"
    sft_dir.mkdir()
    (sft_dir / "config.json").write_text("{}")
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    sft = child("sft", {EXPORT_TAG: model_digest(str(sft_dir))})
    sampling = child("sample", {PAIRS_TAG: file_sha256(pairs)})
    dpo = child("synthetic·dpo")
    log_lineage(client, dpo, [{"path": str(pairs), "context": "training"}], {"synpref.sft_run_id": str(sft_dir)})
    prompts = [json.loads(line)["prompt"] for line in Path(resolve(HELD_OUT)).read_text().splitlines()[:2]]
    evals = []
    for arm, win in (("dpo_synthetic", 0.68), ("dpo_ultrafeedback", 0.61)):
        client.log_metric(parent, f"win_rate/{arm}", win)
        client.log_metric(parent, f"win_rate_ci_low/{arm}", win - 0.1)
        run = child(f"{arm.split('_')[1]}·eval")
        client.log_metric(run, "eval/win_rate", win)
        for key, value in {"policy_name": arm, "baseline_name": "sft", "reward": "RuleReward"}.items():
            client.log_param(run, key, value)
        records = folder / run / "eval.jsonl"  # the WinRateModule's records, read back by compare
        records.parent.mkdir()
        records.write_text(
            "".join(
                json.dumps(
                    {
                        "index": i,
                        "prompt": [{"role": "user", "content": prompt}],
                        "baseline_response": f"sft says {i}",
                        "policy_response": f"{arm} says {i}",
                        "judges": {"RuleReward": {"outcome": "win"}, "clarity": {"outcome": "tie"}},
                    }
                )
                + "\n"
                for i, prompt in enumerate(prompts)
            )
        )
        client.log_artifact(run, str(records))
        log_lineage(client, run, [{"path": HELD_OUT, "context": "evaluation"}], {})
        evals.append(run)
    for run in (sft, sampling, dpo, *evals):
        client.set_terminated(run)
    compare("synpref-tiny", tracking_uri=uri, parent_run_id=parent)  # logs replies.json to the parent
    client.set_tag(parent, "mlflow.note.content", "synthetic 68% vs UltraFeedback 61% vs SFT, N = 100")
    client.set_terminated(parent)
    return uri, exp_id, parent, evals, {"dpo": dpo, "sft": sft, "sampling": sampling, "prompts": prompts}


@pytest.mark.ui
def test_the_browser_shows_the_parent_runs_win_rates_replies_and_lineage(tmp_path):
    screenshots = load_screenshots()
    if not Path(screenshots.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {screenshots.CHROMIUM} (apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
    uri, exp_id, parent, evals, ids = parent_store(tmp_path)
    assert screenshots.pipeline_runs(uri, "synpref-tiny") == (exp_id, parent, evals[::-1], ids["dpo"])  # newest first
    proc, url = screenshots.start_ui(uri)
    try:
        pages = screenshots.capture(url, exp_id, parent, evals, tmp_path, lineage=ids["dpo"])
    finally:
        screenshots.stop_ui(proc)
    # The runs table with the parent expanded shows its stage runs by name.
    assert "tiny-paper" in pages["runs"] and "synthetic·eval" in pages["runs"] and "ultrafeedback·eval" in pages["runs"]
    # Its Dataset column, widened: each eval run's held-out prompts by name, digest and context.
    assert pages["datasets"].count(HELD_OUT) == 2 and "Evaluation" in pages["datasets"]
    # The parent run's page: the verdict and the per-arm win rates with their values.
    assert "synthetic 68% vs UltraFeedback 61%" in pages["parent"]
    lines = pages["parent"].splitlines()
    for name, value in (("win_rate/dpo_synthetic", "0.68"), ("win_rate/dpo_ultrafeedback", "0.61")):
        assert name in lines and lines[lines.index(name) + 1] == value, (name, lines)
    # The replies table as a grid: its columns (both arms beside SFT, each judge's verdict) and the
    # held-out prompts' text in its rows.
    for column in ("prompt", "sft", "dpo_synthetic", "dpo_ultrafeedback", "dpo_synthetic/clarity"):
        assert column in pages["replies"].splitlines(), column
    assert "sft says 1" in pages["replies"] and "dpo_synthetic says 1" in pages["replies"]
    assert all(" ".join(prompt.split())[:20] in " ".join(pages["replies"].split()) for prompt in ids["prompts"])
    # The DPO run's page: its pairs as a dataset input and the tags naming its SFT and sampling runs.
    lineage = pages["lineage"].splitlines()
    for tag, run in (("synpref.sft_run_id", ids["sft"]), ("synpref.sampling_run_id", ids["sampling"])):
        assert tag in lineage and run in pages["lineage"], (tag, lineage)
    assert "pairs.jsonl" in pages["lineage"] and "Training" in lineage
    assert "eval/win_rate" in pages["compare"] and "synthetic·eval" in pages["compare"]
    for name in screenshots.SHOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
