"""The web page in a real browser (Debian's chromium driven by Playwright) against the live stack.

Each test loads `/` as a person would: the key prompt, a job started from the form and followed live, a dataset
uploaded with its progress bar, images dropped on a model. Every test also checks what the browser saw: no
console error and no uncaught exception, and no request to anything but the stack's own host. The only console
messages allowed are Chromium's "Failed to load resource: ... 401" lines for /v1 requests sent before the key
was given (the page learns that the service has a key from that 401).

The browser is the system's `/usr/bin/chromium` (`.ci/run` installs it when missing); Playwright never
downloads one. Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import base64
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import testkit

from .harness import API_KEY, Stack, png_bytes, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
#: No GPU, no sandbox (root in a container), and nothing of Chromium's own that would call out to the internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
#: The job the form starts: small enough for 2 CPU cores.
FORM_JOB = {"train_samples": "200", "test_samples": "100", "epochs": "2", "name": "ui-form-baseline"}
#: The uploaded dataset: three CIFAR-10 classes (their index in CIFAR-10) under names of our own.
UPLOAD_CLASSES = {"planes": 0, "cats": 3, "ships": 8}
IMAGES_PER_CLASS = 10
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev group: make install)")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watched:
    """A page and what it did: console errors, uncaught exceptions, every URL it requested."""

    page: Any
    base_url: str
    errors: list[str] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def on_console(self, message: Any) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "")
        if "status of 401" in message.text and url.startswith(f"{self.base_url}/v1/"):
            self.unauthorized.append(url)
        else:
            self.errors.append(f"console error: {message.text} ({url})")

    def assert_clean(self) -> None:
        """No console error or uncaught exception; no request left the stack's host."""
        assert self.errors == []
        host = urlsplit(self.base_url).netloc
        elsewhere = [url for url in self.requests
                     if urlsplit(url).scheme not in ("blob", "data") and urlsplit(url).netloc != host]
        assert elsewhere == []
        assert self.requests, "the page made no request at all"


def open_page(browser: Any, stack: Stack, *, key: str | None = API_KEY, width: int = 1280) -> tuple[Any, Watched]:
    """A fresh tab on `/`; with `key`, the tab already holds it (as after the prompt)."""
    context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    if key is not None:
        context.add_init_script(f"sessionStorage.setItem('tl-api-key', {key!r})")
    page = context.new_page()
    watched = Watched(page, stack.base_url)
    page.on("console", watched.on_console)
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))
    page.on("request", lambda request: watched.requests.append(request.url))
    page.goto(f"{stack.base_url}/")
    return context, watched


@pytest.fixture
def tab(browser: Any, stack: Stack) -> Iterator[Watched]:
    context, watched = open_page(browser, stack)
    try:
        yield watched
    finally:
        context.close()


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def show(page: Any, view: str) -> None:
    page.get_by_role("navigation").get_by_role("link", name=view).click()
    expect(page.get_by_role("heading", level=2, name=view)).to_be_visible()


# ----- the key -----

def test_the_page_asks_for_the_key_once_says_when_it_is_wrong_then_shows_the_lists(browser: Any,
                                                                                   stack: Stack) -> None:
    context, watched = open_page(browser, stack, key=None)
    page = watched.page
    try:
        dialog = page.get_by_role("dialog", name="API key")
        expect(dialog).to_be_visible()
        dialog.get_by_label("Key", exact=True).fill("not-the-key")
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_contain_text("not accepted")
        expect(dialog).to_be_visible()
        dialog.get_by_label("Key", exact=True).fill(API_KEY)
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()

        # The lists came with the key: datasets (the built-in one at least) in the job form, jobs, models.
        expect(page.locator("#job-dataset option[value=cifar10]")).to_have_count(1)
        show(page, "Datasets")
        expect(page.locator("#dataset-cifar10")).to_contain_text("10 classes")
        show(page, "Models")
        expect(page.locator("#model-list > li, #models-empty:not([hidden])").first).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('tl-api-key')") == API_KEY

        # Kept for the tab: a reload asks nothing (and stays on its view).
        page.reload()
        expect(page.get_by_role("heading", level=2, name="Models")).to_be_visible()
        expect(page.locator("#job-dataset option[value=cifar10]")).to_have_count(1)
        expect(dialog).to_be_hidden()
        assert watched.unauthorized, "the first /v1 request should have met the 401 that made the page ask"
        watched.assert_clean()
    finally:
        context.close()


# ----- jobs -----

#: Records every state of the first job card the page shows (it is re-rendered on each SSE event).
RECORD_JOB_CARDS = """() => {
  window.seenJobStates = [];
  const list = document.getElementById('job-list');
  const note = () => {
    const card = list.querySelector('li.job');
    if (!card) return;
    const progress = card.querySelector('progress');
    window.seenJobStates.push({
      id: card.id, status: card.querySelector('.badge').textContent,
      stage: card.querySelector('.progress-row label').textContent, fraction: progress ? progress.value : null,
      points: card.querySelectorAll('svg.chart')[0] ? card.querySelectorAll('svg.chart')[0]
        .querySelectorAll('.s-train circle').length : 0,
    });
  };
  new MutationObserver(note).observe(list, {childList: true, subtree: true});
}"""


def test_a_job_started_from_the_form_updates_live_and_its_model_can_be_managed(tab: Watched, stack: Stack,
                                                                              realdata: None) -> None:
    page = tab.page
    expect(page.locator("#job-dataset option[value=cifar10]")).to_have_count(1)
    page.evaluate("window.notReloaded = true")
    page.evaluate(RECORD_JOB_CARDS)
    form = page.locator("#job-form")
    form.get_by_role("combobox", name="Model", exact=True).select_option("baseline")
    form.get_by_role("combobox", name="Dataset", exact=True).select_option("cifar10")
    for label, name in (("Epochs", "epochs"), ("Train samples", "train_samples"), ("Test samples", "test_samples"),
                        ("Name", "name")):
        form.get_by_label(label, exact=True).fill(FORM_JOB[name])
    form.get_by_role("button", name="Start job").click()

    card = page.locator("#job-list > li.job", has_text=FORM_JOB["name"])
    expect(card).to_have_count(1)
    expect(card.locator(".badge")).to_have_text("succeeded", timeout=300_000)
    expect(card.locator("svg.chart").first.locator(".s-train circle")).to_have_count(2)
    expect(card.locator("svg.chart").nth(1).locator(".s-test circle")).to_have_count(2)
    expect(card).to_contain_text("Test accuracy")
    assert page.evaluate("window.notReloaded") is True

    states = [s for s in page.evaluate("window.seenJobStates") if s["id"] == card.get_attribute("id")]
    assert any(s["status"] == "running" for s in states), states
    # The curves grew while the job ran: one point after the first epoch, before the job ended.
    assert any(s["points"] == 1 and s["status"] == "running" for s in states), states
    fractions = [s["fraction"] for s in states]
    assert fractions == sorted(fractions) and 0 < min(f for f in fractions if f) < 1 <= max(fractions), fractions
    assert any("epoch 1 of 2" in s["stage"] for s in states), states

    # The job's model: card with its figures, an alias set and removed, a download, then deleted.
    card.get_by_role("link", name="Open its model").click()
    expect(page.get_by_role("heading", level=2, name="Models")).to_be_visible()
    model_id = card_model_id(page, FORM_JOB["name"])
    model = page.locator(f"#model-{model_id}")
    expect(model).to_contain_text("Test accuracy")
    expect(model).to_contain_text("Macro F1")
    for image in (model.get_by_role("img", name=re.compile("Training curves")),
                  model.get_by_role("img", name=re.compile("Confusion matrix"))):
        image.scroll_into_view_if_needed()
        expect(image).to_have_attribute("src", re.compile(r"^blob:"))
        wait_for(lambda image=image: image.evaluate("img => img.complete && img.naturalWidth > 0"), 10,
                 what="the PNG to be shown")

    model.get_by_label("Set or move alias").fill("ui-test")
    model.get_by_role("button", name="Set", exact=True).click()
    expect(model.locator(".chip", has_text="ui-test")).to_have_count(1)
    with stack.client() as client:
        assert client.get("/v1/models/ui-test").json()["id"] == model_id
    model.get_by_role("button", name="Remove alias ui-test").click()
    expect(model.locator(".chip", has_text="ui-test")).to_have_count(0)

    with page.expect_download() as download:
        model.get_by_role("button", name=re.compile(r"^keras")).click()
    assert download.value.suggested_filename.endswith(".keras")

    page.once("dialog", lambda dialog: dialog.accept())
    model.get_by_role("button", name="Delete").click()
    expect(page.locator(f"#model-{model_id}")).to_have_count(0)
    with stack.client() as client:
        assert client.get(f"/v1/models/{model_id}").status_code == 404
    tab.assert_clean()


def test_a_failed_job_says_why_and_a_running_one_can_be_cancelled(tab: Watched, stack: Stack,
                                                                    realdata: None) -> None:
    page = tab.page
    expect(page.locator("#job-dataset option[value=cifar10]")).to_have_count(1)
    # A transfer job from the advanced fold, at a width no weights are given for: it fails, saying so.
    form = page.locator("#job-form")
    form.get_by_role("combobox", name="Model", exact=True).select_option("transfer")
    form.get_by_label("Epochs", exact=True).fill("1")
    form.get_by_label("Train samples", exact=True).fill("100")
    form.get_by_label("Test samples", exact=True).fill("100")
    form.get_by_label("Name", exact=True).fill("ui-narrow")
    form.get_by_text("Advanced").click()
    form.get_by_role("combobox", name="Width (alpha)").select_option("0.35")
    form.get_by_role("button", name="Start job").click()
    failed = page.locator("#job-list > li.job", has_text="ui-narrow")
    expect(failed.locator(".badge")).to_have_text("failed", timeout=180_000)
    expect(failed.locator(".job-error")).to_contain_text("WeightsNotFound")
    expect(failed.locator(".job-error")).to_contain_text("0.35")
    expect(failed.get_by_role("button", name="Cancel")).to_have_count(0)

    # A long job started elsewhere shows up, and its Cancel button stops it.
    with stack.client() as client:
        response = client.post("/v1/jobs", json={"model": "baseline", "train_samples": 5000, "test_samples": 100,
                                                 "epochs": 200, "name": "ui-long"})
        assert response.status_code == 202, response.text
    page.get_by_role("button", name="Refresh").first.click()
    long = page.locator("#job-list > li.job", has_text="ui-long")
    long.get_by_role("button", name="Cancel").click()
    expect(long.locator(".badge")).to_have_text(re.compile("cancell(ing|ed)"))
    expect(long.locator(".badge")).to_have_text("cancelled", timeout=120_000)
    tab.assert_clean()


def card_model_id(page: Any, name: str) -> str:
    element_id = page.locator("#model-list > li", has_text=name).first.get_attribute("id")
    assert element_id and element_id.startswith("model-"), element_id
    return str(element_id.removeprefix("model-"))


# ----- datasets -----

def three_class_zip(path: Path) -> Path:
    """Class folders of real CIFAR-10 test images as PNGs: 10 per class."""
    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, label in UPLOAD_CLASSES.items():
            for i, index in enumerate(np.flatnonzero(y == label)[:IMAGES_PER_CLASS]):
                archive.writestr(f"{name}/{i:02d}.png", png_bytes(x[index]))
        archive.writestr("cats/notes.txt", b"not an image")
    return path


def test_an_uploaded_dataset_shows_upload_progress_then_its_counts_and_preview(tab: Watched, stack: Stack,
                                                                             realdata: None, tmp_path: Path) -> None:
    page = tab.page
    archive = three_class_zip(tmp_path / "ui-three.zip")
    show(page, "Datasets")
    form = page.locator("#dataset-form")
    form.get_by_label("Archive").set_input_files(str(archive))
    form.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-text")).to_contain_text("uploaded")
    assert page.locator("#upload-progress").evaluate("bar => bar.value") == 1

    card = page.locator("#dataset-list > li", has_text="ui-three")
    expect(card.locator(".badge")).to_have_text("ready", timeout=120_000)
    dataset_id = str(card.get_attribute("id")).removeprefix("dataset-")
    with stack.client() as client:
        dataset = client.get(f"/v1/datasets/{dataset_id}").json()
    counts = dataset["counts"]
    assert sorted(counts["train"]) == sorted(UPLOAD_CLASSES)
    for name in UPLOAD_CLASSES:
        row = card.locator("tbody tr", has=page.get_by_role("rowheader", name=name, exact=True))
        expect(row.locator("td")).to_have_text([str(counts["train"][name]), str(counts["test"][name])])
    expect(card).to_contain_text(f"3 classes: {sum(counts['train'].values())} train, "
                                 f"{sum(counts['test'].values())} test images")
    expect(card).to_contain_text("1 file skipped")
    preview = card.get_by_role("img", name=re.compile("A few images"))
    preview.scroll_into_view_if_needed()
    expect(preview).to_have_attribute("src", re.compile(r"^blob:"))
    # It is offered to the job form.
    expect(page.locator(f"#job-dataset option[value='{dataset_id}']")).to_have_count(1)
    tab.assert_clean()


# ----- classify -----

def test_images_dropped_or_picked_on_a_model_get_a_label_and_a_top_3(tab: Watched, stack: Stack,
                                                                     baseline_job: dict[str, Any]) -> None:
    page = tab.page
    model_id = baseline_job["model_id"]
    show(page, "Classify")
    page.locator("#classify-model").select_option(model_id)
    with np.load(testkit.cifar10_npz("test")) as data:
        images = [png_bytes(data["x"][i]) for i in range(3)]

    drop = page.evaluate_handle("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        return transfer;
    }""", ["dropped.png", base64.b64encode(images[0]).decode()])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
    dropped = page.locator("#predictions > li", has_text="dropped.png")
    expect(dropped.locator(".label")).to_have_count(1)
    assert dropped.locator(".label").text_content() in CIFAR10_NAMES
    expect(dropped.locator(".topk > li")).to_have_count(3)

    page.locator("#classify-files").set_input_files([
        {"name": f"picked-{i}.png", "mimeType": "image/png", "buffer": image} for i, image in enumerate(images[1:])])
    for i in range(2):
        picked = page.locator("#predictions > li", has_text=f"picked-{i}.png")
        expect(picked.locator(".label")).to_have_count(1)
        assert picked.locator(".label").text_content() in CIFAR10_NAMES
        widths = picked.locator(".bar-fill").evaluate_all("bars => bars.map(b => parseFloat(b.style.width))")
        assert widths == sorted(widths, reverse=True) and 0 < widths[0] <= 100, widths

    # The same answer as the API's own for that image.
    with stack.client() as client:
        answer = client.post(f"/v1/models/{model_id}/predict", files={"file": ("x.png", images[0], "image/png")})
    assert answer.status_code == 200
    assert dropped.locator(".label").text_content() == answer.json()["predictions"][0]["label"]
    tab.assert_clean()


def test_the_page_reads_at_phone_width_without_sideways_scrolling(browser: Any, stack: Stack) -> None:
    context, watched = open_page(browser, stack, width=375)
    page = watched.page
    try:
        # Keyboard: the first Tab reaches the skip link, then the views (links, in the tab order).
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Jobs")).to_be_focused()
        for view in ("Jobs", "Models", "Datasets", "Classify"):
            show(page, view)
            page.wait_for_load_state("networkidle")
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{view} is {overflow} px wider than a 375 px screen"
        page.keyboard.press("Enter")  # on the Classify link: it stays on its view
        expect(page.get_by_role("heading", level=2, name="Classify")).to_be_visible()
        watched.assert_clean()
    finally:
        context.close()
