"""``server.access_log``: uvicorn's line per request, off by default, on when configured, in one
process and in every ``--workers`` worker."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import FreshRegistry
from tests.router_process import EXIT_DEADLINE_S, router_process

ACCESS_LINE = '"GET /healthz HTTP/1.1" 200'


@pytest.mark.parametrize(
    ("workers", "access_log"), [(1, None), (1, True), (2, True)], ids=["default", "on", "on-2"]
)
def test_access_log_setting(
    fresh_registry: FreshRegistry, tmp_path: Path, workers: int, access_log: bool | None
) -> None:
    registry = fresh_registry()
    server = {} if access_log is None else {"access_log": access_log}
    # A model with no versions: the process serves /healthz at once, no model to load first.
    with router_process(
        registry,
        tmp_path,
        model_name="nothing-here",
        wait_for="/healthz",
        workers=workers,
        sections={"server": server},
    ) as router:
        for _ in range(4):  # new connections: with two workers, both are likely to answer
            assert httpx.get(f"{router.base_url}/healthz", timeout=10).status_code == 200
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(timeout=EXIT_DEADLINE_S)
        output = router.output_text(tail=None)

    assert "Application startup complete." in output  # the rest of uvicorn's log stays
    assert (ACCESS_LINE in output) is (access_log is True)
