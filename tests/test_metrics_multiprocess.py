"""Metrics with ``PROMETHEUS_MULTIPROC_DIR`` set (``--workers N``): a retired model version reads 0
and no warning is raised (prometheus_client cannot remove labels there and warns on every try)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics


def test_retiring_a_model_version_in_multiprocess_mode_zeroes_it_without_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    labels = {"arm": "challenger", "model_name": "m", "model_version": "2", "run_id": "r"}
    metrics.model_info.labels(*labels.values()).set(1)
    metrics.retire_model(*labels.values())  # pytest turns any warning into an error
    assert registry.get_sample_value("router_model_info", labels) == 0


def test_retiring_a_model_version_in_one_process_removes_its_series() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    labels = {"arm": "challenger", "model_name": "m", "model_version": "2", "run_id": "r"}
    metrics.model_info.labels(*labels.values()).set(1)
    metrics.retire_model(*labels.values())
    assert registry.get_sample_value("router_model_info", labels) is None
