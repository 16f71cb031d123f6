"""``cc-router [--config config.yaml] [--host] [--port] [--workers]`` (= ``python -m router``)."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from types import FrameType
from typing import Any

# OpenMP models busy-wait on a second thread per worker; one thread halves CPU at equal throughput.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from router.config import EXIT_BAD_CONFIG, ConfigError, config_error_line, load_settings
from router.redact import RedactingFilter

DESCRIPTION = """\
Serve the @champion and @challenger versions of one MLflow registered model side by side, split
by routing.challenger_weight (sticky per routing key), logging every prediction for
evaluate_and_promote. /healthz answers at once; /readyz once the champion is loaded."""
EPILOG = """\
exit status: 0 after a graceful stop (SIGTERM, SIGINT); 1 the address cannot be listened on (a
port in use is never shared); 2 bad arguments or a bad configuration (one line naming the key),
as for evaluate_and_promote, rollback and python -m router.log; 3 a worker cannot start
(--workers N)."""


def _parser() -> argparse.ArgumentParser:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        prog=program if program and program != "__main__.py" else "python -m router",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument("--config", help="config file (default: $ROUTER_CONFIG or config.yaml)")
    parser.add_argument("--host", help="bind address (default: server.host)")
    parser.add_argument("--port", type=int, help="port (default: server.port)")
    parser.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _prepare_multiprocess_metrics(workers: int) -> None:
    """Metrics files of a past run would add their counts to this one's: remove them.

    Several workers share metrics through files in ``PROMETHEUS_MULTIPROC_DIR`` (a temporary
    directory when unset). With one worker the directory is used only when set.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        if workers == 1:
            return
        directory = tempfile.mkdtemp(prefix="router-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.makedirs(directory, exist_ok=True)
    from router.metrics import remove_stale_files

    removed = remove_stale_files(directory)
    if removed:
        logging.getLogger("router").info(
            "removed %d metrics files of past runs from %s", len(removed), directory
        )


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging plus the project's loggers: worker processes are configured from it."""
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["project"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["project"] = {
        "formatter": "project",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    # Every handler masks URI passwords, whatever logger (MLflow, SQLAlchemy, uvicorn) logged.
    config.setdefault("filters", {})["redact"] = {"()": "router.redact.RedactingFilter"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    for name in ("router", "experiments", "demo"):
        config["loggers"][name] = {"handlers": ["project"], "level": level, "propagate": False}
    # urllib3 logs each of MLflow's HTTP retries as a raw exception repr; the router logs every
    # registry attempt itself, in one line that names the cause (router.registryfault).
    config["loggers"]["urllib3.connectionpool"] = {"level": "ERROR"}
    return config


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown, log flushed) and then re-raises
    # the signal to the handler it found; this one turns that into an ordinary exit status 0.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(config_error_line(parser.prog, exc), file=sys.stderr)
        return EXIT_BAD_CONFIG
    import uvicorn

    from router.registryfault import FAIL_FAST_HTTP

    # MLflow's HTTP client retries for minutes by default: an unreachable tracking server would
    # keep start-up silent that long. Fail fast instead; the router retries and says why each time.
    for key, value in FAIL_FAST_HTTP.items():
        os.environ.setdefault(key, value)  # before any worker starts: they inherit it
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, _exit_cleanly)
    log_config = _log_config(args.log_level.upper())
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers if args.workers is not None else settings.server.workers
    _prepare_multiprocess_metrics(workers)
    from router.server.connlimits import http_protocol

    # The connection cap and the request-head deadline, in whichever HTTP implementation.
    http = http_protocol(settings.limits)
    serving: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": http,
        "log_level": args.log_level,
        "log_config": log_config,
        "access_log": settings.server.access_log,
        "timeout_graceful_shutdown": 30,
    }
    if workers > 1:
        from router.server.supervisor import Supervisor

        # Workers rebuild the app from the environment: pass the config path along.
        if args.config:
            os.environ["ROUTER_CONFIG"] = os.path.abspath(args.config)
        config = uvicorn.Config(
            "router.server.app:app_from_env", factory=True, workers=workers, **serving
        )
        return Supervisor(config, workers).run()
    from router.server.app import create_app

    uvicorn.run(create_app(settings), **serving)
    return 0


if __name__ == "__main__":
    sys.exit(main())
