"""The web chat page at / in a real headless browser (Debian chromium + chromedriver, via Selenium):
the page finds the model, sends a message, and streams the reply into the conversation."""
import shutil

import pytest

from lmforge.serve import EngineConfig
from tests.serve.helpers import RunningServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply(browser, tiny, smollm_tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=16)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "model: tiny")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "input").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-state="done"]'))
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
        assert done[0].text.strip()
        stats = browser.find_element(By.CSS_SELECTOR, ".stats").text
        assert int(stats.split()[0]) >= 2, stats          # the reply arrived in several streamed chunks
        browser.save_screenshot(str(tmp_path / "chat.png"))
        # a second turn carries the conversation: the server sees both user messages
        browser.find_element(By.ID, "input").send_keys("And again")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-state="done"]')) == 2)
        assert server.wait_idle()
