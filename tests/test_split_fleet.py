"""One split for the whole fleet: two replicas with two workers each (real ``python -m router``
processes) on one PostgreSQL log and one registry. One ``PUT /admin/weights`` on one worker changes
the split of all four processes within a poll; the challenger's share of sticky requests is then
inside its 99.9% binomial bounds on every process, and no user is served by both arms except
those the increase moved (the bucket rule moves users champion -> challenger only).

Each process is observed on its own through its multiprocess metric files
(``tests/metrics_text.process_scrapes``): ``/metrics`` sums the workers of a replica.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from scipy import stats as sps

from router.assignment import bucket_of, threshold_of
from tests.conftest import FreshRegistry, RunningRouter
from tests.live_router import RouterDir, http_client, query_log, split_body, wait_until
from tests.metrics_text import Scrape, process_scrapes, scrape
from tests.pg import isolated_schema_url
from tests.router_process import RouterProcess, router_process

TOKEN = "fleet-admin-token"
SALT = "churn-experiment"  # config.yaml's default (router_process leaves routing.salt alone)
BEFORE, AFTER = 0.1, 0.3
POLL_S = 0.5
REQUESTS = 2_000
USERS = 200  # users who send requests before and after the change
WORKERS = 2


@pytest.fixture
def log_url() -> Iterator[str]:
    with isolated_schema_url() as url:
        yield url


def _per_process(dirs: list[Path]) -> dict[int, Scrape]:
    scrapes: dict[int, Scrape] = {}
    for directory in dirs:
        scrapes.update(process_scrapes(directory))
    return scrapes


def _arm_counts(scrapes: dict[int, Scrape]) -> dict[int, dict[str, float]]:
    return {
        pid: {arm: s.total("router_requests_total", arm=arm) for arm in ("champion", "challenger")}
        for pid, s in scrapes.items()
    }


@pytest.mark.postgres
def test_one_put_changes_the_split_of_every_worker_of_every_replica(
    fresh_registry: FreshRegistry, tmp_path: Path, log_url: str
) -> None:
    registry = fresh_registry()
    dirs = [tmp_path / "metrics-a", tmp_path / "metrics-b"]
    routers: list[RouterProcess] = []
    with ExitStack() as stack:
        for name, directory in zip(("a", "b"), dirs, strict=True):
            directory.mkdir()
            routers.append(
                stack.enter_context(
                    router_process(
                        registry,
                        tmp_path,
                        log_url=log_url,
                        workers=WORKERS,
                        name=name,
                        env={
                            "ROUTER_ADMIN_TOKEN": TOKEN,
                            "PROMETHEUS_MULTIPROC_DIR": str(directory),
                        },
                        model={"poll_interval_s": POLL_S},
                        sections={"routing": {"challenger_weight": BEFORE}},
                    )
                )
            )
        clients = [stack.enter_context(http_client(r.base_url, keep_alive=False)) for r in routers]
        body = split_body(registry.holdout.head(1))
        served: dict[str, set[str]] = defaultdict(set)

        def invoke(i: int, key: str) -> str:
            response = clients[i % 2].post(
                "/invocations", json=body, headers={"X-Routing-Key": key}
            )
            assert response.status_code == 200, response.text
            return str(response.headers["X-Arm"])

        def send(keys: list[str]) -> list[str]:
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(invoke, range(len(keys)), keys))

        # Every worker has come up and serves (a new connection each: the kernel spreads them).
        wait_until(lambda: len(_per_process(dirs)) == 2 * WORKERS, "four worker processes")
        users = [f"user-{i}" for i in range(USERS)]
        for key, arm in zip(users * 2, send(users * 2), strict=True):
            served[key].add(arm)

        put = clients[0].put(
            "/admin/weights",
            json={"challenger_weight": AFTER},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        answered = time.monotonic()
        assert put.status_code == 200, put.text
        change = put.json()
        assert change["challenger_weight"] == AFTER and change["previous"] == BEFORE
        assert change["epoch"] == 1 and change["source"] == "registry"
        assert "every worker and replica within one poll" in change["takes_effect"]

        def followed() -> dict[int, Scrape] | None:
            scrapes = _per_process(dirs)
            ok = len(scrapes) == 2 * WORKERS and all(
                s.total("router_split_epoch") == 1
                and s.total("router_arm_weight", arm="challenger") == pytest.approx(AFTER)
                for s in scrapes.values()
            )
            return scrapes if ok else None

        before = wait_until(followed, "every process to follow the new split", interval_s=0.01)
        lag_s = time.monotonic() - answered
        print(f"\nlast of {2 * WORKERS} processes followed the split {lag_s:.3f} s after the PUT")
        for client in clients:  # /experiment says the same wherever it is asked
            for _ in range(4):
                split = client.get("/experiment").json()["split"]
                assert (split["challenger_weight"], split["source"], split["epoch"]) == (
                    AFTER,
                    "registry",
                    1,
                )

        keys = [f"fleet-{i}" for i in range(REQUESTS)]
        arms = send(keys)
        # Counted before the known users come back: a user's two requests take the same arm, so
        # counting them would widen the spread beyond the binomial bounds checked below.
        after = _per_process(dirs)
        for key, arm in zip(users * 2, send(users * 2), strict=True):
            served[key].add(arm)

    # Every request took the arm its bucket gives at the new weight, whichever process served it.
    threshold = threshold_of(AFTER)
    assert arms == ["challenger" if bucket_of(SALT, k) < threshold else "champion" for k in keys]
    counts_before, counts_after = _arm_counts(before), _arm_counts(after)
    assert set(counts_after) == set(counts_before)
    for pid, now in counts_after.items():
        champion = now["champion"] - counts_before[pid]["champion"]
        challenger = now["challenger"] - counts_before[pid]["challenger"]
        n = int(champion + challenger)
        assert n >= 100, (pid, counts_after)  # each process served its share of the 2,000
        low, high = sps.binom.ppf([0.0005, 0.9995], n, AFTER)
        assert low <= challenger <= high, (pid, challenger, n)

    # Users served by both arms: exactly those whose bucket the increase crossed.
    moved = {u for u in users if threshold_of(BEFORE) <= bucket_of(SALT, u) < threshold_of(AFTER)}
    assert moved, "the users include some the increase moves"
    assert {u for u in users if len(served[u]) == 2} == moved
    # The log knows the split each request was assigned under, and sees the same users move.
    weights = dict(
        query_log(log_url, "SELECT challenger_weight, COUNT(*) FROM predictions GROUP BY 1")
    )
    assert set(weights) == {BEFORE, AFTER}
    both = query_log(
        log_url,
        "SELECT COUNT(*) FROM (SELECT routing_key_hash FROM predictions "
        "GROUP BY routing_key_hash HAVING COUNT(DISTINCT arm) = 2) t",
    )
    assert both == [(len(moved),)]


def test_put_without_a_challenger_is_a_conflict_naming_the_alias(
    fresh_registry: FreshRegistry, running_router: RunningRouter, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    registry.client().delete_registered_model_alias(registry.model_name, "challenger")
    settings = router_dir.settings(registry, env={"ROUTER_ADMIN_TOKEN": TOKEN})
    with running_router(settings) as client:
        answer = client.put(
            "/admin/weights",
            json={"challenger_weight": 0.5},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        split = client.get("/experiment").json()["split"]
        weight = scrape(client).total("router_arm_weight", arm="challenger")
    assert answer.status_code == 409, answer.text
    assert "@challenger" in answer.json()["message"]
    # Nothing is tested: the challenger's share is 0, whatever routing.challenger_weight says.
    assert (split["challenger_weight"], split["source"]) == (0.0, "no_challenger")
    assert weight == 0.0
