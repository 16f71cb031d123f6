"""The HTML report's charts in a real headless Chromium: every label inside its chart.

A squared-error difference in the thousands used to print its y labels as ``-1.66e+03`` right-
aligned in a fixed 50 px margin, which cut them to ``.66e+03``. The page is rendered from a real
evaluation (a synthetic log, the real judge) and every ``<text>``'s box is measured by the browser.
A screenshot goes to ``test-artifacts/report-chart-<case>.png``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from synthlog import T0, Arm, settings_for, sqlite_url, write_log

from experiments.evaluate import evaluate
from experiments.report import write_html
from router import logschema
from tests.chromium import DevTools
from tests.conftest import MlflowRegistry

pytestmark = pytest.mark.chromium

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EID = logschema.experiment_id("churn-predictor", "1", "2")

# Every <text> of every chart, with its box in the chart's own coordinates and the chart's size.
BOXES_JS = """JSON.stringify([...document.querySelectorAll("svg")].flatMap(svg => {
  const view = svg.viewBox.baseVal;
  return [...svg.querySelectorAll("text")].map(t => { const b = t.getBBox();
    return {text: t.textContent, left: b.x, right: b.x + b.width, top: b.y,
            bottom: b.y + b.height, width: view.width, height: view.height}; });
}))"""


@pytest.mark.parametrize(
    ("scale", "y_label"),
    [
        (60.0, r"[+-]\d,\d{3}"),  # thousands: digits grouped, no exponent
        (3e6, r"[+-]\d\.\d\de\+1\d"),  # ~1e12: three significant digits
    ],
    ids=["thousands", "1e12"],
)
def test_every_chart_label_is_inside_its_chart(
    mlflow_registry: MlflowRegistry,
    tmp_path: Path,
    chromium: DevTools,
    scale: float,
    y_label: str,
) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, champion=Arm(0.7), challenger=Arm(0.7))
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the challenger's scores, and so its squared error, blow up
        conn.execute(
            sa.update(logschema.predictions)
            .where(logschema.predictions.c.arm == "challenger")
            .values(score=logschema.predictions.c.score * scale)
        )
    engine.dispose()
    settings = settings_for(
        mlflow_registry.tracking_uri, url, experiment={"metric": "squared_error"}
    )
    evaluation = evaluate(settings, client=mlflow_registry.client(), now=T0 + 100_000)
    assert evaluation.decision == "reject" and len(evaluation.series) > 10
    page = tmp_path / "report.html"
    write_html(evaluation, page)

    chromium.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1000, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    chromium.call("Page.navigate", {"url": page.as_uri()})
    chromium.wait_for("document.readyState === 'complete'", "the report to load")

    boxes = json.loads(chromium.evaluate(BOXES_JS))
    texts = [box["text"] for box in boxes]
    assert len([t for t in texts if re.fullmatch(y_label, t)]) == 2, texts  # the y axis's ends
    outside = [
        box
        for box in boxes
        if box["left"] < 0
        or box["top"] < 0
        or box["right"] > box["width"]
        or box["bottom"] > box["height"]
    ]
    assert not outside, outside

    name = f"report-chart-{'thousands' if scale < 1e3 else 'large'}.png"
    chromium.save_screenshot(ARTIFACTS / name, 1000)
