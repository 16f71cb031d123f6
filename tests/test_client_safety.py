"""Client-facing safety on real servers: slow bodies time out, feedback can require a token,
feedback that outruns another replica's log writer is not lost, HTML has security headers, and
routing-key hashes are keyed by a secret no endpoint shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import httpx

from router.log.keyhash import RoutingKeyHasher
from router.logschema import hash_routing_key
from router.server.app import create_app
from tests.conftest import MlflowRegistry, RunningRouter, free_port, serve_in_thread
from tests.live_router import (
    http_client,
    query_log,
    router_settings,
    split_body,
    wait_key_secret,
)

SOCKET_TIMEOUT_S = 30.0  # bounds the test; the assertion is on the answer, not the time


def test_a_body_sent_too_slowly_is_answered_408(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    settings = router_settings(
        mlflow_registry, tmp_path / "log.db", limits={"body_read_timeout_s": 0.5}
    )
    with serve_in_thread(create_app(settings)) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
            head = (
                "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"inputs": [')  # ...and nothing more
            answer = b""
            while not answer.endswith(b"}"):  # the JSON error body is the last thing sent
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer and b"body_read_timeout_s" in answer
        assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_feedback_token_is_required_when_set(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, tmp_path: Path
) -> None:
    settings = router_settings(
        mlflow_registry, tmp_path / "log.db", env={"ROUTER_FEEDBACK_TOKEN": "fb-token"}
    )
    with running_router(settings) as client:
        served = client.post("/invocations", json=split_body(mlflow_registry.holdout.head(1)))
        outcome = {"request_id": served.json()["request_id"], "outcome": 1}
        refused = client.post("/feedback", json=outcome)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        wrong = client.post("/feedback", json=outcome, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = client.post("/feedback", json=outcome, headers={"Authorization": "Bearer fb-token"})
        assert good.status_code == 200, good.text


def test_feedback_reaching_another_replica_first_is_not_lost(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, tmp_path: Path
) -> None:
    """Replica A writes its log rows only every 1.5 s; feedback sent at once to replica B waits
    for them instead of answering 404. An id that never appears still gets its 404."""
    log_path = tmp_path / "shared.db"
    slow_writer = router_settings(
        mlflow_registry, log_path, prediction_log={"flush_interval_s": 1.5, "batch_size": 10_000}
    )
    waiting = router_settings(mlflow_registry, log_path, feedback={"wait_for_prediction_s": 4})
    with running_router(slow_writer) as a, running_router(waiting) as b:
        ids = []
        for i in range(5):
            served = a.post("/invocations", json=split_body(mlflow_registry.holdout.iloc[[i]]))
            assert served.status_code == 200
            ids.append(served.json()["request_id"])
        for request_id in ids:
            answer = b.post("/feedback", json={"request_id": request_id, "outcome": 1})
            assert answer.status_code == 200, answer.text
        unknown = b.post("/feedback", json={"request_id": "never-served", "outcome": 1})
        assert unknown.status_code == 404 and "never-served" in unknown.text
    stored = query_log(f"sqlite:///{log_path}", "SELECT COUNT(*) FROM outcomes")
    assert stored == [(5,)]


def test_status_page_and_every_response_carry_security_headers(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    settings = router_settings(mlflow_registry, tmp_path / "log.db")
    with serve_in_thread(create_app(settings)) as base_url, http_client(base_url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        for path in ("/healthz", "/metrics", "/experiment", "/no-such-page"):
            assert client.get(path).headers["x-content-type-options"] == "nosniff", path


def test_routing_key_hashes_are_keyed_and_the_same_on_every_replica(
    mlflow_registry: MlflowRegistry, running_router: RunningRouter, tmp_path: Path
) -> None:
    log_path = tmp_path / "shared.db"
    log_url = f"sqlite:///{log_path}"
    settings = router_settings(mlflow_registry, log_path, routing={"salt": "public-salt"})
    keys = [f"user-{i}" for i in range(6)]
    seen: list[str] = []
    for _replica in range(2):  # one after the other on one shared log: the same secret
        with running_router(settings) as client:
            wait_key_secret(client)
            for key in keys:
                body = split_body(mlflow_registry.holdout.head(1))
                served = client.post("/invocations", json=body, headers={"X-Routing-Key": key})
                assert served.status_code == 200
            for path in ("/experiment", "/readyz", "/healthz", "/metrics", "/"):
                seen.append(client.get(path).text)
    [(secret,)] = query_log(log_url, "SELECT value FROM router_secrets")
    assert len(secret) == 64 and all(secret not in text for text in seen)
    stored = query_log(log_url, "SELECT routing_key_hash, request_id FROM predictions")
    hashes = {h for h, _ in stored}
    assert hashes == {hash_routing_key(secret.encode(), k) for k in keys}  # 2 replicas, 6 hashes
    # Not the former, reversible form: sha256 of the public salt and the key.
    public = {hashlib.sha256(f"log:public-salt:{k}".encode()).hexdigest()[:32] for k in keys}
    assert not hashes & public

    # A secret from the environment takes precedence over the stored one.
    env_settings = router_settings(
        mlflow_registry,
        log_path,
        routing={"salt": "public-salt"},
        env={"ROUTER_ROUTING_KEY_SECRET": "from-env"},
    )
    with running_router(env_settings) as client:
        wait_key_secret(client)
        body = split_body(mlflow_registry.holdout.head(1))
        served = client.post("/invocations", json=body, headers={"X-Routing-Key": "user-env"})
        request_id = served.json()["request_id"]
        assert "from-env" not in client.get("/experiment").text
    [(stored_hash,)] = query_log(
        log_url, "SELECT routing_key_hash FROM predictions WHERE request_id = :r", r=request_id
    )
    assert stored_hash == hash_routing_key(b"from-env", "user-env")


def test_an_unreachable_log_database_delays_the_secret_but_not_serving() -> None:
    """Start-up never waits for the stored secret: rows are logged unhashed, counted, and the
    reason is shown, until the database answers."""
    port = free_port()  # nothing listens there
    hasher = RoutingKeyHasher(None, f"postgresql://router:pw@127.0.0.1:{port}/router")

    async def scenario() -> None:
        loader = asyncio.create_task(hasher.load_forever())
        for _ in range(600):  # bounded: a refused connection fails at once
            if hasher.error and str(port) in hasher.error:
                break
            await asyncio.sleep(0.05)
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)

    asyncio.run(scenario())
    assert hasher.hash("user-1") is None
    state = hasher.state()
    assert state["loaded"] is False and state["unhashed_rows"] == 1
    assert str(port) in str(state["error"]) and ":pw@" not in str(state["error"])
    assert RoutingKeyHasher("env-secret", "sqlite:///unused.db").hash("u") == hash_routing_key(
        b"env-secret", "u"
    )
