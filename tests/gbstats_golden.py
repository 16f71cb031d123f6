"""Write gbstats' sequential intervals on a grid of cases to tests/cases/gbstats.json.

gbstats pins numpy < 2 and pandas < 2, which this project cannot install beside numpy 2, so its
figures are recorded once, from a separate environment, and ``tests/test_gbstats.py`` compares
this project's intervals with them (and with gbstats itself when it happens to be importable):

    python3 -m venv /tmp/gb && /tmp/gb/bin/pip install gbstats==0.8.0
    /tmp/gb/bin/python tests/gbstats_golden.py > tests/cases/gbstats.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
from gbstats.models.statistics import (
    ProportionStatistic,
    RatioStatistic,
    SampleMeanStatistic,
)

ALPHA = 0.05


def cases() -> list[dict[str, object]]:
    rng = np.random.default_rng(20240601)
    out: list[dict[str, object]] = []
    # Proportions: 50/50 and 90/10, small n, rates near 0 and 1.
    for n_c, n_t in ((20, 20), (50, 6), (1000, 1000), (18000, 2000), (90000, 10000)):
        for p_c, p_t in (
            (0.5, 0.55),
            (0.3, 0.3),
            (0.01, 0.02),
            (0.001, 0.002),
            (0.99, 0.995),
            (0.999, 0.998),
        ):
            x_c = int(rng.binomial(n_c, p_c))
            x_t = int(rng.binomial(n_t, p_t))
            if x_c in (0, n_c) or x_t in (0, n_t):
                x_c, x_t = max(1, min(x_c, n_c - 1)), max(1, min(x_t, n_t - 1))
            out.append({"kind": "proportion", "control": [n_c, x_c], "treatment": [n_t, x_t]})
    # Sample means of continuous values (losses), small and large.
    for n_c, n_t in ((10, 12), (900, 100), (9000, 1000)):
        a = rng.lognormal(0, 1, n_c)
        b = rng.lognormal(0.1, 1, n_t)
        out.append(
            {
                "kind": "mean",
                "control": [n_c, float(a.sum()), float((a * a).sum())],
                "treatment": [n_t, float(b.sum()), float((b * b).sum())],
            }
        )
    # User-level ratio metrics: x = correct rows, y = rows per user (heavy-tailed volumes).
    for users_c, users_t, acc_c, acc_t in (
        (30, 8, 0.7, 0.72),
        (1800, 200, 0.7, 0.74),
        (9000, 1000, 0.99, 0.995),
    ):
        arms = []
        for users, acc in ((users_c, acc_c), (users_t, acc_t)):
            y = rng.zipf(2.0, users).clip(1, 500).astype(float)
            p = rng.beta(acc * 10, (1 - acc) * 10, users)
            x = rng.binomial(y.astype(int), p).astype(float)
            arms.append(
                [
                    users,
                    float(x.sum()),
                    float((x * x).sum()),
                    float(y.sum()),
                    float((y * y).sum()),
                    float((x * y).sum()),
                ]
            )
        out.append({"kind": "ratio", "control": arms[0], "treatment": arms[1]})
    return out


def statistic(kind: str, v: list[float]) -> object:
    if kind == "proportion":
        return ProportionStatistic(n=int(v[0]), sum=v[1])
    if kind == "mean":
        return SampleMeanStatistic(n=int(v[0]), sum=v[1], sum_squares=v[2])
    n = int(v[0])
    return RatioStatistic(
        n=n,
        m_statistic=SampleMeanStatistic(n=n, sum=v[1], sum_squares=v[2]),
        d_statistic=SampleMeanStatistic(n=n, sum=v[3], sum_squares=v[4]),
        m_d_sum_of_products=v[5],
    )


def main() -> None:
    results = []
    for case in cases():
        for planned in (5000, 20000):
            for difference in ("absolute", "relative"):
                test = SequentialTwoSidedTTest(
                    statistic(case["kind"], case["control"]),  # type: ignore[arg-type]
                    statistic(case["kind"], case["treatment"]),  # type: ignore[arg-type]
                    SequentialConfig(
                        alpha=ALPHA,
                        difference_type=difference,
                        sequential_tuning_parameter=planned,
                    ),
                )
                lower, upper = test.confidence_interval
                results.append(
                    {
                        **case,
                        "planned": planned,
                        "difference": difference,
                        "estimate": float(test.point_estimate),
                        "lower": float(lower),
                        "upper": float(upper),
                    }
                )
    json.dump({"gbstats": "0.8.0", "alpha": ALPHA, "cases": results}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
