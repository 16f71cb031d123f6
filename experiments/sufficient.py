"""What the evaluator reads from the prediction log: per-arm sufficient statistics, no rows.

:mod:`experiments.aggregate` fills these in SQL (one row per arm and time slice comes back, never
one per prediction), :mod:`experiments.simulate` draws them directly, and both hand them to the
same pure :func:`experiments.judge.judge`. Every figure is summable, so time slices add up to the
whole experiment and the report's confidence sequence is a running sum.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from experiments.covariate import CovariateFolds
from experiments.stats import UnitMoments
from router.logschema import RoutingMode

#: Latency buckets are geometric: bucket b holds [LATENCY_BASE_S·r^b, LATENCY_BASE_S·r^(b+1)).
#: A 1% ratio bounds a quantile to within 1% while the log returns a few hundred buckets.
LATENCY_BASE_S = 1e-6
LATENCY_RATIO = 1.01


@dataclass(frozen=True)
class LatencyHistogram:
    """Counts of model latencies per geometric bucket (bucket index -> count)."""

    counts: Mapping[int, int] = field(default_factory=dict)

    @functools.cached_property
    def _cumulative(self) -> tuple[list[int], list[int]]:
        keys = sorted(self.counts)
        return keys, list(itertools.accumulate(self.counts[k] for k in keys))

    @property
    def n(self) -> int:
        cumulative = self._cumulative[1]
        return cumulative[-1] if cumulative else 0

    @staticmethod
    def edge(bucket: float) -> float:
        return float(LATENCY_BASE_S * LATENCY_RATIO**bucket)

    @classmethod
    def from_values(cls, latencies_s: list[float]) -> LatencyHistogram:
        counts: dict[int, int] = {}
        for v in latencies_s:
            if v > 0:
                b = cls.bucket(v)
                counts[b] = counts.get(b, 0) + 1
        return cls(counts)

    @staticmethod
    def bucket(value: float) -> int:
        return math.floor(math.log(value / LATENCY_BASE_S) / math.log(LATENCY_RATIO))

    def order_statistic_bounds(self, rank: int) -> tuple[float, float]:
        """The bucket edges around the rank-th smallest latency (1-based): it lies between them."""
        if rank < 1:
            return 0.0, 0.0
        if rank > self.n:
            return math.inf, math.inf
        keys, cumulative = self._cumulative
        b = keys[bisect.bisect_left(cumulative, rank)]
        return self.edge(b), self.edge(b + 1)

    def quantile(self, q: float) -> float | None:
        """The q-quantile, to bucket resolution (the bucket's geometric middle)."""
        n = self.n
        if n == 0:
            return None
        lo, hi = self.order_statistic_bounds(max(1, math.ceil(q * n)))
        return math.sqrt(lo * hi)


#: Bucket of metric values <= 0 in ``cap_from_histogram`` (log buckets need positive values).
NONPOSITIVE_BUCKET = -1_000_000


def cap_from_histogram(counts: Mapping[int, int], q: float) -> float | None:
    """The cap for winsorising: the upper edge of the geometric bucket holding the q-quantile of
    both arms' row metric values (within 1% of the exact quantile; the same cap for both arms is
    what keeps the comparison fair, its exact value is not)."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for b in sorted(counts):
        seen += counts[b]
        if seen >= rank:
            return 0.0 if b == NONPOSITIVE_BUCKET else LatencyHistogram.edge(b + 1)
    return None  # pragma: no cover - rank <= total always lands in a bucket


@dataclass(frozen=True)
class ArmData:
    """One arm's figures, intent-to-treat: every request assigned to the arm counts in it.

    ``faults`` is per unit x = requests that failed for a model fault (``MODEL_FAULTS``), y =
    requests (client errors excluded): its ratio is the error rate, and ``requests_per_unit``
    comes from the same sums. ``coverage`` is per unit x = matured predictions whose outcome
    arrived within the window, y = matured predictions. ``metric`` is per unit x = the metric
    summed over those rows with a usable outcome, y = their number.
    """

    requests: int = 0  # assigned requests, client errors excluded
    client_errors: int = 0
    fallbacks: int = 0  # challenger requests answered by the champion's fallback
    units: int = 0  # distinct randomisation units with a request
    faults: UnitMoments = field(default_factory=UnitMoments.zero)
    coverage: UnitMoments = field(default_factory=UnitMoments.zero)
    metric: UnitMoments = field(default_factory=UnitMoments.zero)
    skipped: int = 0  # rows with an outcome the metric could not use (no score, label not 0/1)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def faulted(self) -> int:
        return round(self.faults.sum_x)

    @property
    def requests_per_unit(self) -> UnitMoments:
        """Per unit x = its requests, y = 1: the mean is requests per unit."""
        f = self.faults
        return UnitMoments(f.n, f.sum_y, float(f.n), f.sum_yy, float(f.n), f.sum_y)


@dataclass(frozen=True)
class SeriesSlice:
    """The metric sums added by predictions made in one time slice (for the running interval)."""

    ts: float  # end of the slice: predictions up to here
    champion: UnitMoments
    challenger: UnitMoments


@dataclass(frozen=True)
class Period:
    """The rows assigned under one challenger weight: a randomised experiment of its own (every
    unit active then had the same chance of the challenger), compared with its own expected
    shares. Split mode only; a log without the weight column is one period at the configured
    weight."""

    weight: float
    champion: ArmData
    challenger: ArmData
    first_ts: float | None = None
    last_ts: float | None = None


@dataclass(frozen=True)
class Stratified:
    """The primary metric combined over periods (:mod:`experiments.strata`).

    Each arm's mean is standardised to the periods' weights ``weights`` (the same for both arms,
    so a trend over time weighs on both alike); the variances and the covariance are over units
    (a unit's rows may span periods, and arms when an increase moved it), delta-method.
    """

    weights: tuple[float, ...]  # per period (LogSummary.periods' order), summing to 1
    champion_mean: float
    challenger_mean: float
    champion_variance: float
    challenger_variance: float
    covariance: float  # of the two standardised means (units in both arms)
    champion_units: int
    challenger_units: int


@dataclass(frozen=True)
class LogSummary:
    """Everything the judge needs from the log for one experiment."""

    mode: RoutingMode | None  # None: challenger and shadow rows both logged (modes mixed)
    keyed: bool  # units are routing keys (sticky users); else each request is a unit
    champion: ArmData
    challenger: ArmData  # the shadow arm in shadow mode
    paired: UnitMoments | None = None  # shadow: per unit x = Σ(challenger − champion), y = rows
    series: tuple[SeriesSlice, ...] = ()
    first_ts: float | None = None
    cap: float | None = None  # the cap (winsorising) applied to the row metric, if any
    # Split mode: per fold, each arm's sums with the champion's prediction as covariate (None: the
    # log has no champion scores, or shadow mode, where pairs need no covariate).
    covariate: CovariateFolds | None = None
    # Split mode: the periods by challenger weight, in time order (one when it never changed);
    # ``champion``/``challenger`` above are then their sums. ``current``: the index of the period
    # the guardrails judge (the split in force). ``stratified``: the metric combined over
    # several periods.
    periods: tuple[Period, ...] = ()
    current: int | None = None
    stratified: Stratified | None = None

    @property
    def empty(self) -> bool:
        return self.champion.requests + self.challenger.requests == 0
