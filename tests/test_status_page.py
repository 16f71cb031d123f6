"""The status page at ``/`` in a real headless Chromium, over a real router and MLflow registry.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (NUL-separated
JSON on file descriptors 3 and 4: no websocket client needed). One page load, then traffic and
feedback: the page must show both arms with their versions, and then the new counts by its own
refresh, without a reload. A screenshot goes to ``test-artifacts/status-page.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from demo.data import FEATURES, LABEL
from tests.chromium import DevTools
from tests.conftest import FreshRegistry, MlflowRegistry, RunningRouter
from tests.live_router import RouterDir, http_client, keys_for, send_with_feedback, split_body
from tests.pyfunc_models import ConstantRegressor, register_in

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


def _traffic(
    client: httpx.Client, registry: MlflowRegistry
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """PER_ARM one-row requests to each arm, each followed by its true outcome: the rows sent
    (features and label) and the answers, in order."""
    rows = registry.holdout.head(2 * PER_ARM).reset_index(drop=True)
    keys = [
        key
        for arm in ("champion", "challenger")
        for key in keys_for(arm, PER_ARM, salt=SALT, weight=WEIGHT)
    ]
    return rows, send_with_feedback(client, rows, keys)


def _send_traffic(base_url: str, registry: MlflowRegistry) -> tuple[dict[str, int], dict[str, int]]:
    """:func:`_traffic`; returns the requests and the correct predictions (argmax class ==
    outcome) per arm."""
    with http_client(base_url) as client:
        rows, answers = _traffic(client, registry)
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


def _num3(x: float) -> str:
    """What the page's ``Intl.NumberFormat`` (at most three decimals, grouped) shows."""
    return f"{x:,.3f}".rstrip("0").rstrip(".")


ROW_LABELS_JS = (
    "JSON.stringify([...document.querySelectorAll('#compare-body th')].map(e => e.textContent))"
)
CARD_LABELS_JS = """JSON.stringify(Object.fromEntries(["champion", "challenger"].map(arm => [arm,
  [...document.querySelectorAll(`section[data-arm="${arm}"] dt`)].map(e => e.textContent)])))"""


def _open(chromium: DevTools, base_url: str) -> None:
    chromium.call("Runtime.enable")
    chromium.call("Page.navigate", {"url": f"{base_url}/"})
    chromium.wait_for(
        "document.body !== null && Number(document.body.dataset.refreshes || 0) >= 1",
        "a first refresh",
    )


def test_a_regressor_page_shows_its_errors_not_accuracy(
    fresh_registry: FreshRegistry,
    router_dir: RouterDir,
    running_router: RunningRouter,
    chromium: DevTools,
) -> None:
    """Before: "Accuracy (feedback) 0%" for both arms of a regressor, and no MSE anywhere."""
    registry = fresh_registry()
    version = register_in(registry, ConstantRegressor(100.0), alias="champion")
    settings = router_dir.settings(
        registry, routing={"challenger_weight": 0.0}, experiment={"metric": "squared_error"}
    )
    outcomes = [100.0 + i for i in range(6)]  # squared errors 0, 1, 4, ..., 25
    rows = registry.holdout[FEATURES].head(len(outcomes))
    with running_router(settings) as client:
        for i, outcome in enumerate(outcomes):
            served = client.post("/invocations", json=split_body(rows.iloc[[i]]))
            assert served.status_code == 200, served.text
            fed = client.post(
                "/feedback", json={"request_id": served.json()["request_id"], "outcome": outcome}
            )
            assert fed.status_code == 200, fed.text
        _open(chromium, str(client.base_url))
        chromium.wait_for(
            f"JSON.parse({FIELDS_JS}).champion.feedback === '{len(outcomes)}'", "the feedback"
        )
        shown = json.loads(chromium.evaluate(FIELDS_JS))["champion"]
        cards = json.loads(chromium.evaluate(CARD_LABELS_JS))
        rows_shown = json.loads(chromium.evaluate(ROW_LABELS_JS))
    assert chromium.evaluate("document.getElementById('ready').textContent") == "ready"
    errors = [o - 100.0 for o in outcomes]
    mse = sum(e * e for e in errors) / len(errors)
    assert "Mean squared error (feedback)" in cards["champion"], cards
    assert not any(label.startswith("Accuracy") for label in cards["champion"] + rows_shown)
    assert shown["metric"] == shown["squared_error"] == _num3(mse), shown  # 9.167
    assert shown["abs_error"] == _num3(sum(abs(e) for e in errors) / len(errors)), shown
    assert "Mean squared error (the experiment's metric)" in rows_shown, rows_shown
    assert "Log loss" not in rows_shown and "Brier score" not in rows_shown, rows_shown
    assert shown["version"] == f"v{version}", shown


def test_a_classifier_page_shows_log_loss_and_brier(
    fresh_registry: FreshRegistry,
    router_dir: RouterDir,
    running_router: RunningRouter,
    chromium: DevTools,
) -> None:
    """Before: nothing about log loss or Brier, even with ``experiment.metric: log_loss``."""
    registry = fresh_registry()
    settings = router_dir.settings(
        registry,
        routing={"challenger_weight": WEIGHT, "salt": SALT},
        experiment={"metric": "log_loss"},
    )
    with running_router(settings) as client:
        rows, answers = _traffic(client, registry)
        _open(chromium, str(client.base_url))
        chromium.wait_for(
            f"""(() => {{ const f = JSON.parse({FIELDS_JS});
                return f.champion.feedback === '{PER_ARM}' && f.challenger.feedback === '{PER_ARM}';
            }})()""",
            "the feedback of both arms",
        )
        shown = json.loads(chromium.evaluate(FIELDS_JS))
        cards = json.loads(chromium.evaluate(CARD_LABELS_JS))
        rows_shown = json.loads(chromium.evaluate(ROW_LABELS_JS))
    losses: dict[str, list[float]] = {"champion": [], "challenger": []}
    briers: dict[str, list[float]] = {"champion": [], "challenger": []}
    for answer, label in zip(answers, rows[LABEL], strict=True):
        p = answer["predictions"][0][1]  # [p_stay, p_churn]
        y = int(label)
        losses[answer["arm"]].append(-math.log(p if y == 1 else 1.0 - p))
        briers[answer["arm"]].append((p - y) ** 2)
    for arm in ("champion", "challenger"):
        assert "Log loss (feedback)" in cards[arm], cards
        assert shown[arm]["metric"] == shown[arm]["log_loss"], shown
        assert shown[arm]["log_loss"] == _num3(sum(losses[arm]) / PER_ARM), (arm, shown)
        assert shown[arm]["brier"] == _num3(sum(briers[arm]) / PER_ARM), (arm, shown)
    assert "Log loss (the experiment's metric)" in rows_shown, rows_shown
    assert {"Brier score", "Accuracy"} <= set(rows_shown), rows_shown
