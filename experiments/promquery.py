"""The guardrails as Prometheus sees them, shown beside the prediction log's (informational).

Read through the HTTP API (``/api/v1/query``) over the experiment's window. The prediction log
stays the source of the decision: Prometheus counters reset on restart and histograms are
bucketed, so these figures are a cross-check, and a Prometheus that cannot be reached is reported
in the output, never fatal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from router.logschema import MODEL_FAULTS, Arm


@dataclass(frozen=True)
class PrometheusGuardrails:
    url: str
    window_s: int
    error_rate: dict[str, float] = field(default_factory=dict)  # arm -> errors/requests
    latency_p95: dict[str, float] = field(default_factory=dict)  # arm -> seconds
    error: str | None = None  # why nothing could be read


def queries(arms: Sequence[str], window_s: int) -> dict[str, str]:
    """PromQL for each figure, over ``[window_s]`` ending now, one series per arm.

    Mirrors the router's counting (``router/recording.py``): a request counts once, in its
    assigned arm; client errors and skipped shadow scorings are nobody's and left out. An arm's
    faults are its ``status="error"`` requests plus, for the challenger, its fallbacks whose
    reason is a model fault (``router_fallback_total`` has no arm label: it is the challenger's).
    """
    selector = f'arm=~"{"|".join(arms)}"'
    faults = "|".join(sorted(reason.value for reason in MODEL_FAULTS))
    window = f"[{window_s}s]"
    return {
        "requests": (
            "sum by (arm) (increase(router_requests_total"
            f'{{{selector},status!~"client_error|skipped"}}{window}))'
        ),
        "errors": (
            f'sum by (arm) (increase(router_requests_total{{{selector},status="error"}}{window})'
            f' or label_replace(increase(router_fallback_total{{reason=~"{faults}"}}{window}),'
            f' "arm", "{Arm.CHALLENGER.value}", "", ""))'
        ),
        "latency_p95": (
            "histogram_quantile(0.95, sum by (arm, le) "
            f"(rate(router_predict_latency_seconds_bucket{{{selector}}}{window})))"
        ),
    }


def read_guardrails(
    url: str,
    arms: Sequence[str],
    window_s: float,
    at: float,
    *,
    timeout_s: float = 5.0,
    transport: httpx.BaseTransport | None = None,
) -> PrometheusGuardrails:
    """Query ``url`` for per-arm error rate and p95 predict latency; errors become ``error``."""
    window = max(60, math.ceil(window_s))  # shorter than a scrape interval reads nothing
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            results = {
                name: _query(client, f"{base}/api/v1/query", q, at)
                for name, q in queries(arms, window).items()
            }
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return PrometheusGuardrails(base, window, error=f"Prometheus at {base}: {exc}")
    requests, errors = results["requests"], results["errors"]
    error_rate = {arm: errors.get(arm, 0.0) / total for arm, total in requests.items() if total > 0}
    latency = {arm: v for arm, v in results["latency_p95"].items() if math.isfinite(v)}
    return PrometheusGuardrails(base, window, error_rate, latency)


def _query(client: httpx.Client, endpoint: str, promql: str, at: float) -> dict[str, float]:
    response = client.get(endpoint, params={"query": promql, "time": f"{at:.3f}"})
    response.raise_for_status()
    body: Any = response.json()
    if body.get("status") != "success":
        raise ValueError(f"query failed: {body.get('error', body)}")
    out: dict[str, float] = {}
    for series in body["data"]["result"]:
        arm = str(series["metric"].get("arm", ""))
        out[arm] = float(series["value"][1])
    return out
