"""serve.py's page (serve.html) in a real headless browser, Debian's chromium driven through its chromedriver by
selenium: it loads, a prompt streams its completion into the page (sample.py's text), and the stop button ends the
generation on the server. Skipped where chromium is not installed (.ci/run installs it).

    SERVE_SCREENSHOT=docs/serve.png pytest tests/test_serve_page.py   # also the README's screenshot, with SmolLM2
"""

import os
import shutil

import pytest

import sample
import serve
from conftest import Gate, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium and chromedriver binaries: apt-get "
                                "install chromium chromium-driver (as .ci/run does) to test the page in a browser")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(arg)  # no sandbox: CI runs as root, where chromium refuses its sandbox
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def waiting(browser):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, 120, poll_frequency=0.02)


def text(browser, element_id):
    return browser.execute_script(f"return document.getElementById('{element_id}').textContent")


def completion(browser):
    return browser.execute_script("const c = document.querySelector('#output .completion'); return c && c.textContent")


def fill(browser, **values):
    for key, value in values.items():
        browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", key, str(value))


def click(browser, button):
    browser.find_element("id", button).click()


def test_the_page_streams_a_completion_and_stop_ends_it(text_checkpoint, browser, monkeypatch, capsys):
    sample.main([f"--out_dir={text_checkpoint}", f"--start={PROMPT}", "--max_new_tokens=12", "--temperature=0"])
    expected = capsys.readouterr().out[len(PROMPT):-len("\n---------------\n")]
    served = serve.load(serve.ServeConfig(out_dir=str(text_checkpoint), device="cpu"))
    gate = Gate(free=3)
    monkeypatch.setattr(serve, "stream", gate.stream)
    with serving(serve.build_app(served, queue_size=4)) as running:
        browser.get(running.url)
        wait = waiting(browser)
        wait.until(lambda b: text(b, "status") == "ready")
        assert text(browser, "model") == str(text_checkpoint)
        fill(browser, prompt=PROMPT, max_tokens=12, temperature=0)
        click(browser, "generate")
        # three tokens' text on the page while the server holds the fourth: it streams in
        wait.until(lambda b: gate.waiting.is_set() and completion(b))
        shown = completion(browser)
        assert expected.startswith(shown) and len(shown) < len(expected)
        assert text(browser, "status").startswith("generating")
        gate.open()
        wait.until(lambda b: text(b, "status").startswith("done (max tokens reached): 12 tokens"))
        assert completion(browser) == expected

        gate = Gate(free=3)
        monkeypatch.setattr(serve, "stream", gate.stream)
        fill(browser, max_tokens=100)
        click(browser, "generate")
        wait.until(lambda b: gate.waiting.is_set() and completion(b))
        connections = len(running.server.server_state.connections)
        click(browser, "stop")
        wait.until(lambda b: text(b, "status").startswith("stopped after"))
        wait.until(lambda b: len(running.server.server_state.connections) < connections)  # the stream's is closed
        gate.open()
        assert gate.closed.wait(timeout=60)
        assert gate.given == 4  # of 100: the server stopped at the token in progress when the page stopped reading
        assert completion(browser) == expected[:len(completion(browser))]


@pytest.mark.skipif(not os.environ.get("SERVE_SCREENSHOT"), reason="SERVE_SCREENSHOT=docs/serve.png takes the README's "
                                                                   "screenshot (a chat with SmolLM2-135M)")
def test_screenshot_for_the_readme(browser):
    served = serve.load(serve.ServeConfig(init_from="smollm2-135m", device="cpu"))
    with serving(serve.build_app(served, queue_size=4)) as running:
        browser.get(running.url)
        wait = waiting(browser)
        wait.until(lambda b: text(b, "status") == "ready")
        fill(browser, prompt="What is the capital of France? Answer in one sentence.", max_tokens=60, temperature=0)
        click(browser, "generate")
        wait.until(lambda b: text(b, "status").startswith("done"))
        fill(browser, prompt="And what is it famous for?")
        click(browser, "generate")
        wait.until(lambda b: text(b, "status").startswith("done"))
        browser.save_screenshot(os.environ["SERVE_SCREENSHOT"])
