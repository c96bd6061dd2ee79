"""finealign serve and finealign report in a real browser: headless Chromium (Debian's ``chromium`` +
``chromium-driver``, .ci/run installs them) driven by Selenium. The server is the real CLI
(``python -m finealign serve``) on a free port. Screenshots go to the test's tmp dir (and to
$FINEALIGN_SCREENSHOTS when set: that is how docs/img/serve.png and report.png are made).

Without the browser, the driver or selenium every test here skips, naming what is missing."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_serve import shared_trained_run, write_gallery

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)


def _missing() -> str | None:
    from importlib.util import find_spec
    if find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    lacking = [m for m in ("fastapi", "uvicorn", "multipart") if find_spec(m) is None]
    if lacking:
        return f"the serve extra is not installed (no {', '.join(lacking)}; pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no Chromium binary (apt-get install chromium chromium-driver; .ci/run does)"
    if DRIVER is None:
        return "no chromedriver (apt-get install chromium-driver; .ci/run does)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        pytest.skip(f"BROWSER TESTS NOT RUN: {why}")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1200,1000", "--allow-file-access-from-files"):
        opts.add_argument(a)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except WebDriverException as e:
        pytest.skip(f"BROWSER TESTS NOT RUN: {CHROMIUM} with {DRIVER} did not start: {e.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if _missing():
        pytest.skip(f"BROWSER TESTS NOT RUN: {_missing()}")
    root = tmp_path_factory.mktemp("browser")
    run = shared_trained_run(tmp_path_factory)
    write_gallery(run, root / "gallery")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finealign", "serve", str(run), "--gallery", str(root / "gallery"),
                             "--port", str(port), "--cache", str(root / "cache")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "api/info", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {(root / 'server.log').read_text()}") from None
                time.sleep(0.3)
        yield {"url": url, "root": root, "run": run}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _wait(driver, cond, what, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(cond, message=f"waiting for {what}")


def _screenshot(driver, tmp_path, name, max_height=1800):
    """The page down to max_height px (the window is stretched for the shot, then put back)."""
    path = tmp_path / name
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(height + 140, size["height"]), max_height))
    try:
        assert driver.save_screenshot(str(path)), f"screenshot {path} not written"
    finally:
        driver.set_window_size(size["width"], size["height"])
    if os.environ.get("FINEALIGN_SCREENSHOTS"):
        out = Path(os.environ["FINEALIGN_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    assert path.stat().st_size > 10_000
    return path


def test_page_search_upload_caption_relevance(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    d.get(server["url"])
    _wait(d, lambda d: "gallery: 8 images" in d.find_element(By.ID, "info").text, "model info")
    d.find_element(By.ID, "query").send_keys("a large red circle in the center")
    d.find_element(By.ID, "search-button").click()
    _wait(d, lambda d: d.find_element(By.ID, "search-results").get_attribute("data-done") == "1", "search results")
    imgs = d.find_elements(By.CSS_SELECTOR, "#search-results img")
    assert len(imgs) == 8
    _wait(d, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#search-results img')].every(i => i.complete && i.naturalWidth > 0)"),
        "gallery images to render")
    assert "#1 " in d.find_element(By.CSS_SELECTOR, "#search-results figcaption").text

    d.find_element(By.ID, "file").send_keys(str(server["root"] / "gallery" / "06.png"))
    d.find_element(By.ID, "rel-text").send_keys("a large red circle")
    d.find_element(By.ID, "upload-button").click()
    _wait(d, lambda d: d.find_element(By.ID, "relevance-box").get_attribute("data-done") == "1"
          or d.find_element(By.ID, "upload-error").text, "caption and relevance")
    assert d.find_element(By.ID, "upload-error").text == ""
    captions = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#captions li")]
    closest = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#closest li")]
    assert len(captions) == 1 and captions[0].strip()
    assert len(closest) == 5 and all(c.strip() for c in closest)
    assert "caption decoder" in d.find_element(By.ID, "captioner").text
    assert d.execute_script("const i = document.getElementById('relevance-img'); "
                            "return i.complete && i.naturalWidth === 256")
    assert d.execute_script("const i = document.getElementById('preview'); return i.complete && i.naturalWidth > 0")
    _screenshot(d, tmp_path, "serve.png")


def test_bad_upload_shows_the_servers_message(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    d = browser
    d.get(server["url"])
    d.find_element(By.ID, "file").send_keys(str(bad))
    d.find_element(By.ID, "upload-button").click()
    _wait(d, lambda d: d.find_element(By.ID, "upload-error").text, "the error message")
    assert d.find_element(By.ID, "upload-error").text.startswith("415: notes.png: not an image")


def test_report_renders_all_its_images(browser, server, tmp_path):
    report = pytest.importorskip("finealign.report", reason="finealign.report (issue J) is not in this checkout")
    html = Path(report.build_report([server["run"]], tmp_path / "report.html", progress=False))
    d = browser
    d.get(html.resolve().as_uri())
    _wait(d, lambda d: d.execute_script("return document.readyState") == "complete", "the report to load")
    n, bad = d.execute_script(
        "const im = [...document.images]; "
        "return [im.length, im.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 80))]")
    assert n >= 1, "the report has no images"
    assert bad == [], f"images that did not render: {bad}"
    _screenshot(d, tmp_path, "report.png")
