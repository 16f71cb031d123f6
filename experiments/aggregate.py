"""The prediction log to sufficient statistics, in SQL: a few rows per arm come back, never one per
prediction, so 10M logged rows are judged in tens of seconds with bounded memory (SQLite and
PostgreSQL; figures in bench/evaluator.md).

A few passes over the experiment's rows, each a GROUP BY the database does in one scan:

1. shape: are there routing keys (units are users) or multi-row requests (units are requests)?
2. latency: per-arm histograms of row 0 of each served request;
3. (capped metrics only) a histogram of the row metric, for the cap at its configured quantile;
4. split mode with units (users, or multi-row requests): ONE pass, predictions LEFT JOIN their
   outcomes grouped by unit, gives requests, faults, client errors, coverage and the metric per
   unit, then per arm and cohort of first judged prediction (the running interval). Otherwise a
   requests pass and a metric pass, per time slice, with window functions for the running sums.

The accuracy event is :func:`router.logschema.outcome_matches` itself: the distinct (class,
outcome) spellings in the log are few, so Python decides each pair once and SQL looks them up.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from experiments import strata
from experiments.covariate import CovariateFolds, CovariateSums
from experiments.stats import UnitMoments
from experiments.sufficient import (
    LATENCY_BASE_S,
    LATENCY_RATIO,
    NONPOSITIVE_BUCKET,
    ArmData,
    LatencyHistogram,
    LogSummary,
    Period,
    SeriesSlice,
    Stratified,
    cap_from_histogram,
)
from router import logschema
from router.config import MetricName
from router.logschema import (
    MODEL_FAULTS,
    SERVED_STATUSES,
    Arm,
    RoutingMode,
    RowStatus,
    challenger_arm,
)

SLICES = 60
#: More distinct (class, outcome) pairs than this means the metric is not a classification one.
MAX_LABEL_PAIRS = 5000
#: PostgreSQL work_mem of the evaluator's transaction (see ``_tune``).
WORK_MEM_MB = 64
_FLOAT_MAX = 1.7976931348623157e308  # a BETWEEN on it keeps finite values only (no inf, no NaN)


class MetricUnusable(ValueError):
    """The configured metric cannot be computed from this log (the message says why)."""


def _in_list(name: str, values: Sequence[str], params: dict[str, Any]) -> str:
    keys = []
    for i, v in enumerate(values):
        params[f"{name}{i}"] = v
        keys.append(f":{name}{i}")
    return f"({', '.join(keys)})"


def _metric_sql(
    metric: MetricName, alias: str, label_pairs: Sequence[tuple[str, str]], params: dict[str, Any]
) -> str:
    """The row metric of predictions row ``alias`` against outcome row ``o``; NULL if unusable."""
    score, y = f"{alias}.score", "o.outcome_value"
    finite = f"{score} BETWEEN {-_FLOAT_MAX!r} AND {_FLOAT_MAX!r}"
    if metric == "accuracy":
        if not label_pairs:
            match = "0"
        else:
            ors = []
            for i, (cls, out) in enumerate(label_pairs):
                params[f"lc{i}"], params[f"lo{i}"] = cls, out
                ors.append(f"({alias}.predicted_class = :lc{i} AND o.outcome = :lo{i})")
            # FLOAT, not 1.0: PostgreSQL reads 1.0 as NUMERIC and sums it in arbitrary precision,
            # several times slower per row than a double (0/1 sums are exact either way).
            match = f"CASE WHEN {' OR '.join(ors)} THEN CAST(1 AS FLOAT) ELSE CAST(0 AS FLOAT) END"
        return f"CASE WHEN {alias}.predicted_class IS NULL THEN NULL ELSE {match} END"
    if metric == "outcome":
        return y
    if metric in ("log_loss", "brier"):
        binary = f"{finite} AND {y} IN (0.0, 1.0)"
        if metric == "brier":
            return f"CASE WHEN {binary} THEN ({score} - {y}) * ({score} - {y}) END"
        # Probabilities of exactly 0 or 1 have infinite loss; clipped as sklearn does.
        p = (
            f"(CASE WHEN {score} < 1e-15 THEN 1e-15 WHEN {score} > 1 - 1e-15 THEN 1 - 1e-15 "
            f"ELSE {score} END)"
        )
        loss = f"CASE WHEN {y} = 1.0 THEN -LN({p}) ELSE -LN(1 - {p}) END"
        return f"CASE WHEN {binary} THEN ({loss}) END"
    usable = f"{finite} AND {y} IS NOT NULL"
    if metric == "abs_error":
        return f"CASE WHEN {usable} THEN ABS({score} - {y}) END"
    return f"CASE WHEN {usable} THEN ({score} - {y}) * ({score} - {y}) END"


def _covariate_sql(metric: MetricName, alias: str) -> str:
    """The row covariate of ``experiments.covariate.row_covariate`` from the champion's score;
    NULL when missing or unusable."""
    s = f"{alias}.champion_score"
    finite = f"{s} BETWEEN {-_FLOAT_MAX!r} AND {_FLOAT_MAX!r}"
    if metric not in ("accuracy", "log_loss", "brier"):
        return f"CASE WHEN {finite} THEN {s} END"
    probability = f"{s} BETWEEN 0.0 AND 1.0"
    if metric == "accuracy":
        return f"CASE WHEN {probability} THEN CASE WHEN {s} >= 0.5 THEN {s} ELSE 1 - {s} END END"
    if metric == "brier":
        return f"CASE WHEN {probability} THEN {s} * (1 - {s}) END"
    p = f"(CASE WHEN {s} < 1e-15 THEN 1e-15 WHEN {s} > 1 - 1e-15 THEN 1 - 1e-15 ELSE {s} END)"
    return f"CASE WHEN {probability} THEN -({p} * LN({p}) + (1 - {p}) * LN(1 - {p})) END"


def has_champion_scores(conn: Connection) -> bool:
    """Does the log have the ``champion_score`` column (a router of this version wrote it)?"""
    columns = sa.inspect(conn).get_columns(logschema.predictions.name)
    return any(c["name"] == "champion_score" for c in columns)


def label_pairs(conn: Connection, eid: str) -> list[tuple[str, str]]:
    """The (predicted class, outcome JSON) pairs of the log that ``outcome_matches`` accepts."""
    p, o = logschema.predictions, logschema.outcomes
    # At most MAX_LABEL_PAIRS + 1 of each: a regression log has a distinct value per row, and
    # more than that many already means "not a classification log" (memory stays bounded).
    most = MAX_LABEL_PAIRS + 1
    classes = [
        c
        for (c,) in conn.execute(
            sa.select(p.c.predicted_class)
            .where(p.c.experiment_id == eid, p.c.predicted_class.is_not(None))
            .distinct()
            .limit(most)
        )
    ]
    outcomes = [v for (v,) in conn.execute(sa.select(o.c.outcome).distinct().limit(most))]
    if len(classes) * len(outcomes) > MAX_LABEL_PAIRS:

        def count(n: int) -> str:
            return f"more than {MAX_LABEL_PAIRS}" if n == most else str(n)

        raise MetricUnusable(
            f"accuracy: {count(len(classes))} distinct predicted classes × "
            f"{count(len(outcomes))} distinct outcomes: this is not a classification log "
            "(use abs_error or squared_error)"
        )
    return [(c, v) for c in classes for v in outcomes if logschema.outcome_matches(c, v)]


def _unflattened(conn: Connection) -> str:
    """What ends a subquery that feeds a GROUP BY so that SQLite does not flatten it.

    LIMIT -1 (no limit) keeps the subquery whole: SQLite's sorter then carries the few small
    values it computes per row, not the raw columns they come from (-15% CPU on 10M rows).
    Nothing on PostgreSQL, where a LIMIT would stop its parallel workers.
    """
    return " LIMIT -1" if conn.dialect.name == "sqlite" else ""


def _tune(conn: Connection) -> None:
    """Settings for this transaction only (never the router's sessions), measured on 10M rows.

    PostgreSQL: with the default 4 MB of work_mem the join's hash and the per-unit aggregation
    spill to disk in many batches; 64 MB took the server's CPU for one evaluation from 39 s to
    30 s. Memory stays bounded: work_mem per sort or hash node. JIT stays on (off saved 0.3 s at
    1M rows and cost 4 s at 10M). SQLite needs nothing: a bigger cache_size, an in-memory temp
    store or sorter threads made its sorts slower, not faster, on this 2-core machine.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{WORK_MEM_MB}MB'")


@dataclass(frozen=True)
class Scope:
    """The rows read: one experiment's, or one period's of it (those assigned under ``weight``).

    Rows logged without a weight (before the column existed) count as assigned under
    ``default_weight``, the weight that was configured then.
    """

    eid: str
    weight: float | None = None
    default_weight: float = 0.0
    weights_logged: bool = True  # False: a log older than the column (every row the default's)

    def weight_of(self, alias: str = "") -> str:
        """SQL: the challenger weight a row was assigned under."""
        return f"COALESCE({alias}challenger_weight, :dw)" if self.weights_logged else ":dw"

    def where(self, alias: str = "") -> str:
        clause = f"{alias}experiment_id = :eid"
        if self.weight is not None:
            clause += f" AND {self.weight_of(alias)} = :pw"
        return clause

    def params(self) -> dict[str, Any]:
        if self.weight is None:
            return {"eid": self.eid, "dw": self.default_weight}
        return {"eid": self.eid, "pw": self.weight, "dw": self.default_weight}


def _shape(conn: Connection, scope: Scope) -> dict[str, Any]:
    row = conn.execute(
        sa.text(
            "SELECT COUNT(routing_key_hash), MAX(row_index), MIN(ts), MAX(ts), "
            "SUM(CASE WHEN arm = :shadow_arm THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN arm = :challenger_arm THEN 1 ELSE 0 END), COUNT(*) "
            f"FROM predictions WHERE {scope.where()}"
        ),
        {
            **scope.params(),
            "shadow_arm": Arm.SHADOW.value,
            "challenger_arm": Arm.CHALLENGER.value,
        },
    ).one()
    keyed, max_row, first, last, shadow, challenger, total = row
    return {
        "keyed": bool(keyed),
        "all_keyed": bool(keyed) and keyed == total,
        "multi_row": (max_row or 0) > 0,
        "first_ts": first,
        "last_ts": last,
        "shadow_rows": bool(shadow),
        "challenger_rows": bool(challenger),
        "rows": total,
    }


def _moments(prefix: str, r: Mapping[str, Any]) -> UnitMoments:
    return UnitMoments(
        int(r["units"] or 0),
        float(r[f"{prefix}x"] or 0.0),
        float(r[f"{prefix}y"] or 0.0),
        float(r[f"{prefix}xx"] or 0.0),
        float(r[f"{prefix}yy"] or 0.0),
        float(r[f"{prefix}xy"] or 0.0),
    )


def _requests(
    conn: Connection, scope: Scope, arms: Sequence[str], unit: str | None
) -> dict[str, dict[str, Any]]:
    """Per arm: requests, client errors, fallbacks, units and the fault moments (row 0 rows)."""
    params: dict[str, Any] = {**scope.params(), "client": RowStatus.CLIENT_ERROR.value}
    arm_in = _in_list("arm", arms, params)
    faults_in = _in_list("fault", sorted(r.value for r in MODEL_FAULTS), params)
    params["fallback"] = RowStatus.FALLBACK.value
    per_row = (
        "SELECT arm, {unit} AS unit, "
        "CASE WHEN status = :client THEN 0 ELSE 1 END AS r, "
        f"CASE WHEN status <> :client AND reason IN {faults_in} THEN 1 ELSE 0 END AS f, "
        "CASE WHEN status = :client THEN 1 ELSE 0 END AS ce, "
        "CASE WHEN status = :fallback THEN 1 ELSE 0 END AS fb "
        f"FROM predictions WHERE {scope.where()} AND row_index = 0 AND arm IN {arm_in}"
    )
    if unit is None:  # every request its own unit: x = f, y = r per unit
        sql = (
            "SELECT arm, SUM(r) AS units, SUM(f) AS fx, SUM(r) AS fy, SUM(f) AS fxx, "
            "SUM(r) AS fyy, SUM(f) AS fxy, SUM(ce) AS ce, SUM(fb) AS fb, SUM(r) AS requests "
            f"FROM ({per_row.format(unit='NULL')}) t GROUP BY arm"
        )
    else:
        sql = (
            "SELECT arm, SUM(CASE WHEN r > 0 THEN 1 ELSE 0 END) AS units, SUM(f) AS fx, "
            "SUM(r) AS fy, SUM(f * f) AS fxx, SUM(r * r) AS fyy, SUM(f * r) AS fxy, "
            "SUM(ce) AS ce, SUM(fb) AS fb, SUM(r) AS requests FROM ("
            "SELECT arm, unit, SUM(r) AS r, SUM(f) AS f, SUM(ce) AS ce, SUM(fb) AS fb "
            f"FROM ({per_row.format(unit=unit)}) t GROUP BY arm, unit) u GROUP BY arm"
        )
    return {r["arm"]: dict(r) for r in conn.execute(sa.text(sql), params).mappings()}


def _latencies(conn: Connection, scope: Scope, arms: Sequence[str]) -> dict[str, LatencyHistogram]:
    params: dict[str, Any] = {
        **scope.params(),
        "ok": RowStatus.OK.value,
        "base": LATENCY_BASE_S,
        "lnr": math.log(LATENCY_RATIO),
    }
    arm_in = _in_list("arm", arms, params)
    # One integer key (the bucket) and a count per arm as columns: SQLite sorts to group, and a
    # lone integer key with half the groups sorts fastest (-25% CPU on 10M rows).
    per_arm = ", ".join(
        f"SUM(CASE WHEN arm = :arm{i} THEN 1 ELSE 0 END) AS n{i}" for i in range(len(arms))
    )
    rows = (
        "SELECT CAST(FLOOR(LN(latency_s / :base) / :lnr) AS INTEGER) AS b, arm "
        f"FROM predictions WHERE {scope.where()} AND row_index = 0 AND arm IN {arm_in} "
        f"AND status = :ok AND latency_s > 0{_unflattened(conn)}"
    )
    sql = f"SELECT b, {per_arm} FROM ({rows}) t GROUP BY b"
    counts: dict[str, dict[int, int]] = {a: {} for a in arms}
    for b, *ns in conn.execute(sa.text(sql), params):
        for arm, n in zip(arms, ns, strict=True):
            if n:
                counts[arm][int(b)] = int(n)
    return {a: LatencyHistogram(c) for a, c in counts.items()}


def _judged_rows(
    scope: Scope,
    mode: RoutingMode,
    metric: MetricName,
    pairs: Sequence[tuple[str, str]],
    unit: str,
    cap: float | None,
    params: dict[str, Any],
    covariate: bool = False,
) -> str:
    """Matured predictions (status served), one row each: arm, unit, slice, metric v, covered c."""
    served = _in_list("served", sorted(s.value for s in SERVED_STATUSES), params)
    counted = "o.ts IS NOT NULL AND o.ts <= {a}.ts + :window"
    slice_ = "CAST(FLOOR(({a}.ts - :t0) / :width) AS INTEGER)"

    def value(alias: str) -> str:
        v = _metric_sql(metric, alias, pairs, params)
        if cap is not None:
            params["cap"] = cap
            v = f"(CASE WHEN ({v}) > :cap THEN :cap ELSE ({v}) END)"
        return f"CASE WHEN {counted.format(a=alias)} THEN {v} END"

    join = "LEFT JOIN outcomes o ON o.request_id = {a}.request_id AND o.row_index = {a}.row_index"
    if mode == RoutingMode.SPLIT:
        params["arm_c"], params["arm_t"] = Arm.CHAMPION.value, Arm.CHALLENGER.value
        return (
            f"SELECT p.arm AS arm, {unit.format(a='p')} AS unit, {slice_.format(a='p')} AS slice, "
            f"{value('p')} AS v, CASE WHEN {counted.format(a='p')} THEN 1 ELSE 0 END AS c, "
            f"{scope.weight_of('p.')} AS w"  # the period (experiments/strata.py)
            + (f", {_covariate_sql(metric, 'p')} AS g " if covariate else " ")
            + f"FROM predictions p {join.format(a='p')} "
            f"WHERE {scope.where('p.')} AND p.arm IN (:arm_c, :arm_t) "
            f"AND p.status IN {served} AND p.ts <= :cutoff"
        )
    # Shadow: the same rows scored by both; judged as pairs ("diff" = shadow − champion).
    params["arm_c"], params["arm_s"] = Arm.CHAMPION.value, Arm.SHADOW.value
    pair = (
        f"SELECT {unit.format(a='p')} AS unit, {slice_.format(a='p')} AS slice, "
        f"{value('p')} AS v1, {value('s')} AS v2, "
        f"CASE WHEN {counted.format(a='p')} THEN 1 ELSE 0 END AS c "
        "FROM predictions p JOIN predictions s ON s.request_id = p.request_id "
        "AND s.row_index = p.row_index AND s.arm = :arm_s "
        f"{join.format(a='p')} "
        f"WHERE {scope.where('p.')} AND p.arm = :arm_c AND p.status IN {served} "
        f"AND s.status IN {served} AND p.ts <= :cutoff"
    )
    both = "CASE WHEN v1 IS NOT NULL AND v2 IS NOT NULL THEN {e} END"
    return (
        f"SELECT '{Arm.CHAMPION.value}' AS arm, unit, slice, {both.format(e='v1')} AS v, c "
        f"FROM ({pair}) a "
        f"UNION ALL SELECT '{Arm.SHADOW.value}', unit, slice, {both.format(e='v2')}, c "
        f"FROM ({pair}) b "
        f"UNION ALL SELECT 'diff', unit, slice, {both.format(e='v2 - v1')}, c FROM ({pair}) d"
    )


def _metric_cells(
    conn: Connection, judged: str, keyed: bool, params: dict[str, Any], covariate: bool = False
) -> list[Any]:
    """Per arm and slice: units first seen, and the increments of the metric/coverage moments."""
    if not keyed:  # every prediction its own unit: the moments are plain sums
        sql = (
            "SELECT arm, slice, COUNT(*) AS units, "
            "COALESCE(SUM(v), 0) AS mx, COUNT(v) AS my, COALESCE(SUM(v * v), 0) AS mxx, "
            "COUNT(v) AS myy, COALESCE(SUM(v), 0) AS mxy, "
            "SUM(c) AS cx, COUNT(*) AS cy, SUM(c) AS cxx, COUNT(*) AS cyy, SUM(c) AS cxy, "
            "SUM(CASE WHEN c = 1 AND v IS NULL THEN 1 ELSE 0 END) AS skipped"
            + (_ROW_COVARIATE_SUMS if covariate else "")
            + f" FROM ({judged}) j GROUP BY arm, slice"
        )
        return list(conn.execute(sa.text(sql), params).mappings())

    def sq(t: str, d: str) -> str:  # increment of Σ_u T_u² when unit u adds d this slice
        return f"SUM({t} * {t} - ({t} - {d}) * ({t} - {d}))"

    def cross(t1: str, d1: str, t2: str, d2: str) -> str:
        return f"SUM({t1} * {t2} - ({t1} - {d1}) * ({t2} - {d2}))"

    sql = (
        "WITH cells AS (SELECT arm, unit, slice, COALESCE(SUM(v), 0) AS mx, COUNT(v) AS my, "
        "SUM(c) AS cx, COUNT(*) AS cy, "
        "SUM(CASE WHEN c = 1 AND v IS NULL THEN 1 ELSE 0 END) AS skipped "
        f"FROM ({judged}) j GROUP BY arm, unit, slice), "
        "run AS (SELECT arm, slice, mx, my, cx, cy, skipped, "
        "SUM(mx) OVER w AS tmx, SUM(my) OVER w AS tmy, SUM(cx) OVER w AS tcx, "
        "SUM(cy) OVER w AS tcy, ROW_NUMBER() OVER w AS k FROM cells "
        "WINDOW w AS (PARTITION BY arm, unit ORDER BY slice ROWS UNBOUNDED PRECEDING)) "
        "SELECT arm, slice, SUM(CASE WHEN k = 1 THEN 1 ELSE 0 END) AS units, "
        f"SUM(mx) AS mx, SUM(my) AS my, {sq('tmx', 'mx')} AS mxx, {sq('tmy', 'my')} AS myy, "
        f"{cross('tmx', 'mx', 'tmy', 'my')} AS mxy, "
        f"SUM(cx) AS cx, SUM(cy) AS cy, {sq('tcx', 'cx')} AS cxx, {sq('tcy', 'cy')} AS cyy, "
        f"{cross('tcx', 'cx', 'tcy', 'cy')} AS cxy, SUM(skipped) AS skipped "
        "FROM run GROUP BY arm, slice"
    )
    return list(conn.execute(sa.text(sql), params).mappings())


def _cap(conn: Connection, judged: str, q: float, params: dict[str, Any]) -> float | None:
    """The metric's q-quantile over both arms, from a histogram (``cap_from_histogram``)."""
    p = dict(params, lnr=math.log(LATENCY_RATIO), base=LATENCY_BASE_S, low=NONPOSITIVE_BUCKET)
    sql = (
        "SELECT CASE WHEN v <= 0 THEN :low ELSE "
        "CAST(FLOOR(LN(v / :base) / :lnr) AS INTEGER) END AS b, COUNT(*) AS n "
        f"FROM ({judged}) j WHERE v IS NOT NULL AND arm <> 'diff' GROUP BY b"
    )
    return cap_from_histogram({int(b): int(n) for b, n in conn.execute(sa.text(sql), p)}, q)


def _unit_pass(
    conn: Connection,
    scope: Scope,
    arms: Sequence[str],
    metric: MetricName,
    pairs: Sequence[tuple[str, str]],
    unit: str,
    cap: float | None,
    params: dict[str, Any],
    covariate: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Split mode with units: requests, faults, coverage and the metric in ONE GROUP BY unit.

    Sorting rows by unit is what costs (SQLite has no hash aggregation), so it is done once.
    """
    params = dict(params, client=RowStatus.CLIENT_ERROR.value, fallback=RowStatus.FALLBACK.value)
    arm_in = _in_list("arm", arms, params)
    faults_in = _in_list("fault", sorted(r.value for r in MODEL_FAULTS), params)
    served = _in_list("served", sorted(s.value for s in SERVED_STATUSES), params)
    v = _metric_sql(metric, "p", pairs, params)
    if cap is not None:
        params["cap"] = cap
        v = f"(CASE WHEN ({v}) > :cap THEN :cap ELSE ({v}) END)"
    g = f", {_covariate_sql(metric, 'p')} AS g" if covariate else ""
    matured = f"p.status IN {served} AND p.ts <= :cutoff"
    counted = "o.ts IS NOT NULL AND o.ts <= p.ts + :window"
    # Per row: the unit, the slice if matured, one integer of flags and the metric. Six 0/1 facts
    # packed into one column keep the rows the GROUP BY sorts narrow (SQLite sorts to group) and
    # test each condition once: 1 request (row 0, not a client error), 2 model fault, 4 client
    # error, 8 fallback, 16 matured, 32 outcome counted (within the window).
    flags = (
        "CASE WHEN p.row_index = 0 THEN CASE WHEN p.status = :client THEN 4 ELSE 1 "
        f"+ CASE WHEN p.reason IN {faults_in} THEN 2 ELSE 0 END "
        "+ CASE WHEN p.status = :fallback THEN 8 ELSE 0 END END ELSE 0 END "
        f"+ CASE WHEN {matured} THEN 16 + CASE WHEN {counted} THEN 32 ELSE 0 END ELSE 0 END"
    )
    rows = (
        f"SELECT p.arm AS arm, {unit.format(a='p')} AS unit, "
        f"CASE WHEN {matured} THEN CAST(FLOOR((p.ts - :t0) / :width) AS INTEGER) END AS ms, "
        f"{flags} AS k, CASE WHEN {matured} AND {counted} THEN {v} END AS v{g} "
        "FROM predictions p LEFT JOIN outcomes o ON o.request_id = p.request_id "
        f"AND o.row_index = p.row_index WHERE {scope.where('p.')} AND p.arm IN {arm_in}"
    )
    rows += _unflattened(conn)
    # One sort by unit (unit first: SQLite's sorter settles most comparisons on the leading key
    # alone, where "arm" first ties on nine rows in ten); the running interval follows cohorts of
    # units by the slice of their first judged prediction (GrowthBook plots its cumulative results
    # by first exposure the same way): a second GROUP BY over units, not rows.
    sql = (
        "SELECT arm, first, COUNT(*) AS units, SUM(CASE WHEN r > 0 THEN 1 ELSE 0 END) AS runits, "
        "SUM(f) AS fx, SUM(r) AS fy, SUM(f * f) AS fxx, SUM(r * r) AS fyy, SUM(f * r) AS fxy, "
        "SUM(ce) AS ce, SUM(fb) AS fb, "
        "SUM(cx) AS cx, SUM(cy) AS cy, SUM(cx * cx) AS cxx, SUM(cy * cy) AS cyy, "
        "SUM(cx * cy) AS cxy, SUM(mx) AS mx, SUM(my) AS my, SUM(mx * mx) AS mxx, "
        "SUM(my * my) AS myy, SUM(mx * my) AS mxy, SUM(skipped) AS skipped"
        + (_UNIT_COVARIATE_SUMS if covariate else "")
        + " FROM (SELECT arm, unit, MIN(ms) AS first, SUM(k & 1) AS r, SUM(k & 2) / 2 AS f, "
        "SUM(k & 4) / 4 AS ce, SUM(k & 8) / 8 AS fb, SUM(k & 16) / 16 AS cy, "
        "SUM(k & 32) / 32 AS cx, COALESCE(SUM(v), 0) AS mx, COUNT(v) AS my, "
        "SUM(CASE WHEN k >= 32 AND v IS NULL THEN 1 ELSE 0 END) AS skipped"
        + (_UNIT_COVARIATE_TERMS if covariate else "")
        + f" FROM ({rows}) t GROUP BY unit, arm) u GROUP BY arm, first"
    )
    requests: dict[str, dict[str, Any]] = {}
    cells: list[dict[str, Any]] = []
    fault_keys = ("fx", "fy", "fxx", "fyy", "fxy", "ce", "fb")
    for r in conn.execute(sa.text(sql), params).mappings():
        arm = r["arm"]
        total = requests.setdefault(arm, dict.fromkeys(("units", "requests", *fault_keys), 0))
        total["units"] += r["runits"] or 0
        total["requests"] += r["fy"] or 0
        for key in fault_keys:
            total[key] += r[key] or 0
        if r["first"] is not None:  # units with judged predictions: metric and coverage
            cells.append({**dict(r), "slice": r["first"]})
    return requests, cells


def read_summary(
    conn: Connection,
    eid: str,
    *,
    metric: MetricName,
    cutoff: float,
    window_s: float,
    cap_quantile: float | None,
    default_weight: float,
    current_weight: float | None = None,
) -> LogSummary:
    """Sufficient statistics of experiment ``eid``: predictions up to ``cutoff`` are matured.

    In split mode, also per period of one challenger weight (``default_weight`` for rows logged
    without one); with several, each period is read on its own and the metric is combined over
    them (:mod:`experiments.strata`). ``current_weight``: the split in force, whose period the
    guardrails judge (default: the period of the latest row).
    """
    _tune(conn)
    columns = sa.inspect(conn).get_columns(logschema.predictions.name)
    logged = any(c["name"] == logschema.predictions.c.challenger_weight.name for c in columns)
    whole = Scope(eid, default_weight=default_weight, weights_logged=logged)
    shape = _shape(conn, whole)
    mode: RoutingMode | None
    if shape["shadow_rows"] and shape["challenger_rows"]:
        mode = None
    else:
        mode = RoutingMode.SHADOW if shape["shadow_rows"] else RoutingMode.SPLIT
    keyed = shape["keyed"]
    # Every row keyed: the key alone is the unit (the same groups as the COALESCE), and
    # PostgreSQL's statistics on the column then size the per-unit aggregation right (for the
    # COALESCE it guesses one group per row, and sorts instead of hashing).
    unit_sql = (
        (
            "{a}.routing_key_hash"
            if shape["all_keyed"]
            else "COALESCE({a}.routing_key_hash, {a}.request_id)"
        )
        if keyed
        else ("{a}.request_id" if shape["multi_row"] else "NULL")
    )
    reader = _Reader(conn, mode, shape, unit_sql, metric, cutoff, window_s)
    periods = _periods(conn, whole) if mode == RoutingMode.SPLIT else []
    if len(periods) <= 1:
        summary = reader.read(whole, shape, cap_quantile, None)
        if not periods:
            return summary
        weight, first, last = periods[0]
        period = Period(weight, summary.champion, summary.challenger, first, last)
        return replace(summary, periods=(period,), current=_current([period], current_weight))
    cap = reader.cap(whole, cap_quantile) if cap_quantile is not None else None
    parts = []
    for weight, first, last in periods:
        scope = replace(whole, weight=weight)
        part = reader.read(scope, {**shape, "first_ts": first, "last_ts": last}, None, cap)
        parts.append(Period(weight, part.champion, part.challenger, first, last))
    arms = [Arm.CHAMPION.value, Arm.CHALLENGER.value]
    requests = _requests(conn, whole, arms, reader.request_unit)  # units: distinct over periods
    champion, challenger = (
        _pooled(arm, [getattr(p, arm) for p in parts], requests.get(arm, {})) for arm in arms
    )
    return LogSummary(
        mode=mode,
        keyed=keyed,
        champion=champion,
        challenger=challenger,
        first_ts=shape["first_ts"],
        cap=cap,
        periods=tuple(parts),
        current=_current(parts, current_weight),
        stratified=_stratified(reader, whole, parts, cap),
    )


def _periods(conn: Connection, scope: Scope) -> list[tuple[float, float, float]]:
    """(weight, first ts, last ts) of each challenger weight the experiment's rows were assigned
    under, in order of first appearance."""
    params = scope.params()
    params["arm_c"], params["arm_t"] = Arm.CHAMPION.value, Arm.CHALLENGER.value
    sql = (
        "SELECT w, MIN(ts) AS first, MAX(ts) AS last FROM (SELECT "
        f"{scope.weight_of()} AS w, ts FROM predictions "
        f"WHERE {scope.where()} AND arm IN (:arm_c, :arm_t)) t GROUP BY w ORDER BY first"
    )
    return [(float(w), float(a), float(b)) for w, a, b in conn.execute(sa.text(sql), params)]


def _current(parts: Sequence[Period], weight: float | None) -> int | None:
    if weight is None:
        return max(range(len(parts)), key=lambda i: parts[i].last_ts or 0.0)
    found = [i for i, p in enumerate(parts) if p.weight == weight]
    return found[0] if found else None


def _pooled(arm: str, data: Sequence[ArmData], requests: Mapping[str, Any]) -> ArmData:
    """An arm over all periods: counts and sums add up; units and the fault moments are read
    over the whole experiment (a unit active in two periods is one unit)."""
    zero = UnitMoments.zero()
    return ArmData(
        requests=int(requests.get("requests") or 0),
        client_errors=int(requests.get("ce") or 0),
        fallbacks=int(requests.get("fb") or 0),
        units=int(requests.get("units") or 0),
        faults=_moments("f", requests) if requests else zero,
        coverage=sum((d.coverage for d in data), zero),
        metric=sum((d.metric for d in data), zero),
        skipped=sum(d.skipped for d in data),
        latency=LatencyHistogram(dict(sum((Counter(d.latency.counts) for d in data), Counter()))),
    )


def _stratified(
    reader: _Reader, whole: Scope, parts: Sequence[Period], cap: float | None
) -> Stratified | None:
    """The metric combined over periods: the standardised means from the periods' sums, their
    variances from one pass over units (each unit's influence summed over its rows)."""
    plan = strata.plan(parts)
    if plan is None:
        return None
    sums = reader.influence_sums(whole, plan, cap)
    return strata.combine(plan, sums)


class _Reader:
    """One experiment's reads, shared by its periods (the unit and the label pairs are the
    experiment's, whichever period is read)."""

    def __init__(
        self,
        conn: Connection,
        mode: RoutingMode | None,
        shape: Mapping[str, Any],
        unit_sql: str,
        metric: MetricName,
        cutoff: float,
        window_s: float,
    ) -> None:
        self.conn = conn
        self.mode = mode
        self.shape = shape
        self.unit_sql = unit_sql
        self.metric = metric
        self.cutoff = cutoff
        self.window_s = window_s
        self.arms = [Arm.CHAMPION.value, challenger_arm(mode).value]
        self.request_unit = None if unit_sql == "NULL" else unit_sql.format(a="predictions")
        self.unit_rows = unit_sql if unit_sql != "NULL" else "{a}.request_id"
        self._pairs: list[tuple[str, str]] | None = None
        self.champion_scores = has_champion_scores(conn)

    def pairs(self, scope: Scope) -> list[tuple[str, str]]:
        if self._pairs is None:
            self._pairs = label_pairs(self.conn, scope.eid) if self.metric == "accuracy" else []
        return self._pairs

    def params(self, scope: Scope, first: float, last: float) -> dict[str, Any]:
        width = max((min(last, self.cutoff) - first) / SLICES, 1e-9) * (1 + 1e-9)
        return {
            **scope.params(),
            "cutoff": self.cutoff,
            "window": self.window_s,
            "t0": first,
            "width": width,
        }

    def cap(self, scope: Scope, quantile: float) -> float | None:
        first, last = self.shape["first_ts"], self.shape["last_ts"]
        if self.mode is None or first is None or first > self.cutoff:
            return None
        params = self.params(scope, first, last)
        judged = _judged_rows(
            scope, self.mode, self.metric, self.pairs(scope), self.unit_rows, None, params
        )
        return _cap(self.conn, judged, quantile, params)

    def read(
        self,
        scope: Scope,
        shape: Mapping[str, Any],
        cap_quantile: float | None,
        cap: float | None,
    ) -> LogSummary:
        """The summary of ``scope``'s rows; the cap computed at ``cap_quantile``, else ``cap``."""
        conn, mode, arms, metric = self.conn, self.mode, self.arms, self.metric
        keyed = self.shape["keyed"]
        latency = _latencies(conn, scope, arms)
        cells: list[Any] = []
        first, last = shape["first_ts"], shape["last_ts"]
        by_unit = mode == RoutingMode.SPLIT and self.request_unit is not None
        if not (by_unit and first is not None and first <= self.cutoff):
            requests = _requests(conn, scope, arms, self.request_unit)
        if mode is not None and first is not None and first <= self.cutoff:
            pairs = self.pairs(scope)
            params = self.params(scope, first, last)
            unit_rows = self.unit_rows
            if cap_quantile is not None:
                judged = _judged_rows(scope, mode, metric, pairs, unit_rows, None, params)
                cap = _cap(conn, judged, cap_quantile, params)
            # The covariate (the champion's score of each row's input): split mode, when logged.
            cov = mode == RoutingMode.SPLIT and self.champion_scores
            if by_unit:
                requests, cells = _unit_pass(
                    conn, scope, arms, metric, pairs, unit_rows, cap, params, covariate=cov
                )
            else:
                judged = _judged_rows(
                    scope, mode, metric, pairs, unit_rows, cap, params, covariate=cov
                )
                multi = keyed or self.shape["multi_row"]
                cells = _metric_cells(conn, judged, multi, params, cov)
            width = params["width"]
            summary = _summarise(mode, keyed, arms, requests, latency, cells, first, width, cap)
            if cov:
                summary = replace(summary, covariate=covariate_folds(cells, arms))
            return summary
        return _summarise(mode, keyed, arms, requests, latency, cells, first, 0.0, cap)

    def influence_sums(self, scope: Scope, plan: strata.Plan, cap: float | None) -> strata.Sums:
        """One pass over units: Σ z_T², Σ z_C², Σ z_T·z_C and the units of each arm, where a
        unit's z sums ``plan``'s coefficient × (row metric − its period's mean) over its rows."""
        first, last = self.shape["first_ts"], self.shape["last_ts"]
        params = self.params(scope, first, last)
        judged = _judged_rows(
            scope, RoutingMode.SPLIT, self.metric, self.pairs(scope), self.unit_rows, cap, params
        )

        def z(arm: Arm, cells: Sequence[strata.Cell]) -> str:
            whens = []
            for i, cell in enumerate(cells):
                key = f"{'t' if arm is Arm.CHALLENGER else 'c'}{i}"
                params[f"w_{key}"], params[f"c_{key}"], params[f"m_{key}"] = (
                    cell.weight,
                    cell.coefficient,
                    cell.mean,
                )
                whens.append(f"WHEN j.w = :w_{key} THEN :c_{key} * (j.v - :m_{key})")
            params[f"arm_{arm.value}"] = arm.value
            cases = " ".join(whens) or "WHEN 1 = 0 THEN 0"
            return f"CASE WHEN j.arm = :arm_{arm.value} THEN CASE {cases} END END"

        rows = (
            f"SELECT j.unit AS unit, {z(Arm.CHALLENGER, plan.challenger)} AS zt, "
            f"{z(Arm.CHAMPION, plan.champion)} AS zc FROM ({judged}) j WHERE j.v IS NOT NULL"
        )
        sql = (
            "SELECT SUM(zt * zt), SUM(zc * zc), SUM(zt * zc), "
            "SUM(CASE WHEN nt > 0 THEN 1 ELSE 0 END), SUM(CASE WHEN nc > 0 THEN 1 ELSE 0 END), "
            "COUNT(*) FROM (SELECT unit, COALESCE(SUM(zt), 0) AS zt, COALESCE(SUM(zc), 0) AS zc, "
            f"COUNT(zt) AS nt, COUNT(zc) AS nc FROM ({rows}) r GROUP BY unit) u"
        )
        tt, cc, tc, nt, nc, n = self.conn.execute(sa.text(sql), params).one()
        return strata.Sums(
            float(tt or 0.0), float(cc or 0.0), float(tc or 0.0), int(nt or 0), int(nc or 0), int(n)
        )


def _summarise(
    mode: RoutingMode | None,
    keyed: bool,
    arms: Sequence[str],
    requests: Mapping[str, Mapping[str, Any]],
    latency: Mapping[str, LatencyHistogram],
    cells: Sequence[Mapping[str, Any]],
    first: float | None,
    width: float,
    cap: float | None,
) -> LogSummary:
    zero = UnitMoments.zero()
    metric = {a: zero for a in [*arms, "diff"]}
    coverage = {a: zero for a in [*arms, "diff"]}
    skipped = {a: 0 for a in [*arms, "diff"]}
    by_slice: dict[int, dict[str, UnitMoments]] = {}
    for r in cells:
        m, c = _moments("m", r), _moments("c", r)
        metric[r["arm"]] += m
        coverage[r["arm"]] += c
        skipped[r["arm"]] += int(r["skipped"] or 0)
        by_slice.setdefault(int(r["slice"]), {})[r["arm"]] = m
    series = tuple(
        SeriesSlice(
            ts=(first or 0.0) + (s + 1) * width,
            champion=by_slice[s].get(arms[0], zero),
            challenger=by_slice[s].get("diff" if mode == RoutingMode.SHADOW else arms[1], zero),
        )
        for s in sorted(by_slice)
    )

    def arm_data(arm: str) -> ArmData:
        r = requests.get(arm, {})
        return ArmData(
            requests=int(r.get("requests") or 0),
            client_errors=int(r.get("ce") or 0),
            fallbacks=int(r.get("fb") or 0),
            units=int(r.get("units") or 0),
            faults=_moments("f", r) if r else zero,
            coverage=coverage[arm],
            metric=metric[arm],
            skipped=skipped[arm],
            latency=latency.get(arm, LatencyHistogram()),
        )

    return LogSummary(
        mode=mode,
        keyed=keyed,
        champion=arm_data(arms[0]),
        challenger=arm_data(arms[1]),
        paired=metric["diff"] if mode == RoutingMode.SHADOW else None,
        series=series,
        first_ts=first,
        cap=cap,
    )


# --- the covariate's sums (experiments/covariate.py) -----------------------------------------
# Per unit: g summed over the unit's judged rows that have a covariate (kc), and the count of its
# judged rows without one (km), with every square and cross-product with the metric's x (mx) and
# y (my); experiments.covariate.CovariateSums imputes the missing ones afterwards.

_UNIT_COVARIATE_TERMS = (
    ", COALESCE(SUM(CASE WHEN v IS NOT NULL THEN g END), 0) AS kc, "
    "SUM(CASE WHEN v IS NOT NULL AND g IS NULL THEN 1 ELSE 0 END) AS km"
)
_UNIT_COVARIATE_SUMS = (
    ", SUM(kc) AS kc, SUM(km) AS km, SUM(kc * kc) AS kcc, SUM(km * km) AS kmm, "
    "SUM(kc * km) AS kcm, SUM(mx * kc) AS kxc, SUM(mx * km) AS kxm, SUM(my * kc) AS kyc, "
    "SUM(my * km) AS kym"
)
# Every prediction its own unit: a unit has the covariate (c = g, m = 0) or lacks it (c = 0,
# m = 1), so c·m = 0, m² = m and y = 1 on its judged row.
_ROW_COVARIATE_SUMS = (
    ", COALESCE(SUM(CASE WHEN v IS NOT NULL THEN g END), 0) AS kc, "
    "SUM(CASE WHEN v IS NOT NULL AND g IS NULL THEN 1 ELSE 0 END) AS km, "
    "COALESCE(SUM(CASE WHEN v IS NOT NULL THEN g * g END), 0) AS kcc, "
    "SUM(CASE WHEN v IS NOT NULL AND g IS NULL THEN 1 ELSE 0 END) AS kmm, 0 AS kcm, "
    "COALESCE(SUM(v * g), 0) AS kxc, "
    "COALESCE(SUM(CASE WHEN g IS NULL THEN v END), 0) AS kxm, "
    "COALESCE(SUM(CASE WHEN v IS NOT NULL THEN g END), 0) AS kyc, "
    "SUM(CASE WHEN v IS NOT NULL AND g IS NULL THEN 1 ELSE 0 END) AS kym"
)


def _covariate_sums(r: Mapping[str, Any]) -> CovariateSums:
    def f(key: str) -> float:
        return float(r[key] or 0.0)

    return CovariateSums(
        n=int(r["units"] or 0),
        sum_x=f("mx"),
        sum_y=f("my"),
        sum_c=f("kc"),
        sum_m=f("km"),
        sum_xx=f("mxx"),
        sum_yy=f("myy"),
        sum_xy=f("mxy"),
        sum_cc=f("kcc"),
        sum_mm=f("kmm"),
        sum_cm=f("kcm"),
        sum_xc=f("kxc"),
        sum_xm=f("kxm"),
        sum_yc=f("kyc"),
        sum_ym=f("kym"),
    )


def covariate_folds(cells: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> CovariateFolds:
    """The cells' covariate sums in two folds of units: the parity of the slice of each unit's
    first judged prediction (a split independent of arm and outcome; the cross-fitting's)."""
    zero = CovariateSums()
    folds = {arm: [zero, zero] for arm in arms}
    for r in cells:
        fold = int(r["slice"]) % 2
        folds[r["arm"]][fold] = folds[r["arm"]][fold] + _covariate_sums(r)
    c, t = folds[arms[0]], folds[arms[1]]
    return CovariateFolds((c[0], c[1]), (t[0], t[1]))
