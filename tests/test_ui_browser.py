"""The try-it page in headless Chromium, against the real gunicorn server serving the trained demo bundle with API keys.

Screenshots go to a pytest temp dir (printed at the end) or UI_SCREENSHOTS_DIR; UI_DOCS_SCREENSHOT=1 also writes the
README's docs/ui.png.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from models.training.demo_data import CLASSES
from tests.helpers import REPO_ROOT, poll_readyz, reference_probabilities, start_server

pytestmark = pytest.mark.slow
KEY = "browser-test-key-0123456789"
WAIT_S = 60  # generous: the machine is shared
MAX_UPLOAD_MB = 1
MAX_IMAGE_PIXELS = 4_000_000
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "ui.png"
# WCAG 2 relative luminance and contrast of every visible text node against its nearest opaque background.
CONTRAST_PROBE = """
const channels = (css) => css.match(/[\\d.]+/g).map(Number);
const linear = (c) => (c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
const luminance = ([r, g, b]) => 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
const background = (element) => {
  for (let e = element; e; e = e.parentElement) {
    const c = channels(getComputedStyle(e).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
};
const found = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const element = walker.currentNode.parentElement;
  if (!walker.currentNode.textContent.trim() || !element.checkVisibility()) continue;
  const [a, b] = [luminance(channels(getComputedStyle(element).color)), luminance(background(element))];
  found.push([walker.currentNode.textContent.trim().slice(0, 40), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]);
}
return found;
"""
# A File in a DataTransfer, delivered the way a drop on the zone or a paste (Ctrl+V) delivers it.
DELIVER = """
const [name, type, encoded, how] = arguments;
const file = new File([Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0))], name, {type});
const data = new DataTransfer();
data.items.add(file);
const init = {bubbles: true, cancelable: true};
const event = how === "drop" ? new DragEvent("drop", {...init, dataTransfer: data})
                             : new ClipboardEvent("paste", {...init, clipboardData: data});
(how === "drop" ? document.getElementById("drop-zone") : document.body).dispatchEvent(event);
"""


@pytest.fixture(scope="module")
def ui_server(trained_bundle_path, tmp_path_factory):
    """The real server on the trained demo bundle, with API keys and small limits, ready."""
    server = start_server(
        trained_bundle_path,
        tmp_path_factory.mktemp("ui-server"),
        workers=1,
        API_KEYS=KEY,
        MAX_UPLOAD_MB=MAX_UPLOAD_MB,
        MAX_IMAGE_PIXELS=MAX_IMAGE_PIXELS,
    )
    try:
        poll_readyz(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def demo_image(training_data, trained_bundle_path) -> tuple[Path, str, dict[str, float]]:
    """A validation image the trained bundle classifies right: its path, class and the bundle's probabilities."""
    for name in sorted(CLASSES):
        for path in sorted((training_data / "val" / name).iterdir()):
            probabilities = reference_probabilities(trained_bundle_path, path.read_bytes())
            if sorted(CLASSES)[int(np.argmax(probabilities))] == name:
                return path, name, dict(zip(sorted(CLASSES), probabilities, strict=True))
    raise AssertionError("the trained bundle classifies no validation image right")


def api_error(url: str, name: str, data: bytes, content_type: str) -> dict:
    """The API's own error answer to this upload (sent as the browser sends it: multipart field `image`)."""
    files = {"image": (name, data, content_type)}
    response = requests.post(f"{url}/predict", files=files, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code >= 400, response.text
    return {"status": response.status_code, **response.json()["error"]}


def open_page(driver, url: str, key: str | None = KEY) -> None:
    """The page, fresh, with `key` in this tab's session storage (or none); waits for the model's description."""
    driver.get(f"{url}/")
    driver.execute_script(
        "sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('petclf.apiKey', arguments[0]);", key
    )
    driver.refresh()
    if key is not None:
        wait(driver, lambda d: d.find_element(By.ID, "model-facts").is_displayed())


def wait(driver, condition):
    return WebDriverWait(driver, WAIT_S).until(condition)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def wait_for_answer(driver) -> None:
    """Until the page shows a prediction or an error."""
    wait(driver, lambda d: text(d, "status").startswith("Prediction:") or d.find_element(By.ID, "error").is_displayed())


def bars(driver) -> list[tuple[str, str]]:
    """(class, percentage) of every bar, top to bottom."""
    items = driver.find_elements(By.CSS_SELECTOR, "#bars > li")
    return [
        (i.find_element(By.CLASS_NAME, "bar-label").text, i.find_element(By.CLASS_NAME, "bar-value").text)
        for i in items
    ]


def test_the_page_asks_for_the_key_then_describes_the_model(browser, ui_server):
    open_page(browser, ui_server.url, key=None)
    unauthorized = requests.get(f"{ui_server.url}/model", timeout=30).json()["error"]["message"]
    wait(browser, lambda d: unauthorized in text(d, "key-state"))
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"  # focus went to the key field

    browser.find_element(By.ID, "api-key").send_keys(KEY + Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "model-facts").is_displayed())
    info = requests.get(f"{ui_server.url}/model", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    facts = text(browser, "model-facts")
    assert info["name"] in facts and info["version"] in facts and ", ".join(info["class_names"]) in facts
    assert f"{100 * info['metrics']['val_acc']:.1f}%" in text(browser, "metrics")
    # The key lives in this tab's session storage only: no cookie, nothing in local storage, not in the field.
    assert browser.execute_script("return sessionStorage.getItem('petclf.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""


def test_a_demo_image_is_classified_and_explained(browser, ui_server, demo_image, screenshots):
    path, name, probabilities = demo_image
    open_page(browser, ui_server.url)
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait_for_answer(browser)
    assert text(browser, "predicted-class") == name
    expected = sorted(probabilities.items(), key=lambda item: -item[1])
    assert bars(browser) == [(label, f"{100 * p:.1f}%") for label, p in expected]  # every class, sorted
    assert text(browser, "status").startswith(f"Prediction: {name}, ")  # announced (aria-live)
    assert "Looks" in text(browser, "unknown")
    wait(browser, lambda d: d.find_element(By.ID, "heatmap").get_property("naturalWidth") > 0)
    assert browser.find_element(By.ID, "preview").get_property("naturalWidth") > 0
    assert name in text(browser, "heatmap-caption")

    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(url.startswith((ui_server.url, "data:", "blob:")) for url in loaded), loaded
    low = [(snippet, round(ratio, 2)) for snippet, ratio in browser.execute_script(CONTRAST_PROBE) if ratio < 4.5]
    assert not low, f"text below WCAG AA contrast 4.5:1: {low}"
    assert not [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    browser.save_screenshot(str(screenshots / "prediction.png"))
    if os.environ.get("UI_DOCS_SCREENSHOT") == "1":
        browser.save_screenshot(str(DOCS_SCREENSHOT))


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_dropped_or_pasted_image_is_classified(browser, ui_server, demo_image, how):
    path, name, _ = demo_image
    open_page(browser, ui_server.url)
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    browser.execute_script(DELIVER, path.name, "image/jpeg", encoded, how)
    wait_for_answer(browser)
    assert text(browser, "predicted-class") == name and len(bars(browser)) == len(CLASSES)


def noise_jpeg(size: int) -> bytes:
    """A real JPEG that compresses badly (noise): over a megabyte at 1000 px."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=95)
    return encoded.getvalue()


def flat_png(size: int) -> bytes:
    """A PNG of many pixels in few bytes."""
    encoded = io.BytesIO()
    Image.new("RGB", (size, size), (40, 120, 200)).save(encoded, format="PNG")
    return encoded.getvalue()


@pytest.mark.parametrize(
    ("name", "make", "code"),
    [
        ("notes.txt", lambda: b"these are not the pixels you are looking for\n", "invalid_image"),
        ("huge.jpg", lambda: noise_jpeg(1000), "payload_too_large"),  # over MAX_UPLOAD_MB
        ("wide.png", lambda: flat_png(2100), "image_too_large"),  # over MAX_IMAGE_PIXELS, in a few kilobytes
    ],
)
def test_a_bad_file_shows_the_apis_own_message(browser, ui_server, tmp_path, screenshots, name, make, code):
    data = make()
    path = tmp_path / name
    path.write_bytes(data)
    content_type = {"txt": "text/plain", "jpg": "image/jpeg", "png": "image/png"}[path.suffix[1:]]
    expected = api_error(ui_server.url, name, data, content_type)
    assert expected["code"] == code
    open_page(browser, ui_server.url)
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait_for_answer(browser)
    shown = text(browser, "error")
    assert expected["message"] in shown and f"{code}, HTTP {expected['status']}" in shown
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.save_screenshot(str(screenshots / f"error-{code}.png"))


def test_keyboard_reaches_every_control_with_a_visible_focus_and_a_name(browser, ui_server):
    open_page(browser, ui_server.url)
    zone = browser.find_element(By.ID, "drop-zone")
    assert zone.value_of_css_property("outline-style") == "none"
    reached = []
    for _ in range(12):  # Tab from the top of the page until the file input (the drop zone's control) has focus
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.switch_to.active_element.get_attribute("id"))
        if reached[-1] == "file":
            break
    assert reached[-1] == "file", reached
    assert zone.value_of_css_property("outline-style") == "solid"  # the label shows the input's focus
    assert float(zone.value_of_css_property("outline-width").removesuffix("px")) >= 2
    nameless = browser.execute_script(
        "return [...document.querySelectorAll('input, button, img')].filter((e) =>"
        " !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.alt && !e.textContent.trim())"
        ".map((e) => e.outerHTML)"
    )
    assert not nameless, nameless
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
