"""A screenshot of a page after a click on one of its buttons (a dialog, such as Airflow's trigger form, has no URL
of its own), with headless Chromium driven over the DevTools protocol. Used by scripts/screenshots.sh.

    python scripts/screenshot_dialog.py URL BUTTON_TEXT OUT.png [--browser chromium] [--wait 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import time
import urllib.request

from websockets.sync.client import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(url: str, button: str, out: str, browser: str = "chromium", wait: float = 10.0) -> bool:
    """Open ``url``, click the first button whose text is ``button``, save the page as PNG; True if clicked."""
    port = _free_port()
    proc = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={port}", "--window-size=1400,900", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{browser} did not open its DevTools port")
        page = next(t for t in targets if t.get("type") == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params) -> dict:
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == n:
                        return msg.get("result", {})

            call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            time.sleep(wait)
            found = call(
                "Runtime.evaluate",
                expression="(() => { const b = [...document.querySelectorAll('button')]"
                f".find(b => b.innerText.trim() === {json.dumps(button)}); if (b) b.click(); return !!b; }})()",
                returnByValue=True,
            )
            time.sleep(wait / 2)
            shot = call("Page.captureScreenshot", format="png")
            with open(out, "wb") as fh:
                fh.write(base64.b64decode(shot["data"]))
            return bool(found.get("result", {}).get("value"))
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("button")
    ap.add_argument("out")
    ap.add_argument("--browser", default="chromium")
    ap.add_argument("--wait", type=float, default=10.0)
    a = ap.parse_args()
    clicked = shoot(a.url, a.button, a.out, a.browser, a.wait)
    print(f"  {a.out.rsplit('/', 1)[-1]}  <- {a.url} (clicked {a.button!r}: {clicked})")


if __name__ == "__main__":
    main()
