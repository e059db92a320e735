"""Screenshots of the MLflow UI over a synpref store, taken by headless Chromium through Playwright.

    python docs/screenshots.py --backend-store-uri sqlite:///mlflow.db --experiment synpref-tiny --out docs

Starts `mlflow ui` on 127.0.0.1, opens the experiment's runs table with the pipeline's parent run
expanded, the parent run's page and the compare view of its eval runs, and saves
mlflow_runs.png, mlflow_parent_run.png and mlflow_compare.png. Needs Debian's Chromium
(`apt-get install -y chromium`, /usr/bin/chromium) and `pip install playwright` (its own
browser download is not used). tests/test_mlflow_ui.py runs the same flow.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def pipeline_runs(backend_store_uri: str, experiment: str) -> tuple[str, str, list[str]]:
    """(experiment id, the latest parent run id, its eval children's run ids)."""
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
    return exp.experiment_id, parent, evals


def capture(
    url: str,
    experiment_id: str,
    parent: str,
    evals: list[str],
    out: Optional[Path] = None,
    parent_name: Optional[str] = None,
) -> dict[str, str]:
    """Visit the three pages (screenshots into `out` if given); returns each page's visible text."""
    from playwright.sync_api import sync_playwright

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
            # 2. The parent run: description, params, the per-arm win rates.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{parent}?{RUNS_VIEW}", timeout=120_000)
            page.get_by_text("win_rate/", exact=False).first.wait_for(timeout=60_000)
            close_assistant(page)
            texts["parent"] = shoot(page, out, "mlflow_parent_run.png")
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


def shoot(page, out: Optional[Path], name: str) -> str:
    if out is not None:
        page.screenshot(path=str(out / name))
    return page.inner_text("body")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="synpref-tiny")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    experiment_id, parent, evals = pipeline_runs(args.backend_store_uri, args.experiment)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, url = start_ui(args.backend_store_uri, log_path=out / "mlflow_ui.log")
    try:
        capture(url, experiment_id, parent, evals, out)
    finally:
        stop_ui(proc)
    (out / "mlflow_ui.log").unlink(missing_ok=True)
    print("\n".join(str(out / n) for n in ("mlflow_runs.png", "mlflow_parent_run.png", "mlflow_compare.png")))


if __name__ == "__main__":
    main()
