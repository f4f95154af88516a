"""The tracking guide's MLflow screenshot (docs/guides/tracking.md): a real `mlflow server` (SQLite, loopback), a short SmolLM2 sweep
tracked into it (one parent run, one child per trial), and headless Chromium photographing the UI.

    python bench/tracking_screenshot.py [--out docs/mlflow-sweep.png] [--steps 6]

Needs Debian's chromium (`apt-get install chromium`) and `pip install playwright` (driving that
browser: no browser download); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.config import load_config  # noqa: E402
from tests.subprocesses import free_port  # noqa: E402
from tune.sweep import sweep  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    server = subprocess.Popen(cmd, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start:\n" + (root / "server.log").read_text())


def screenshot(url: str, out: Path) -> None:
    """The runs page in chart mode, the sweep's parent run expanded to show its trials."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.wait_for_timeout(5000)
        page.get_by_role("button", name="Close").first.click()  # the assistant side panel
        page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()  # expand the parent
        page.wait_for_timeout(4000)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow-sweep.png")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-mlflow-"))
    server, url = start_server(work)
    try:
        run = load_config(REPO / "configs" / "demo.yaml", [
            f"training.max_steps={args.steps}", "training.eval_steps=2", "training.logging_steps=1", "data.demo_rows=120",
            f"training.output_dir={work / 'train'}", f"ray.storage_path={work / 'ray'}", "ray.resources_per_worker={CPU: 1}",
            f"tune.output_dir={work / 'demo-sweep'}", "tune.search_alg=grid", "tune.scheduler=fifo", "tune.max_concurrent_trials=2",
            "tune.space={training.learning_rate: {grid: [1.0e-3, 3.0e-4, 1.0e-4]}}",
            "tracking.backends=[mlflow]", f"tracking.mlflow_tracking_uri={url}", "tracking.mlflow_experiment=demo-sweep",
        ])
        outcome = sweep(run)
        print(outcome.summary_md)
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(url).get_experiment_by_name("demo-sweep")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(f"{url}/#/experiments/{experiment.experiment_id}/runs?compareRunsMode=CHART", args.out)
        print(f"screenshot: {args.out} ({args.out.stat().st_size} bytes)")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
