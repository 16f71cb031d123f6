"""The status page at ``/`` in a real headless Chromium, over a real router and MLflow registry.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (NUL-separated
JSON on file descriptors 3 and 4: no websocket client needed). One page load, then traffic and
feedback: the page must show both arms with their versions, and then the new counts by its own
refresh, without a reload. A screenshot goes to ``test-artifacts/status-page.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from demo.data import LABEL
from tests.chromium import DevTools
from tests.conftest import MlflowRegistry
from tests.live_router import http_client, keys_for, send_with_feedback

pytestmark = pytest.mark.chromium

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
SALT = "status-page"
WEIGHT = 0.5
PER_ARM = 12  # requests per arm, one row each, every one with feedback


@pytest.fixture
def router_routing() -> dict[str, Any]:
    """For ``fresh_router`` (conftest): both arms at ``WEIGHT``, keys hashed with ``SALT``."""
    return {"challenger_weight": WEIGHT, "salt": SALT}


def _send_traffic(base_url: str, registry: MlflowRegistry) -> tuple[dict[str, int], dict[str, int]]:
    """PER_ARM one-row requests to each arm, each followed by its true outcome.

    Returns the requests and the correct predictions (argmax class == outcome) per arm.
    """
    rows = registry.holdout.head(2 * PER_ARM).reset_index(drop=True)
    keys = [
        key
        for arm in ("champion", "challenger")
        for key in keys_for(arm, PER_ARM, salt=SALT, weight=WEIGHT)
    ]
    with http_client(base_url) as client:
        answers = send_with_feedback(client, rows, keys)
    served = {"champion": 0, "challenger": 0}
    correct = {"champion": 0, "challenger": 0}
    for answer, label in zip(answers, rows[LABEL], strict=True):
        served[answer["arm"]] += 1
        probabilities = answer["predictions"][0]  # [p_stay, p_churn]
        correct[answer["arm"]] += int(probabilities.index(max(probabilities)) == int(label))
    return served, correct


def _percent(x: float) -> str:
    """What the page's ``Intl.NumberFormat`` percent (at most one decimal) shows."""
    return f"{round(x * 100, 1):g}%"


# Per arm, every element carrying data-field: the arm's card and its column of the table.
FIELDS_JS = """JSON.stringify(Object.fromEntries(["champion", "challenger"].map(arm => [arm,
  Object.fromEntries([...document.querySelectorAll(
      `[data-arm="${arm}"] [data-field], td[data-arm="${arm}"]`)]
    .map(e => [e.dataset.field, e.textContent]))])))"""


def test_status_page_shows_both_arms_and_updates_after_traffic(
    fresh_router: tuple[str, MlflowRegistry], chromium: DevTools
) -> None:
    base_url, registry = fresh_router
    chromium.call("Network.enable")
    chromium.call("Runtime.enable")
    chromium.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    chromium.call("Page.navigate", {"url": f"{base_url}/"})
    chromium.wait_for(
        "document.body !== null && Number(document.body.dataset.refreshes || 0) >= 1",
        "a first refresh",
    )

    assert chromium.evaluate("document.title").startswith("Champion/challenger router")
    assert chromium.evaluate("document.getElementById('model').textContent") == registry.model_name
    assert chromium.evaluate("document.getElementById('ready').textContent") == "ready"
    before = json.loads(chromium.evaluate(FIELDS_JS))
    for arm, version in registry.versions.items():
        assert before[arm]["version"] == f"v{version}", before
        assert before[arm]["weight"] == "50%", before
        assert before[arm]["requests"] == "0", before
        assert before[arm]["accuracy"] == "—", before  # no feedback yet: nothing to divide

    served, correct = _send_traffic(base_url, registry)
    assert served == {"champion": PER_ARM, "challenger": PER_ARM}

    # No reload: the page's own refresh must bring the new counts.
    refreshes = chromium.evaluate("Number(document.body.dataset.refreshes)")
    expected = str(PER_ARM)
    chromium.wait_for(
        f"""(() => {{ const f = JSON.parse({FIELDS_JS});
            return ["champion", "challenger"].every(a =>
              f[a].requests === "{expected}" && f[a].feedback === "{expected}"); }})()""",
        f"{PER_ARM} requests and {PER_ARM} feedback rows per arm",
    )
    after = json.loads(chromium.evaluate(FIELDS_JS))
    assert chromium.evaluate("Number(document.body.dataset.refreshes)") > refreshes
    for arm, version in registry.versions.items():
        shown = after[arm]
        assert shown["version"] == f"v{version}", shown
        assert shown["errors"] == "0", shown
        assert shown["share"] == "50%", shown
        assert shown["p50"].endswith(" ms") and shown["p95"].endswith(" ms"), shown
        assert shown["accuracy"] == _percent(correct[arm] / PER_ARM), (shown, correct)
    assert chromium.evaluate("document.getElementById('problem').hidden") is True

    # Offline by construction: every request the page made went to the router itself.
    urls = [
        e["params"]["request"]["url"]
        for e in chromium.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert urls, "no network events recorded"
    assert all(url.startswith(base_url) for url in urls), urls
    exceptions = [e for e in chromium.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions

    chromium.save_screenshot(ARTIFACTS / "status-page.png", 1280)
