"""Security headers: ``nosniff`` on every response; on HTML (the status page) also a strict
Content-Security-Policy, no framing and no caching.

The status page's only script and style are inline, so the policy allows exactly those blocks by
their SHA-256 hashes (computed from the file at start-up) and nothing else: no other script, no
other origin, no ``<base>``, no forms, not framed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def content_security_policy(page: Path | None) -> str:
    """A policy allowing only ``page``'s inline ``<script>`` and ``<style>`` blocks."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    if page is not None and page.exists():
        for kind, body in _INLINE.findall(page.read_text(encoding="utf-8")):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            sources[kind].append(f"'sha256-{digest}'")
    scripts = " ".join(sources["script"]) or "'none'"
    styles = " ".join(sources["style"]) or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """Raw ASGI middleware adding the headers as the response starts."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        # Built once: every response gets one of these two lists (a header the app set itself of
        # the same name is replaced, never doubled).
        nosniff = [(b"x-content-type-options", b"nosniff")]
        html = [
            *nosniff,
            (b"content-security-policy", csp.encode()),
            (b"x-frame-options", b"DENY"),
            (b"cache-control", b"no-store"),
            (b"referrer-policy", b"no-referrer"),
        ]
        self._added = {
            False: (nosniff, {b"x-content-type-options"}),
            True: (html, {n for n, _ in html}),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                added, names = self._added[_is_html(headers)]
                message["headers"] = [h for h in headers if h[0].lower() not in names] + added
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_html(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(
        k.lower() == b"content-type" and v.lower().startswith(b"text/html") for k, v in headers
    )
