"""The playground page (GET /) in headless Chromium, against live servers: what the page
shows is compared with the API's own answers (greedy text, usage, logprobs, /v1/samplers)
and with the usage guide's presets. Screenshots of the desktop and phone layouts go to the
test's tmp folder and to test-artifacts/ at the repository root, for a person to look at.

Needs Debian's chromium and chromium-driver (.ci/run installs them); skipped without them.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from server_utils import GUIDE_PRESETS, REPO_ROOT, RemoteServer, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
API_KEY = "sk-playground-test"
# The keyed server also serves the stop test: a longer context than the shared server's
# 128 tokens, so a generation is still running when Stop is pressed.
KEYED_ARGS = ["--api-keys", API_KEY, "--served-model-name", "smollm2", "--max-model-len", "1024",
              "--kv-cache-memory", "64MiB"]
STATS = re.compile(r"(\d+) prompt · (\d+) completion tokens · [\d.]+ tokens/s · "
                   r"first token [\d.]+ s · finished: (\w+)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = str(CHROMIUM)   # with the driver's path: nothing to download
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    resize(driver, 1280, 800)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def keyed_server():
    with RemoteServer(KEYED_ARGS, api_key=API_KEY) as server:
        yield server


# ---- page helpers ------------------------------------------------------------------------

def resize(driver, width: int, height: int) -> None:
    """The viewport's size in CSS pixels, as a phone or a desktop window has it."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id)


def wait_for(driver, condition, timeout_s: float = 60, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: condition(), message)


def status(driver) -> str:
    return by_id(driver, "status").text


def open_page(driver, server) -> None:
    driver.get(server.base_url + "/")
    wait_for(driver, lambda: status(driver) not in ("", "loading…"), 30, "page did not load")


def fill(driver, element_id: str, value) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(str(value))


def generate(driver, finished=("done",)) -> None:
    by_id(driver, "send").click()
    wait_for(driver, lambda: status(driver) in (*finished, "failed"), 120, status(driver))


def text_of(driver, selector: str) -> str:
    """The element's text as the page holds it (also inside a closed <details>)."""
    return driver.execute_script("return document.querySelector(arguments[0]).textContent",
                                 selector)


def token_texts(driver, container_id: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} .tok`)].map(s => s.textContent)",
        container_id)


def screenshot(driver, name: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), name
    shutil.copy(path, ARTIFACTS / name)


def assert_no_console_errors(driver) -> None:
    """No script error or failed load since the last call (Chromium's console log)."""
    errors = [entry["message"] for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE"]
    assert not errors, errors


def percent(p: float) -> str:
    """The page's probability format (tokens.js: percent)."""
    return f"{100 * p:.{1 if p >= 0.1 else 2}f}%"


def api(server, route: str, body: dict) -> dict:
    r = requests.post(server.url_for("v1", route), json=body, headers=server.headers(),
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


# ---- tests -------------------------------------------------------------------------------

def test_every_sampler_is_an_input_and_the_presets_set_the_guides_values(browser, server):
    driver = browser
    open_page(driver, server)
    assert status(driver) == "ready"
    specs = requests.get(server.url_for("v1", "samplers"), timeout=10).json()["data"]
    for spec in specs:
        element = by_id(driver, f"s-{spec['name']}")
        hint = element.find_element("xpath", "..").get_attribute("textContent")
        assert spec["range"] in hint, spec["name"]
        if spec["type"] == "float" and re.fullmatch(r"\[(\S+), (\S+)\]", spec["range"]):
            low, high = map(float, re.fullmatch(r"\[(\S+), (\S+)\]", spec["range"]).groups())
            assert element.get_attribute("type") == "number"
            assert (float(element.get_attribute("min")), float(element.get_attribute("max"))) \
                == (low, high), spec["name"]
    models = requests.get(server.url_for("v1", "models"), timeout=10).json()["data"]
    options = [o.text for o in by_id(driver, "model").find_elements("tag name", "option")]
    assert options == [m["id"] for m in models]

    from selenium.webdriver.support.ui import Select
    defaults = {spec["name"]: spec["default"] for spec in specs}
    preset = Select(by_id(driver, "preset"))
    for name, values in [*GUIDE_PRESETS.items(), ("Creative Writing",
                                                  GUIDE_PRESETS["Creative Writing"])]:
        preset.select_by_visible_text(name)
        for field in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "frequency_penalty"):   # the preset's values, the rest back at default
            shown = float(by_id(driver, f"s-{field}").get_attribute("value"))
            assert shown == values.get(field, defaults[field]), (name, field)
    preset.select_by_visible_text("Server defaults")
    assert float(by_id(driver, "s-temperature").get_attribute("value")) == defaults["temperature"]
    assert_no_console_errors(driver)


def test_chat_streams_the_greedy_reply_with_counts_and_token_probabilities(browser, server,
                                                                            tmp_path):
    driver = browser
    from selenium.webdriver.common.keys import Keys

    open_page(driver, server)
    fill(driver, "s-temperature", 0)
    fill(driver, "s-max_tokens", 8)
    fill(driver, "message", "Name a colour.")
    generate(driver)
    reply = text_of(driver, "#chat-log .assistant .text")
    model = by_id(driver, "model").get_attribute("value")
    reference = api(server, "chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Name a colour."}],
        "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 5})
    choice = reference["choices"][0]
    assert reply == choice["message"]["content"]
    usage = reference["usage"]
    prompt, completion, finish = STATS.fullmatch(by_id(driver, "stats").text).groups()
    assert (int(prompt), int(completion), finish) == (usage["prompt_tokens"],
                                                      usage["completion_tokens"],
                                                      choice["finish_reason"])
    # one coloured span per token, and a token's popup shows its probability and alternatives
    entries = choice["logprobs"]["content"]
    expected = [entry["token"] for entry in entries]
    if choice["finish_reason"] == "stop":
        expected.pop()   # the EOS token: not part of the text
    assert token_texts(driver, "chat-log") == expected
    spans = driver.find_elements("css selector", "#chat-log .tok")
    spans[1].click()
    popup = by_id(driver, "token-popup")
    wait_for(driver, popup.is_displayed, 5, "the token popup did not open")
    chosen = popup.find_element("css selector", ".chosen").text
    assert percent(math.exp(entries[1]["logprob"])) in chosen
    rows = [row.text for row in popup.find_elements("css selector", ".alternatives li")]
    expected = [f'"{alt["token"]}"' for alt in entries[1]["top_logprobs"]]
    assert [row.split("\n")[0] for row in rows] == expected
    assert [row.split("\n")[1] for row in rows] == [
        percent(math.exp(alt["logprob"])) for alt in entries[1]["top_logprobs"]]
    screenshot(driver, "playground-desktop.png", tmp_path)
    # the phone layout: everything fits the width
    resize(driver, 390, 844)
    try:
        by_id(driver, "message").send_keys(Keys.ESCAPE)   # closes the popup
        assert not popup.is_displayed()
        spans[1].click()
        width = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        screenshot(driver, "playground-phone.png", tmp_path)
    finally:
        resize(driver, 1280, 800)
    assert_no_console_errors(driver)


def test_completion_mode_continues_the_prompt(browser, server):
    driver = browser
    open_page(driver, server)
    by_id(driver, "mode-completion").click()
    assert by_id(driver, "prompt").is_displayed() and not by_id(driver, "message").is_displayed()
    fill(driver, "prompt", "The capital of France is")
    fill(driver, "s-temperature", 0)
    fill(driver, "s-max_tokens", 6)
    # a stop string that never matches: the server holds back the text's last 3 characters,
    # so tokens arrive before their text and the page still gives each its own span
    fill(driver, "s-stop", '["zzzz"]')
    generate(driver)
    model = by_id(driver, "model").get_attribute("value")
    reference = api(server, "completions", {"model": model, "prompt": "The capital of France is",
                                            "temperature": 0, "max_tokens": 6,
                                            "stop": ["zzzz"], "logprobs": 5})
    choice = reference["choices"][0]
    assert text_of(driver, "#output") == choice["text"]
    expected = choice["logprobs"]["tokens"]
    if choice["finish_reason"] == "stop":
        expected = expected[:-1]   # the EOS token: not part of the text
    assert token_texts(driver, "output") == expected
    prompt, completion, _ = STATS.fullmatch(by_id(driver, "stats").text).groups()
    assert (int(prompt), int(completion)) == (reference["usage"]["prompt_tokens"],
                                              reference["usage"]["completion_tokens"])
    assert_no_console_errors(driver)


def test_the_api_key_field_against_a_keyed_server(browser, keyed_server):
    driver = browser
    from selenium.webdriver.common.keys import Keys

    open_page(driver, keyed_server)   # the page itself needs no key
    assert status(driver) == "needs an API key"
    assert "needs an API key" in by_id(driver, "error").text
    fill(driver, "api-key", "sk-wrong" + Keys.TAB)
    wait_for(driver, lambda: "not accepted" in by_id(driver, "error").text, 10,
             by_id(driver, "error").text)
    fill(driver, "api-key", API_KEY + Keys.TAB)
    wait_for(driver, lambda: status(driver) == "ready", 10, status(driver))
    assert not by_id(driver, "error").is_displayed()
    fill(driver, "s-temperature", 0)
    fill(driver, "s-max_tokens", 4)
    fill(driver, "message", "Hi")
    generate(driver)
    reply = text_of(driver, "#chat-log .assistant .text")
    reference = api(keyed_server, "chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0, "max_tokens": 4})
    assert reply == reference["choices"][0]["message"]["content"]


def test_stop_ends_the_stream_and_the_servers_request(browser, keyed_server):
    driver = browser
    open_page(driver, keyed_server)
    from selenium.webdriver.common.keys import Keys

    fill(driver, "api-key", API_KEY + Keys.TAB)
    wait_for(driver, lambda: status(driver) == "ready", 10, status(driver))
    by_id(driver, "mode-completion").click()
    fill(driver, "prompt", "Once upon a time")
    fill(driver, "s-max_tokens", 900)
    by_id(driver, "s-ignore_eos").click()
    by_id(driver, "send").click()
    wait_for(driver, lambda: len(token_texts(driver, "output")) >= 3, 60, "no tokens streamed")
    assert keyed_server.metric("aphrodite:frontend_requests") == 1
    by_id(driver, "stop").click()
    wait_for(driver, lambda: status(driver) == "stopped", 10, status(driver))
    text = text_of(driver, "#output")
    assert by_id(driver, "stats").text.endswith("stopped")
    assert by_id(driver, "send").is_enabled() and not by_id(driver, "stop").is_enabled()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [keyed_server.metric(f"aphrodite:{name}") for name in
                ("frontend_requests", "num_requests_running", "engine_core_requests")]
        if not any(busy):
            break
        time.sleep(0.2)
    assert busy == [0, 0, 0]
    assert 3 <= len(token_texts(driver, "output")) < 900
    assert text_of(driver, "#output") == text   # nothing arrived after the stop
