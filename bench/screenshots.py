"""Screenshots of the web page: every view at desktop (1280 px) and phone (375 px) width, for the README.

    .venv/bin/python bench/screenshots.py                      # into bench/results/screenshots/
    .venv/bin/python bench/screenshots.py /tmp/shots           # or a folder of your choice

It starts a stack of its own (tests/integration/harness.py: a Redis server, the training and dataset workers and
uvicorn, with an API key), seeds it through the API (an uploaded 3-class dataset of CIFAR-10 test images, two
small baseline models with the alias `default` on one, a transfer job that fails for want of weights, and a job
that is still training while the Jobs view is shot), then drives Debian's chromium (`/usr/bin/chromium`, through
Playwright; no browser is downloaded) over the page and writes, for each view and width:

    <view>-<width>.png        what the screen shows (1280x900 or 375x812)
    <view>-<width>-full.png   the whole page

Views: key (the prompt), jobs, models (with a comparison), datasets, classify (four images classified).
Needs CIFAR-10 (TL_DATA_DIR, else ../shared/data); about two minutes on 2 CPU cores. Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ROOT, png, shared_dir, start_stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTHS = {1280: 900, 375: 812}
DEFAULT_OUT = ROOT / "bench" / "results" / "screenshots"
TERMINAL = {"succeeded", "failed", "cancelled"}
#: The uploaded dataset: CIFAR-10 test images of three classes, under names of our own.
DATASET_CLASSES = {"planes": 0, "cats": 3, "ships": 8}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- seeding the stack through the API -----

def wait_job(client: httpx.Client, job_id: str, until: Any = None, timeout: float = 600) -> dict[str, Any]:
    until = until or (lambda job: job["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: {job['status']} after {timeout:.0f} s")
        time.sleep(0.5)


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    response.raise_for_status()
    return dict(response.json())


def dataset_zip(per_class: int = 20) -> bytes:
    with np.load(shared_dir("data") / "cifar10" / "test.npz") as data:
        x, y = data["x"], data["y"].reshape(-1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, label in DATASET_CLASSES.items():
            for i, index in enumerate(np.flatnonzero(y == label)[:per_class]):
                archive.writestr(f"{name}/{i:02d}.png", png(x[index]))
        archive.writestr("cats/readme.txt", b"not an image")
    return buffer.getvalue()


def seed(client: httpx.Client) -> dict[str, Any]:
    """The dataset, two models, a failed job; returns their ids."""
    log("uploading a dataset ...")
    response = client.post("/v1/datasets", files={"file": ("three-classes.zip", dataset_zip())})
    response.raise_for_status()
    dataset_id = response.json()["id"]
    log("training two small models and a job that fails ...")
    first = submit(client, {"model": "baseline", "train_samples": 1000, "test_samples": 300, "epochs": 6,
                            "seed": 1, "name": "cnn-1k"})
    second = submit(client, {"model": "baseline", "train_samples": 3000, "test_samples": 300, "epochs": 6,
                             "seed": 1, "name": "cnn-3k"})
    failing = submit(client, {"model": "transfer", "train_samples": 500, "test_samples": 200, "epochs": 2,
                              "alpha": 0.35, "name": "narrow-transfer"})
    models = []
    for job in (first, second):
        done = wait_job(client, job["id"])
        if done["status"] != "succeeded":
            raise RuntimeError(f"seed job failed: {done['error']}")
        models.append(done["model_id"])
    wait_job(client, failing["id"])
    client.put("/v1/aliases/default", json={"model_id": models[1]}).raise_for_status()
    client.put("/v1/aliases/small", json={"model_id": models[0]}).raise_for_status()
    dataset = {"status": "processing"}
    deadline = time.monotonic() + 120
    while dataset["status"] == "processing" and time.monotonic() < deadline:
        dataset = client.get(f"/v1/datasets/{dataset_id}").json()
        time.sleep(0.5)
    return {"models": models, "dataset": dataset_id}


# ----- the browser -----

def shoot(page: Any, out: Path, name: str) -> None:
    page.wait_for_timeout(300)  # let the last layout and image decode settle
    page.screenshot(path=str(out / f"{name}.png"))
    page.screenshot(path=str(out / f"{name}-full.png"), full_page=True)
    log(f"  {name}.png")


def wait_images(page: Any) -> None:
    """Every image of the visible view loaded (they load as they scroll into view: scroll through first)."""
    page.evaluate("""async () => {
        for (const img of document.querySelectorAll('section.view:not([hidden]) img')) {
            img.scrollIntoView();
            await new Promise((r) => setTimeout(r, 50));
        }
        window.scrollTo(0, 0);
    }""")
    page.wait_for_function("""() => Array.from(document.querySelectorAll('section.view:not([hidden]) img'))
        .every((img) => img.complete && img.naturalWidth > 0)""", timeout=30_000)
    page.evaluate("window.scrollTo(0, 0)")


def run_browser(base_url: str, api_key: str, out: Path, seeded: dict[str, Any], running_job: str) -> None:
    from playwright.sync_api import sync_playwright

    with np.load(shared_dir("data") / "cifar10" / "test.npz") as data:
        pictures = [png(data["x"][i]) for i in (3, 10, 21, 42)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for width, height in WIDTHS.items():
                log(f"{width} px:")
                context = browser.new_context(viewport={"width": width, "height": height})
                page = context.new_page()
                page.goto(f"{base_url}/")
                page.get_by_role("dialog").wait_for()
                shoot(page, out, f"key-{width}")
                page.get_by_role("dialog").get_by_label("Key", exact=True).fill(api_key)
                page.get_by_role("button", name="Use key").click()

                page.locator(f"#job-{running_job} svg.chart").first.wait_for()
                page.locator("#job-list > li").nth(3).wait_for()
                shoot(page, out, f"jobs-{width}")

                page.goto(f"{base_url}/#models")
                form = page.locator("#compare-form")
                form.locator("select[name=a]").select_option(seeded["models"][0])
                form.locator("select[name=b]").select_option(seeded["models"][1])
                form.get_by_role("button", name="Compare").click()
                wait_images(page)
                shoot(page, out, f"models-{width}")

                page.goto(f"{base_url}/#datasets")
                page.locator(f"#dataset-{seeded['dataset']} img").wait_for()
                wait_images(page)
                shoot(page, out, f"datasets-{width}")

                page.goto(f"{base_url}/#classify")
                page.locator("#classify-files").set_input_files([
                    {"name": f"cifar-test-{i}.png", "mimeType": "image/png", "buffer": picture}
                    for i, picture in enumerate(pictures)])
                page.locator("#predictions .label").nth(len(pictures) - 1).wait_for()
                shoot(page, out, f"classify-{width}")
                context.close()
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"needs Debian's chromium at {CHROMIUM}: apt-get install chromium")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from tests.integration.harness import API_KEY

    log("starting a stack ...")
    stack = start_stack()
    try:
        with stack.client() as client:
            seeded = seed(client)
            # Still training while the Jobs view is shot: a few epochs done, more to come.
            running = submit(client, {"model": "baseline", "train_samples": 5000, "test_samples": 500,
                                      "epochs": 60, "seed": 3, "name": "cnn-5k-long"})
            wait_job(client, running["id"], until=lambda job: len(job["history"]) >= 4 or job["status"] in TERMINAL)
            run_browser(stack.base_url, API_KEY, out, seeded, running["id"])
            client.post(f"/v1/jobs/{running['id']}/cancel", json={})
    finally:
        stack.stop()
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
