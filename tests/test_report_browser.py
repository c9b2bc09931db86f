"""The demo's report in a real browser: headless Chromium opens report.html of the shrunken demo; every image
must load (decoded, non-zero natural size), the page must log no console errors or uncaught exceptions, and a
screenshot must not be blank. Talks to Chromium over the DevTools protocol (websocket-client). CI installs the
Debian `chromium` package (.ci/run); without it the test is skipped with the reason."""

import base64
import io
import json
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevTools:
    """A minimal DevTools-protocol client of one page: commands with replies, events collected."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.ws.settimeout(max(0.1, end - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise AssertionError(f"no {method} event within {timeout} s")

    def close(self):
        self.ws.close()


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs the Debian package: apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client is part of the test extra")
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="vitally-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        targets = None
        for _ in range(300):  # up to 30 s for the DevTools endpoint
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert targets, "chromium started but offered no page over DevTools"
        dt = DevTools(targets[0]["webSocketDebuggerUrl"])
        yield dt
        dt.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def check_page(dt: DevTools, url: str) -> dict:
    """Open `url`; return images (natural sizes, complete flags), console errors, exceptions and a screenshot."""
    dt.send("Runtime.enable")
    dt.send("Log.enable")
    dt.send("Page.enable")
    dt.send("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
    dt.send("Page.navigate", url=url)
    dt.wait_event("Page.loadEventFired", timeout=60)
    res = dt.send(
        "Runtime.evaluate",
        expression="JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
        "i.naturalHeight, i.src.slice(0, 30)]))",
        returnByValue=True,
    )
    images = json.loads(res["result"]["value"])
    shot = dt.send("Page.captureScreenshot", format="png")["data"]
    errors = [
        e["params"]["args"][0].get("value", e["params"]["args"][0].get("description"))
        for e in dt.events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error"
    ]
    errors += [
        e["params"]["entry"]["text"]
        for e in dt.events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
    ]
    exceptions = [e["params"] for e in dt.events if e.get("method") == "Runtime.exceptionThrown"]
    return {"images": images, "errors": errors, "exceptions": exceptions, "screenshot": base64.b64decode(shot)}


def _gray(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)


def test_browser_client_detects_broken_images_and_console_errors(browser, tmp_path):
    """The checks can fail: a page with a broken image and a console error is reported as such."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><p>x</p><img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>'
    )
    r = check_page(browser, page.as_uri())
    assert len(r["images"]) == 1 and r["images"][0][1] == 0  # the broken image has no natural size
    assert any("boom" in str(e) for e in r["errors"])


@pytest.mark.slow
def test_demo_report_in_headless_chromium(browser, shrunken_demo):
    _, out, run_dir = shrunken_demo
    report = pathlib.Path(out["report"]["report"])
    r = check_page(browser, report.resolve().as_uri())
    assert len(r["images"]) >= 7, r["images"]
    bad = [im for im in r["images"] if not (im[0] and im[1] > 0 and im[2] > 0)]
    assert not bad, f"images that did not load: {bad}"
    assert not r["errors"], r["errors"]
    assert not r["exceptions"], r["exceptions"]
    g = _gray(r["screenshot"])
    assert g.shape == (900, 1200)
    assert g.std() > 5.0, "the screenshot is blank"
    assert (g < 128).mean() > 0.002, "no dark pixels (text) in the screenshot"
