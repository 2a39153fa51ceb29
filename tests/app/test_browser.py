"""A real browser on the page: headless Chromium (Debian's, driven by its chromedriver through Selenium) uploads a
photograph, asks, reads the answer ``LlavaUHD.generate`` gives and finds the gate heatmap; bad input shows a message.

``make test`` installs Chromium on a fresh machine; in CI (``CI=true``) a missing browser fails the test instead of
skipping it. The test saves a full-page screenshot (``LLAVA_UHD_APP_SCREENSHOT=PATH`` also writes it to PATH; the
README's is made that way: ``docs/app/screenshot.png``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import reference_answer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")
QUESTIONS = ("What is the building?", "What is in the picture?", "How many floors?", "Tell me a story.",
             "Describe the image.", "Is it sunny?", "Where was this taken?", "Name the place.")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing = f"{CHROMIUM} and {CHROMEDRIVER} (Debian's chromium, chromium-driver; `make test` installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test needs {missing}")
        pytest.skip(f"needs {missing}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def plain_question(model, photo: Path) -> tuple[str, str]:
    """A question whose answer on this tiny random model is plain text (no markdown, no stray bytes), so the text the
    page renders must be the very answer ``generate`` gives."""
    for question in QUESTIONS:
        answer = reference_answer(model, photo, question)
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ,.'?!]*[A-Za-z0-9.?!]", answer) and "  " not in answer:
            return question, answer
    pytest.fail("no candidate question gets a plain-text answer from the tiny model; add candidates")


def bot_text(driver) -> str:
    messages = driver.find_elements(By.CSS_SELECTOR, "#chatbot .message.bot")
    return messages[-1].text.strip() if messages else ""


def wait_for(driver, condition, what: str, timeout: float = 120):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; the answer reads {bot_text(driver)!r}") from None


def full_page_screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 4000))
    driver.save_screenshot(str(path))


def test_browser_uploads_asks_and_reads_the_answer(browser, app_url, reference_model, photo, tmp_path):
    question, expected = plain_question(reference_model, photo)
    browser.get(app_url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"), "the page")
    upload.send_keys(str(photo))
    heatmap = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#gate-heatmap img"), "the heatmap")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap),
             "the heatmap to load")
    assert browser.find_element(By.CSS_SELECTOR, "#token-grid img").get_attribute("src")
    wait_for(browser, lambda d: "ViT-UHD (mlp, 16x)" in d.find_element(By.ID, "encoder-costs").text, "the costs")

    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    wait_for(browser, lambda d: bot_text(d) == expected, f"the answer {expected!r}")
    figures = wait_for(browser, lambda d: d.find_element(By.ID, "figures-line").text, "the request's figures")
    assert "54 image tokens" in figures and "TTFT" in figures and "encoder" in figures

    shot = tmp_path / "app.png"
    full_page_screenshot(browser, shot)
    assert shot.stat().st_size > 50_000
    if os.environ.get("LLAVA_UHD_APP_SCREENSHOT"):
        target = Path(os.environ["LLAVA_UHD_APP_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    origin = "{0.scheme}://{0.netloc}".format(urlsplit(app_url))
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith((origin, "data:", "blob:")) for url in loaded), loaded  # nothing else


def test_bad_upload_shows_a_message_and_the_page_keeps_working(browser, app_url, tmp_path):
    junk = tmp_path / "holiday.jpg"
    junk.write_bytes(b"this is a text file with an image's name")
    browser.get(app_url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"), "the page")
    upload.send_keys(str(junk))
    wait_for(browser, lambda d: "holiday.jpg: not an image file" in d.find_element(By.TAG_NAME, "body").text,
             "the message about the bad file", timeout=60)
