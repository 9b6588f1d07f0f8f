"""The Streamlit chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium): it loads the pipeline's checkpoint, streams a reply, keeps a multi-turn history, and
"Clear chat" empties it. A screenshot lands in the test's folder (and in reports/serving/ when
TINYLLM_SCREENSHOT names a path)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_chat_checkpoint

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def page(tmp_path, tokenizer):
    make_chat_checkpoint(tmp_path / "build", tokenizer, max_seq_len=512)
    (tmp_path / "artifacts").mkdir()
    shutil.move(tmp_path / "build/ckpt", tmp_path / "artifacts/sft")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    app = subprocess.Popen([sys.executable, "-m", "tinyllm.cli", "web", "--artifacts", str(tmp_path / "artifacts"),
                            "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        deadline = time.time() + 60
        while True:  # streamlit takes a few seconds to come up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert app.poll() is None and time.time() < deadline, app.stdout.read() if app.poll() else "timeout"
                time.sleep(0.2)
        browser.get(f"http://127.0.0.1:{port}")
        yield browser
    finally:
        browser.quit()
        os.killpg(app.pid, 9)
        app.wait()


def _messages(browser):
    return browser.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')


def _settled(browser, seconds=1.5):
    """Wait until the page stops changing (Streamlit has finished its run)."""
    last, since = None, time.time()
    while time.time() - since < seconds:
        now = browser.find_element(By.TAG_NAME, "body").text
        if now != last:
            last, since = now, time.time()
        time.sleep(0.1)


def _send(browser, text, messages_before):
    _settled(browser)
    box = browser.find_element(By.CSS_SELECTOR, '[data-testid="stChatInputTextArea"]')
    box.send_keys(text + Keys.ENTER)
    WebDriverWait(browser, 60).until(lambda b: len(_messages(b)) > messages_before)


def test_the_page_streams_a_reply_keeps_history_and_clears(page, tmp_path):
    browser = page
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, '[data-testid="stChatInputTextArea"]'))
    assert "artifacts/sft" in browser.page_source  # the checkpoint picker found the pipeline's model
    _send(browser, "李明住在哪里？", 0)
    WebDriverWait(browser, 60).until(lambda b: len(_messages(b)) == 2 and _messages(b)[1].text.strip())  # streamed in
    user, reply = _messages(browser)
    assert "李明住在哪里？" in user.text and reply.text.strip()
    _send(browser, "他养了什么？", 2)  # a second turn: the first stays on the page
    WebDriverWait(browser, 60).until(lambda b: len(_messages(b)) == 4 and _messages(b)[3].text.strip())
    assert "李明住在哪里？" in _messages(browser)[0].text
    _settled(browser)
    shot = tmp_path / "web_chat.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TINYLLM_SCREENSHOT"):
        shutil.copy(shot, os.environ["TINYLLM_SCREENSHOT"])
    clear = next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Clear chat")
    clear.click()
    WebDriverWait(browser, 60).until(lambda b: len(_messages(b)) == 0)
