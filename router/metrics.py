"""Prometheus metrics, on a registry the app is given (never the global default one).

Names and labels are the product's contract (README "Metrics"): dashboards and alerts query them.
With several uvicorn workers (``PROMETHEUS_MULTIPROC_DIR`` set) the values live in per-process
files and :func:`render` aggregates them with a fresh ``MultiProcessCollector`` per scrape.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter as TallyCounter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from router.logschema import Arm, Reason

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Probabilities fall in [0, 1]; the wider tail keeps regression outputs visible too.
VALUE_BUCKETS = (*(round(i * 0.05, 2) for i in range(1, 21)), 2.0, 5.0, 10.0, 100.0, 1000.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

ARM_VERSION = ("arm", "model_version")
# Why the champion answered a request assigned to the challenger (logschema.Reason values).
FALLBACK_REASONS = (
    Reason.ERROR,
    Reason.TIMEOUT,
    Reason.INVALID_OUTPUT,
    Reason.CIRCUIT_OPEN,
    Reason.SCHEMA,
)


M = TypeVar("M", Counter, Gauge, Histogram)


class LabelCache(Generic[M]):
    """One metric's children by label values, each looked up once.

    ``metric.labels(...)`` converts, validates and locks on every call (about 4 µs); a dict hit
    is a tenth of that, and a request touches five children. A cached child is the very object the
    metric renders: prometheus_client keeps a child until ``remove()``, which the router calls
    only on ``router_model_info`` (never cached). A reloaded model's new version is a new key, so
    a new child. In multiprocess mode each worker builds its own metrics in its lifespan, so its
    children write that worker's files.
    """

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:  # two threads racing here get the same child from labels()
            child = self._children[values] = self._metric.labels(*values)
        return child


# prometheus_client's per-process files: <kind>_<pid>.db (values.MultiProcessValue).
_METRICS_FILE = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db")


def multiprocess_dir() -> str | None:
    """The multiprocess directory when several workers share metrics, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def remove_stale_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the metrics files of processes that are gone (or of this pid, reused); return them.

    Only prometheus_client's own ``<kind>_<pid>.db`` files are touched: the directory and anything
    else in it stay, and so do the files of a live process sharing the directory.
    """
    removed = []
    for path in Path(directory).iterdir():
        match = _METRICS_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RouterMetrics:
    """Every metric the router exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.requests = Counter(
            "router_requests",
            "Requests per assigned arm (intent-to-treat) and that arm's model version, by status "
            "(ok, fallback, error, client_error; skipped for shadow).",
            ["arm", "model_version", "status"],
            registry=r,
        )
        self.predict_latency = Histogram(
            "router_predict_latency_seconds",
            "Model time per request, per arm and model version.",
            ARM_VERSION,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "router_request_latency_seconds",
            "Whole-request time in the router, per route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prediction_value = Histogram(
            "router_prediction_value",
            "Numeric prediction or positive-class score per scored row.",
            ARM_VERSION,
            buckets=VALUE_BUCKETS,
            registry=r,
        )
        self.predicted_class = Counter(
            "router_predicted_class",
            "Predicted class per scored row.",
            [*ARM_VERSION, "class"],
            registry=r,
        )
        self.output_unread = Counter(
            "router_output_unread",
            "Answers whose per-row score and class could not be read (their rows keep the JSON "
            "output only), per arm and model version, by reason: rows (not one row per input "
            "row), columns (several columns, none declared or named as score or class, not class "
            "probabilities), declared (a column the MLmodel declares is missing).",
            [*ARM_VERSION, "reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "router_model_info",
            "1 for each model version in service, per arm.",
            ["arm", "model_name", "model_version", "run_id"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.arm_weight = Gauge(
            "router_arm_weight",
            "Share of traffic per arm in the split in force (the registry's split of record, "
            "else the configured default).",
            ["arm"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # The split's identity across processes: equal on every worker once a poll has passed.
        self.split_epoch = Gauge(
            "router_split_epoch",
            "Changes of the split within the experiment in service (0: the configured default).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.split_changed = Gauge(
            "router_split_changed_timestamp_seconds",
            "When the split in force was set (the configured default: when this process began "
            "serving the experiment).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ramp_stage = Gauge(
            "router_ramp_stage",
            "1-based stage of the split in force on experiment.ramp (0: no ramp, or off it).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ramp_stages = Gauge(
            "router_ramp_stages",
            "Stages of experiment.ramp (0: no ramp).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ramp_stage_min = Gauge(
            "router_ramp_stage_min_seconds",
            "experiment.ramp_stage_min_s: the least time a ramp stage lasts (0: no ramp).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "router_ready",
            "1 when the champion is loaded and the router serves predictions.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.fallback = Counter(
            "router_fallback",
            "Requests assigned to the challenger that the champion answered, by reason.",
            ["reason"],
            registry=r,
        )
        self.covariate_scorings = Counter(
            "router_covariate_scorings",
            "Challenger-served requests the champion scored after the response for the "
            "evaluator's covariate, by result (scored, skipped under load, failed).",
            ["result"],
            registry=r,
        )
        self.feedback = Counter(
            "router_feedback",
            "Scored rows that received an outcome, per arm and model version.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_correct = Counter(
            "router_feedback_correct",
            "Rows with feedback whose predicted class equals the outcome.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_abs_error = Counter(
            "router_feedback_abs_error",
            "Sum of |score - outcome| over rows with a numeric outcome.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_squared_error = Counter(
            "router_feedback_squared_error",
            "Sum of (score - outcome)^2 over rows with a numeric outcome.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_log_loss = Counter(
            "router_feedback_log_loss",
            "Sum of the log loss of the score (the positive-class probability, clipped to "
            "[1e-15, 1 - 1e-15]) over served rows with a 0/1 outcome.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_brier = Counter(
            "router_feedback_brier",
            "Sum of (score - outcome)^2 over served rows with a 0/1 outcome.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_outcome = Counter(
            "router_feedback_outcome",
            "Sum of the numeric outcomes of served rows.",
            ARM_VERSION,
            registry=r,
        )
        self.feedback_judged = Counter(
            "router_feedback_judged",
            "Served rows with feedback that each metric can judge (the denominator of its live "
            "mean), per arm, model version and metric.",
            [*ARM_VERSION, "metric"],
            registry=r,
        )
        self.feedback_busy = Counter(
            "router_feedback_busy",
            "Feedback requests refused (503, Retry-After) because feedback.max_in_flight were in "
            "progress.",
            registry=r,
        )
        self.log_pending = Gauge(
            "router_prediction_log_pending",
            "Prediction records accepted but not yet written.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.log_healthy = Gauge(
            "router_prediction_log_healthy",
            "0 while the prediction log's database is failing (writes retried, records queued).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.log_dropped = Counter(
            "router_prediction_log_dropped",
            "Prediction records dropped because the log's queue was full or the database failed.",
            registry=r,
        )
        self.batch_rows = Histogram(
            "router_batch_rows",
            "Rows per model call (several when concurrent requests shared a micro-batched call).",
            ["model_version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.circuit_open = Gauge(
            "router_challenger_circuit_open",
            "1 while the challenger's circuit breaker keeps traffic away from it (open, probing).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_reloads = Counter(
            "router_model_reloads",
            "Model loads after start-up, per arm and result (ok, error).",
            ["arm", "result"],
            registry=r,
        )
        self._dropped_seen = 0
        # The children a request touches, looked up once per label values (LabelCache).
        self._requests = LabelCache(self.requests)
        self._fallback = LabelCache(self.fallback)
        self._predict_latency = LabelCache(self.predict_latency)
        self._prediction_value = LabelCache(self.prediction_value)
        self._predicted_class = LabelCache(self.predicted_class)
        self._request_latency = LabelCache(self.request_latency)
        # Series that exist from the start, at zero: increase() then sees the first event, and
        # dashboards show an explicit 0 instead of "no data".
        for reason in FALLBACK_REASONS:
            self.fallback.labels(reason.value)
        self.circuit_open.set(0)
        for result in ("scored", "skipped", "failed"):
            self.covariate_scorings.labels(result)
        for arm in Arm:
            for result in ("ok", "error"):
                self.model_reloads.labels(arm.value, result)

    def retire_model(self, *labels: str) -> None:
        """A version left service: its ``router_model_info`` series reads 0 from now on.

        With several workers the value lives on in a shared file whatever ``remove()`` does
        (prometheus_client warns that it cannot remove there), so it is zeroed, and removed only
        in a single process.
        """
        self.model_info.labels(*labels).set(0)
        if multiprocess_dir() is None:
            self.model_info.remove(*labels)

    def count_request(self, arm: str, version: str, status: str) -> None:
        """``router_requests_total{arm, model_version, status}`` += 1."""
        self._requests(arm, version, status).inc()

    def count_fallback(self, reason: str) -> None:
        self._fallback(reason).inc()

    def observe_predict_latency(self, arm: str, version: str, seconds: float) -> None:
        self._predict_latency(arm, version).observe(seconds)

    def observe_request_latency(self, route: str, seconds: float) -> None:
        self._request_latency(route).observe(seconds)

    def observe_scores(self, arm: str, version: str, scores: Iterable[float | None]) -> None:
        """Each finite score into ``router_prediction_value`` (None: a row without one)."""
        histogram = self._prediction_value(arm, version)
        for score in scores:
            # One NaN would make the histogram's _sum NaN for good.
            if score is not None and math.isfinite(score):
                histogram.observe(score)

    def count_classes(self, arm: str, version: str, classes: Sequence[str | None]) -> None:
        """``router_predicted_class_total`` += rows per class (None: a row without one)."""
        for name, count in TallyCounter(c for c in classes if c is not None).items():
            self._predicted_class(arm, version, name).inc(count)

    def sync_prediction_log(self, pending: int, dropped: int, healthy: bool) -> None:
        """Mirror the log writer's own counters (it knows nothing of Prometheus)."""
        self.log_pending.set(pending)
        self.log_healthy.set(1 if healthy else 0)
        if dropped > self._dropped_seen:
            self.log_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if multiprocess_dir():
        aggregate = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return generate_latest(aggregate), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
