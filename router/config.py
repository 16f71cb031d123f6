"""Configuration: one frozen settings object, validated once at start-up.

A bad key or value raises :class:`ConfigError` naming the dotted key; nothing is repaired.
Environment overrides (deployment): ``MLFLOW_TRACKING_URI``, ``ROUTER_CONFIG``,
``ROUTER_PREDICTION_LOG_URL``; secrets come from the environment only, never from the file:
``ROUTER_ADMIN_TOKEN``, ``ROUTER_FEEDBACK_TOKEN``, ``ROUTER_ROUTING_KEY_SECRET``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from router.logschema import Arm, RoutingMode, challenger_arm

ExtraColumns = Literal["ignore", "reject"]
Casting = Literal["mlflow", "strict"]
NonFinite = Literal["reject", "pass"]
MetricName = Literal["accuracy", "log_loss", "brier", "abs_error", "squared_error", "outcome"]
METRICS: tuple[MetricName, ...] = get_args(MetricName)
#: How the evaluator's looks are judged (experiments/looks.py): group-sequential boundaries over the
#: information fraction (judged units / N*), or the always-valid confidence sequence.
JudgingMethod = Literal["group_sequential", "confidence_sequence"]


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


#: The exit status of every command (router, evaluate_and_promote, rollback, router.log) for a
#: configuration it refuses: argparse's code for a bad invocation, which it is. Distinct from 1
#: (a dependency failed: the next run may succeed): a person must fix it; rerunning will not.
EXIT_BAD_CONFIG = 2


def config_error_line(prog: str, exc: ConfigError) -> str:
    """The one line every command prints on stderr for a configuration it refuses."""
    return f"{prog}: configuration error: {exc}"


@dataclass(frozen=True)
class ModelSettings:
    name: str = ""
    tracking_uri: str = "sqlite:///mlflow.db"
    # Registry aliases; by default named after the arms they feed.
    champion_alias: str = Arm.CHAMPION.value
    challenger_alias: str = Arm.CHALLENGER.value
    rollback_alias: str = "rollback"
    poll_interval_s: float = 10.0
    # Start-up retries while the registry is unreachable: the router keeps trying and says why.
    startup_retry_interval_s: float = 5.0


@dataclass(frozen=True)
class RoutingSettings:
    mode: RoutingMode = RoutingMode.SPLIT
    challenger_weight: float = 0.1
    routing_key_header: str = "X-Routing-Key"
    salt: str = "churn-experiment"
    # Circuit breaker: this many challenger faults in a row (errors, timeouts, invalid outputs)
    # stop routing to it; after breaker_cooldown_s one request probes it again.
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0

    @property
    def shadow(self) -> bool:
        """Shadow mode: the champion answers everything, the challenger scores it afterwards."""
        return self.mode == RoutingMode.SHADOW

    @property
    def challenger_arm(self) -> Arm:
        """The arm the challenger's rows and metrics count in: ``shadow`` in shadow mode."""
        return challenger_arm(self.mode)


@dataclass(frozen=True)
class LimitSettings:
    max_rows: int = 1000
    max_body_bytes: int = 1_048_576
    # A client must send its whole body within this: slow senders cannot hold a connection open.
    body_read_timeout_s: float = 30.0
    # Open connections per worker process; beyond it a new connection displaces one waiting for a
    # request head (never served first), else it is answered 503 (router/server/connlimits.py).
    max_connections: int = 1024
    # A connection must deliver a complete request head within this after connecting (or after
    # its last response): slowloris clients cannot hold connections open.
    header_read_timeout_s: float = 10.0
    # false: Parquet bodies are refused (415) before anything reads them. MLflow's scoring server
    # takes Parquet, so drop-in clients may send it; a binary format is the riskier one to parse.
    parquet: bool = True


@dataclass(frozen=True)
class ValidationSettings:
    """How ``/invocations`` input is checked against each model's signature (docs/migration.md)."""

    # Columns the model's signature does not name: dropped, as `mlflow models serve` drops them;
    # "reject" answers 400 naming them.
    extra_columns: ExtraColumns = "ignore"
    # "mlflow": MLflow's casts ("3" or 1.5 into a long column, 7 into a string column);
    # "strict": only values of the column's type and safe widening (1 into a double column).
    casting: Casting = "mlflow"
    # Infinity, -Infinity or 1e400 in a numeric column: "reject" answers 400 naming the column
    # before predicting; "pass" hands them to the model, as `mlflow models serve` does.
    non_finite: NonFinite = "reject"


@dataclass(frozen=True)
class PredictionLogSettings:
    url: str = "sqlite:///predictions.db"
    batch_size: int = 500
    flush_interval_s: float = 0.2
    # Records waiting beyond this are dropped (and counted) rather than growing memory unbounded.
    max_pending: int = 100_000
    # `python -m router.log retention` removes rows older than this many days, except those of an
    # experiment still running (router/log/retention.py); null keeps everything.
    retention_days: float | None = None
    # Prediction rows per delete transaction: the writer waits for at most one such batch.
    retention_batch_rows: int = 5_000


@dataclass(frozen=True)
class FeedbackSettings:
    # Feedback may reach a replica before the prediction's row is in the shared log (another
    # replica's writer has not flushed yet): look again for this long before answering 404.
    wait_for_prediction_s: float = 2.0
    # Feedback requests in progress per worker (waiting for one of feedback's own threads, being
    # stored, or waiting for ids not logged yet); one more is answered 503 with Retry-After at
    # once: a flood of unknown ids costs bounded work (router/log/feedbackgate.py).
    max_in_flight: int = 64


@dataclass(frozen=True)
class GuardrailSettings:
    max_error_rate_increase: float = 0.01
    max_latency_p95_increase: float = 0.10
    # An absolute p95 budget in milliseconds: a challenger whose p95 is within it passes whatever
    # the champion's is (null: the relative rule alone). A slower model that meets the service's
    # latency objective is no regression worth rejecting.
    max_latency_p95_ms: float | None = None


@dataclass(frozen=True)
class ExperimentSettings:
    metric: MetricName = "accuracy"
    alpha: float = 0.05
    planned_samples: int = 20_000
    min_samples_per_arm: int = 500
    min_effect: float = 0.0
    # An outcome counts only if it arrived within this long after its prediction, and a
    # prediction is judged only once this long has passed (both arms alike). A week: churn-like
    # labels arrive over days, and a window shorter than the slowest label would judge one arm
    # on its quick (often negative) outcomes only. Waiting costs only time: the interval stays
    # valid however often it is read.
    outcome_window_s: float = 604_800.0
    # Stop with "no worthwhile difference" once this many units are judged (None: 5 x N*).
    max_samples: int | None = None
    # Winsorise the row metric at this quantile of both arms' values: auto caps the heavy-tailed
    # abs_error and squared_error only.
    capping: Literal["auto", "on", "off"] = "auto"
    cap_quantile: float = 0.99
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)
    # group_sequential: each evaluate_and_promote run is a look, judged against alpha-spending
    # boundaries over judged units / planned_samples (the looks are recorded in the audit runs);
    # confidence_sequence: the always-valid sequence, for teams that look continuously or have no
    # planned N*.
    method: JudgingMethod = "group_sequential"
    # auto: regression adjustment with the champion's prediction as covariate (CUPAC) when the log
    # has it for nearly every judged row and it is balanced between arms; off: never.
    adjustment: Literal["auto", "off"] = "auto"
    # A ramp: the challenger weights of its stages, in order (e.g. [0.05, 0.2, 0.5]); empty: none.
    # evaluate_and_promote moves the split to the next stage once the guardrails pass at the
    # current one with min_samples_per_arm units per arm and ramp_stage_min_s have passed; the
    # last stage decides promote or reject. The experiment starts at the first stage.
    ramp: tuple[float, ...] = ()
    ramp_stage_min_s: float = 3600.0


@dataclass(frozen=True)
class PrometheusSettings:
    url: str | None = None


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # Threads scoring at once per worker and per arm (each arm has its own: a hung challenger
    # cannot take the champion's). Scoring is CPU-bound and holds the GIL: more threads than
    # cores only stretch each prediction; requests beyond this wait in line instead. Also the
    # most hung predict calls that can pile up per arm (a thread cannot be killed).
    predict_threads: int = 4
    # Per-arm predict timeouts (waiting for a thread included); null: none. A challenger that
    # times out is answered for by the champion (reason timeout); a champion timeout is a 500.
    champion_timeout_s: float | None = None
    challenger_timeout_s: float | None = 2.0
    # Micro-batching: concurrent requests for one model share a predict call of up to this many
    # rows (1 disables it). A batch waits at most batch_wait_ms for requests still being parsed;
    # a lone request never waits.
    batch_max_rows: int = 32
    batch_wait_ms: float = 2.0
    # Batch custom python_function models too (only when their rows are scored independently).
    batch_custom_models: bool = False
    # uvicorn's access log, one line per request: off by default, as it costs about 25 µs of CPU
    # each (5% of a request) and the prediction log and the metrics keep every request anyway.
    access_log: bool = False


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    prediction_log: PredictionLogSettings = field(default_factory=PredictionLogSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)
    prometheus: PrometheusSettings = field(default_factory=PrometheusSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    # Not from YAML: ROUTER_ADMIN_TOKEN only, so the secret never sits in a config file.
    admin_token: str | None = field(default=None, repr=False)
    # ROUTER_FEEDBACK_TOKEN: when set, POST /feedback needs "Authorization: Bearer <token>".
    feedback_token: str | None = field(default=None, repr=False)
    # ROUTER_ROUTING_KEY_SECRET: the HMAC key for routing-key hashes in the log (else a random
    # secret kept in the log database; see router/log/keyhash.py).
    routing_key_secret: str | None = field(default=None, repr=False)


T = TypeVar("T")
_SECRETS = frozenset({"admin_token", "feedback_token", "routing_key_secret"})
_SECRET_ENV = {
    "admin_token": "ROUTER_ADMIN_TOKEN",
    "feedback_token": "ROUTER_FEEDBACK_TOKEN",
    "routing_key_secret": "ROUTER_ROUTING_KEY_SECRET",
}


def _build(cls: type[T], raw: Any, prefix: str) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    allowed = set(fields) - _SECRETS  # secrets come from the environment only
    unknown = sorted(set(raw) - allowed)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(allowed))})")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    args = get_args(hint)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if get_origin(hint) is tuple and args[1:] == (Ellipsis,):  # tuple[X, ...]: a YAML list
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        choices = [member.value for member in hint]
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return hint(value)
    if args and type(None) in args:  # Optional[...]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if args and all(isinstance(a, str) for a in args):  # Literal[...]
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(args)}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _validate(s: Settings) -> None:
    _require(bool(s.model.name), "model.name", "is required (the registered model name)")
    _require(s.model.poll_interval_s > 0, "model.poll_interval_s", "must be > 0")
    _require(s.model.startup_retry_interval_s > 0, "model.startup_retry_interval_s", "must be > 0")
    aliases = {s.model.champion_alias, s.model.challenger_alias, s.model.rollback_alias}
    _require(len(aliases) == 3, "model.challenger_alias", "the three aliases must differ")
    _require(
        0.0 <= s.routing.challenger_weight <= 1.0,
        "routing.challenger_weight",
        f"must be within [0, 1], got {s.routing.challenger_weight}",
    )
    _require(s.limits.max_rows >= 1, "limits.max_rows", "must be >= 1")
    _require(s.limits.max_body_bytes >= 1, "limits.max_body_bytes", "must be >= 1")
    _require(s.limits.body_read_timeout_s > 0, "limits.body_read_timeout_s", "must be > 0")
    _require(s.limits.max_connections >= 1, "limits.max_connections", "must be >= 1")
    _require(s.limits.header_read_timeout_s > 0, "limits.header_read_timeout_s", "must be > 0")
    _require(
        s.feedback.wait_for_prediction_s >= 0, "feedback.wait_for_prediction_s", "must be >= 0"
    )
    _require(s.feedback.max_in_flight >= 1, "feedback.max_in_flight", "must be >= 1")
    _require(s.prediction_log.batch_size >= 1, "prediction_log.batch_size", "must be >= 1")
    _require(
        s.prediction_log.flush_interval_s > 0, "prediction_log.flush_interval_s", "must be > 0"
    )
    _require(s.prediction_log.max_pending >= 1, "prediction_log.max_pending", "must be >= 1")
    days = s.prediction_log.retention_days
    _require(days is None or days > 0, "prediction_log.retention_days", "must be > 0 or null")
    _require(
        s.prediction_log.retention_batch_rows >= 1,
        "prediction_log.retention_batch_rows",
        "must be >= 1",
    )
    _require(0 < s.experiment.alpha < 1, "experiment.alpha", "must be within (0, 1)")
    _require(s.experiment.planned_samples >= 2, "experiment.planned_samples", "must be >= 2")
    _require(
        s.experiment.min_samples_per_arm >= 2, "experiment.min_samples_per_arm", "must be >= 2"
    )
    _require(s.experiment.min_effect >= 0, "experiment.min_effect", "must be >= 0")
    _require(s.experiment.outcome_window_s > 0, "experiment.outcome_window_s", "must be > 0")
    _require(
        s.experiment.max_samples is None or s.experiment.max_samples >= 2,
        "experiment.max_samples",
        "must be >= 2 (or null: 5 x planned_samples)",
    )
    _require(0 < s.experiment.cap_quantile < 1, "experiment.cap_quantile", "must be within (0, 1)")
    g = s.experiment.guardrails
    _require(
        g.max_error_rate_increase >= 0,
        "experiment.guardrails.max_error_rate_increase",
        "must be >= 0",
    )
    _require(
        g.max_latency_p95_increase >= 0,
        "experiment.guardrails.max_latency_p95_increase",
        "must be >= 0",
    )
    _require(
        g.max_latency_p95_ms is None or g.max_latency_p95_ms > 0,
        "experiment.guardrails.max_latency_p95_ms",
        "must be > 0 or null",
    )
    _validate_ramp(s)
    _require(1 <= s.server.port <= 65535, "server.port", "must be within 1..65535")
    _require(s.server.workers >= 1, "server.workers", "must be >= 1")
    _require(s.server.predict_threads >= 1, "server.predict_threads", "must be >= 1")
    _require(s.server.batch_max_rows >= 1, "server.batch_max_rows", "must be >= 1")
    _require(s.server.batch_wait_ms >= 0, "server.batch_wait_ms", "must be >= 0")
    for key in ("champion_timeout_s", "challenger_timeout_s"):
        timeout = getattr(s.server, key)
        _require(timeout is None or timeout > 0, f"server.{key}", "must be > 0 or null")
    _require(s.routing.breaker_failures >= 1, "routing.breaker_failures", "must be >= 1")
    _require(s.routing.breaker_cooldown_s > 0, "routing.breaker_cooldown_s", "must be > 0")


def _validate_ramp(s: Settings) -> None:
    ramp = s.experiment.ramp
    _require(s.experiment.ramp_stage_min_s >= 0, "experiment.ramp_stage_min_s", "must be >= 0")
    if not ramp:
        return
    for i, weight in enumerate(ramp):
        _require(
            0.0 < weight < 1.0,
            f"experiment.ramp[{i}]",
            f"must be within (0, 1), got {weight}: a stage serves both arms",
        )
    _require(
        all(a < b for a, b in itertools.pairwise(ramp)),
        "experiment.ramp",
        f"the stages must increase, got {list(ramp)}",
    )
    _require(
        not s.routing.shadow,
        "experiment.ramp",
        "needs routing.mode split: in shadow mode the challenger answers no request",
    )


def settings_from_mapping(raw: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate settings from a parsed YAML mapping plus environment overrides."""
    settings = _build(Settings, raw, "")
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_URI"):
        settings = dataclasses.replace(
            settings,
            model=dataclasses.replace(settings.model, tracking_uri=env["MLFLOW_TRACKING_URI"]),
        )
    if env.get("ROUTER_PREDICTION_LOG_URL"):
        settings = dataclasses.replace(
            settings,
            prediction_log=dataclasses.replace(
                settings.prediction_log, url=env["ROUTER_PREDICTION_LOG_URL"]
            ),
        )
    for name, variable in _SECRET_ENV.items():
        if env.get(variable):
            settings = dataclasses.replace(settings, **{name: env[variable]})  # type: ignore[arg-type]
    _validate(settings)
    return settings


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (else ``$ROUTER_CONFIG``, else ``config.yaml``) and validate it."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get("ROUTER_CONFIG") or "config.yaml")
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {config_path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {config_path}: invalid YAML: {exc}") from exc
    return settings_from_mapping(raw, env)
