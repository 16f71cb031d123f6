"""A headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe``
(NUL-separated JSON on file descriptors 3 and 4: no websocket client needed).

``chromium`` (a fixture in ``tests/conftest.py``) gives a :class:`DevTools` attached to a blank
page; tests navigate it, evaluate JavaScript and take screenshots. Without a Chromium binary the
test is skipped locally (``chromium`` marker); in CI a skip is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

DEADLINE_S = 60.0  # any single wait on Chromium or the page


def chromium_binary() -> str:
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    # A skip only locally: conftest fails a skipped `chromium` test in CI.
    pytest.skip(
        "no chromium at /usr/bin/chromium or on PATH "
        "(Debian package `chromium`; .ci/run installs it)"
    )


class DevTools:
    """A headless Chromium and a DevTools session on its first page, over a pipe."""

    def __init__(self, binary: str, user_data_dir: Path, stderr_path: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()  # we write commands; Chromium reads fd 3
        self._evt_read, evt_write = os.pipe()  # Chromium writes fd 4; we read
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={user_data_dir}",
            "--window-size=1280,900",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # bash moves our pipe ends onto fds 3 and 4 (no preexec_fn in a threaded process; dash
        # cannot redirect from a descriptor above 9).
        self._stderr = stderr_path.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{cmd_read} 4>&{evt_write}', "bash", *args],
            pass_fds=(cmd_read, evt_write),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
        )
        os.close(cmd_read)
        os.close(evt_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + DEADLINE_S
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") != self._next_id:
                    self.events.append(reply)
                    continue
                assert "error" not in reply, f"{method}: {reply['error']}"
                result: dict[str, Any] = reply["result"]
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Chromium did not answer {method} within {DEADLINE_S} s")
            readable, _, _ = select.select([self._evt_read], [], [], remaining)
            if readable:
                chunk = os.read(self._evt_read, 1 << 20)
                if not chunk:
                    raise RuntimeError(
                        f"Chromium closed the DevTools pipe (exit {self.process.poll()})"
                    )
                self._buffer += chunk

    def attach_to_page(self) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
        )
        self.session = attached["sessionId"]

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JS expression until it is truthy (bounded by DEADLINE_S)."""
        deadline = time.monotonic() + DEADLINE_S
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never showed {what}; last value {value!r}")

    def save_screenshot(self, path: Path, width: int) -> None:
        """The whole page, ``width`` pixels wide, as a PNG at ``path`` (its directory created)."""
        height = self.evaluate("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        os.close(self._cmd_write)  # Chromium exits when its pipe closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        finally:
            os.close(self._evt_read)
            self._stderr.close()


@contextmanager
def headless_chromium(tmp_path: Path) -> Iterator[DevTools]:
    """A Chromium attached to its first page, closed at the end."""
    browser = DevTools(chromium_binary(), tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        browser.attach_to_page()
        yield browser
    finally:
        browser.close()
