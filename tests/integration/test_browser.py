"""A real browser through the real gateway: Debian's Chromium, headless, driven over the W3C
WebDriver protocol by Debian's chromedriver. It meets the login page, signs in with the token,
and gets the runtime's /docs rendered (Swagger UI served by the gateway, the OpenAPI through it)
and, with a ComfyUI source tree, ComfyUI's UI connected over the WebSocket. Screenshots of each
step are saved (the path is printed) and checked to be real renders, not blank pages."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_stack import NO_COMFYUI, Stack, free_port, get_stack

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class Browser:
    """The few WebDriver commands the test needs, as plain HTTP calls to chromedriver."""

    def __init__(self, driver: str, session: str, shots: Path) -> None:
        self.base = f"{driver}/session/{session}"
        self.shots = shots

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["value"]

    def go(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def title(self) -> str:
        return self._call("GET", "/title")

    def text(self) -> str:
        return self._call("POST", "/execute/sync", {"script": "return document.body.innerText", "args": []})

    def js(self, script: str) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": []})

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def wait_for(self, what: str, check: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{what}")
                raise AssertionError(f"browser: {what} did not happen within {timeout} s; page text: "
                                     f"{self.text()[:500]!r}")
            time.sleep(0.5)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path


def assert_rendered(png: Path) -> None:
    """A real render has many colours; a blank or error page has a handful."""
    from PIL import Image

    with Image.open(io.BytesIO(png.read_bytes())) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20, f"{png} looks blank ({len(colours or [])} colours)"


def spki_hash(stack: Stack) -> str:
    """The gateway certificate's public-key hash: Chromium trusts exactly that key and nothing else."""
    cert = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{stack.port}"], input="",
                          capture_output=True, text=True, timeout=30).stdout
    pem = cert[cert.index("-----BEGIN CERTIFICATE-----"):cert.index("-----END CERTIFICATE-----") + 25]
    pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem.encode(), capture_output=True,
                         check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True,
                            check=True).stdout
    return base64.b64encode(digest).decode()


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Stack:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("no Chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    return get_stack(request.config)


@pytest.fixture
def browser(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    port = free_port()
    profile = tmp_path_factory.mktemp("chromium-profile")
    shots = tmp_path_factory.mktemp("browser-screenshots")
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/status", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.3)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile}",
                f"--ignore-certificate-errors-spki-list={spki_hash(stack)}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        req = urllib.request.Request(f"{url}/session", data=json.dumps(caps).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            session = json.loads(r.read())["value"]["sessionId"]
        yield Browser(url, session, shots)
        print(f"browser screenshots: {shots}")
        urllib.request.urlopen(urllib.request.Request(f"{url}/session/{session}", method="DELETE"), timeout=60)
    finally:
        driver.terminate()
        driver.wait(timeout=30)


def sign_in(browser: Browser, stack: Stack, shot: str) -> None:
    browser.wait_for("the login page", lambda: "sign in" in browser.title())
    assert_rendered(browser.screenshot(f"{shot}-login"))
    browser.type("#token", "wrong-token-" + "0" * 24)
    browser.click("#signin")
    browser.wait_for("the refusal", lambda: "not valid" in browser.text())
    browser.js("document.getElementById('token').value = ''")
    browser.type("#token", stack.token)
    browser.click("#signin")


def test_a_browser_signs_in_and_reads_the_runtime_docs(browser: Browser, stack: Stack) -> None:
    browser.go(f"{stack.url}/docs")
    sign_in(browser, stack, "docs")
    # Swagger UI renders the runtime's OpenAPI, fetched through the gateway with the session cookie.
    browser.wait_for("the rendered API docs", lambda: "/v1/images/generations" in browser.text())
    text = browser.text()
    assert "fluxstack runtime" in text and "Generate images" in text and "/v1/models" in text
    assert_rendered(browser.screenshot("docs-rendered"))
    cookies = browser._call("GET", "/cookie")
    session = next(c for c in cookies if c["name"] == "fluxstack_session")
    assert session["httpOnly"] and session["secure"] and stack.token not in session["value"]
    # Signed out: the docs are closed again.
    browser.go(f"{stack.url}/logout")
    browser.wait_for("the login page after logout", lambda: "sign in" in browser.title())
    browser.go(f"{stack.url}/docs")
    assert "sign in" in browser.title()


@pytest.mark.skipif(not os.environ.get("COMFYUI_SRC"), reason=NO_COMFYUI)
def test_a_browser_signs_in_and_uses_the_comfyui_ui(browser: Browser, stack: Stack) -> None:
    browser.go(f"{stack.url}/")
    sign_in(browser, stack, "comfyui")
    browser.wait_for("ComfyUI's UI", lambda: browser.js("return !!document.querySelector('#graph-canvas, canvas')"),
                     timeout=120)
    # The UI's WebSocket (through the gateway, with the cookie) delivers ComfyUI's status: the
    # frontend then knows the queue size and the server's features.
    browser.wait_for("the WebSocket", lambda: browser.js(
        "return !!(window.app && window.app.api && window.app.api.socket && window.app.api.socket.readyState === 1)"),
        timeout=60)
    time.sleep(2)  # let the first paint of the graph settle for the screenshot
    assert "ComfyUI" in browser.title()
    assert_rendered(browser.screenshot("comfyui-ui"))
