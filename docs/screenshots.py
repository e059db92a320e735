"""Screenshots of the MLflow UI over a synpref store, taken by headless Chromium through Playwright.

    python docs/screenshots.py --backend-store-uri sqlite:///mlflow.db --experiment synpref-tiny --out docs

Starts `mlflow ui` on 127.0.0.1 and saves (SHOTS): the experiment's runs table with the pipeline's
parent run expanded (mlflow_runs.png), the same table with its Dataset column widened to show every
run's dataset inputs (mlflow_datasets.png), the parent run's page (mlflow_parent_run.png), its
replies side by side in the artifact viewer (mlflow_replies.png), a DPO run's page with its
lineage tags and datasets (mlflow_lineage.png) and the compare view of the eval runs
(mlflow_compare.png). Needs Debian's Chromium
(`apt-get install -y chromium`, /usr/bin/chromium) and `pip install playwright` (its own
browser download is not used). tests/test_mlflow_ui.py runs the same flow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

CHROMIUM = os.environ.get("SYNPREF_CHROMIUM", "/usr/bin/chromium")
# No network beyond loopback, no GPU, no sandbox (containers run as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 900}
# The runs table, not the GenAI overview: MLflow 3 takes the workflow from this URL parameter
# (else from the last toggle click, else GenAI).
RUNS_VIEW = "workflowType=machine_learning"
SHOTS = (
    "mlflow_runs.png",
    "mlflow_datasets.png",
    "mlflow_parent_run.png",
    "mlflow_replies.png",
    "mlflow_lineage.png",
    "mlflow_compare.png",
)
# For the wide tables (the Dataset column sized to its content, the replies side by side).
WIDE_VIEWPORT = {"width": 1920, "height": 900}
# The tags a run gets from synpref.core.lineage.log_lineage, naming the runs that made its inputs.
LINEAGE_TAGS = ("synpref.sampling_run_id", "synpref.sft_run_id")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(
    backend_store_uri: str,
    port: Optional[int] = None,
    log_path: Optional[Path] = None,
    timeout: float = 120.0,
    extra_args: tuple = (),
    cwd: Optional[Path] = None,
) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on 127.0.0.1 (one worker, no job runners) in `cwd`; returns the process and its URL
    once /health answers."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            backend_store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *extra_args,
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=cwd,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow ui exited with code {proc.returncode}" + (f"; see {log_path}" if log_path else "")
            )
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer {url}/health within {timeout:.0f} s")


def stop_ui(proc: subprocess.Popen) -> None:
    """The server and its uvicorn worker: the process group it leads."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


def pipeline_runs(backend_store_uri: str, experiment: str) -> tuple[str, str, list[str], Optional[str]]:
    """(experiment id, the latest parent run id, its eval children's run ids, the child whose lineage
    reaches furthest: a DPO run on generated pairs names its sampling and SFT runs, one on fixed pairs
    only its SFT run; None when no child names any)."""
    from mlflow import MlflowClient

    client = MlflowClient(backend_store_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {backend_store_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    parent = next((r.info.run_id for r in runs if r.info.run_id in parents), None)
    if parent is None:
        raise SystemExit(f"experiment {experiment!r} has no parent run (run `synpref reproduce` first)")
    evals = [
        r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent and "eval/win_rate" in r.data.metrics
    ]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    linked = (next((r.info.run_id for r in children if tag in r.data.tags), None) for tag in LINEAGE_TAGS)
    return exp.experiment_id, parent, evals, next((run for run in linked if run), None)


def capture(
    url: str,
    experiment_id: str,
    parent: str,
    evals: list[str],
    out: Optional[Path] = None,
    parent_name: Optional[str] = None,
    lineage: Optional[str] = None,
) -> dict[str, str]:
    """Visit the pages (screenshots into `out` if given); returns each page's visible text by key
    (runs, datasets, parent, replies, lineage, compare; lineage only with a `lineage` run, compare
    only with `evals`)."""
    from playwright.sync_api import sync_playwright

    from synpref.reporting.replies import REPLIES_TABLE

    texts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            # 1. The runs table, the parent expanded to show its stage runs.
            page.goto(f"{url}/#/experiments/{experiment_id}?{RUNS_VIEW}", timeout=120_000)
            link = page.locator(f'a[href$="/runs/{parent}"]').first
            link.wait_for(timeout=60_000)
            close_assistant(page)
            row = page.locator('[role="row"]', has=link)
            row.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
            page.locator('a[href*="/runs/"]').nth(1).wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            texts["runs"] = shoot(page, out, "mlflow_runs.png")
            # 1b. The Dataset column (shown by default in MLflow 3, 300 px wide: names cut off) sized
            # to its content by a double click on its header's resize handle, as a user would; a
            # training run's second dataset (validation, excluded prompts) needs the wide page.
            with widened(page):
                header = page.locator('[role="columnheader"][col-id="attributes.`Dataset`"]')
                header.hover()
                header.locator(".ag-header-cell-resize").dblclick(force=True)  # the handle shows on hover only
                page.wait_for_timeout(1000)
                texts["datasets"] = shoot(page, out, "mlflow_datasets.png")
            # 2. The parent run: description, params, the per-arm win rates.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{parent}?{RUNS_VIEW}", timeout=120_000)
            page.get_by_text("win_rate/", exact=False).first.wait_for(timeout=60_000)
            close_assistant(page)
            texts["parent"] = shoot(page, out, "mlflow_parent_run.png")
            # 2b. The parent's replies side by side: the artifact viewer renders an MLflow table
            # (mlflow.log_table's JSON) as a grid; on the wide page both arms' replies and verdicts
            # fit beside SFT's.
            page.goto(
                f"{url}/#/experiments/{experiment_id}/runs/{parent}/artifacts/{REPLIES_TABLE}?{RUNS_VIEW}",
                timeout=120_000,
            )
            # The table's toolbar, or what the viewer says when the run has no such file (then the
            # page is still shot, and its text tells the caller the table is missing).
            shown = ("View as table", "Select a file to preview", "No Artifacts Recorded")
            page.locator("body").get_by_text(re.compile("|".join(shown))).first.wait_for(timeout=60_000)
            close_assistant(page)
            with widened(page):
                page.wait_for_timeout(1000)
                texts["replies"] = shoot(page, out, "mlflow_replies.png")
            # 2c. A DPO run's page: its dataset inputs and the tags naming its SFT and sampling runs.
            if lineage:
                page.goto(f"{url}/#/experiments/{experiment_id}/runs/{lineage}?{RUNS_VIEW}", timeout=120_000)
                # Its run id shows once the run is loaded, with its inputs and tags (one GetRun).
                page.get_by_text(lineage, exact=True).first.wait_for(timeout=60_000)
                close_assistant(page)
                texts["lineage"] = shoot(page, out, "mlflow_lineage.png", full_page=True)
            # 3. The eval runs side by side.
            if evals:
                query = f"runs={json.dumps(evals)}&experiments={json.dumps([experiment_id])}&{RUNS_VIEW}"
                page.goto(f"{url}/#/compare-runs?{query}", timeout=120_000)
                page.get_by_text("eval/win_rate", exact=False).first.wait_for(timeout=60_000)
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # the plot, not its placeholder
                close_assistant(page)
                page.wait_for_timeout(1000)
                texts["compare"] = shoot(page, out, "mlflow_compare.png")
        finally:
            browser.close()
    return texts


def close_assistant(page) -> None:
    """The MLflow Assistant side panel covers a third of the page; close it if it is open."""
    page.wait_for_timeout(500)
    close = page.locator('button[aria-label="Close"]')
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


@contextmanager
def widened(page):
    """The page at WIDE_VIEWPORT with MLflow's sidebar folded, for tables wider than VIEWPORT; then
    as before (MLflow remembers the sidebar's state, so later pages would keep it folded)."""
    page.set_viewport_size(WIDE_VIEWPORT)
    page.get_by_role("button", name="Toggle sidebar").click()
    try:
        yield page
    finally:
        page.get_by_role("button", name="Toggle sidebar").click()
        page.set_viewport_size(VIEWPORT)


def shoot(page, out: Optional[Path], name: str, full_page: bool = False) -> str:
    if out is not None:
        page.screenshot(path=str(out / name), full_page=full_page)
    return page.inner_text("body")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="synpref-tiny")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    experiment_id, parent, evals, lineage = pipeline_runs(args.backend_store_uri, args.experiment)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, url = start_ui(args.backend_store_uri, log_path=out / "mlflow_ui.log")
    try:
        capture(url, experiment_id, parent, evals, out, lineage=lineage)
    finally:
        stop_ui(proc)
    (out / "mlflow_ui.log").unlink(missing_ok=True)
    print("\n".join(str(out / n) for n in SHOTS if (out / n).exists()))


if __name__ == "__main__":
    main()
