"""A synthetic, churn-like customer table generated in code (no downloads).

The label comes from a logistic model with interactions, thresholds and curved effects, so a
gradient-boosted model on all features genuinely beats a linear model on a few numeric ones; the
demo's challenger therefore has a real, measurable edge over its champion. Every value is drawn
from one ``numpy.random.Generator`` seeded by ``seed``: the same arguments give the same frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NUMERIC_FEATURES: list[str] = [
    "tenure_months",
    "monthly_charges",
    "total_charges",
    "support_calls",
    "num_products",
    "age",
    "late_payments_12m",
    "avg_monthly_gb",
]
CATEGORICAL_FEATURES: list[str] = [
    "contract",
    "payment_method",
    "internet_service",
    "paperless_billing",
]
FEATURES: list[str] = NUMERIC_FEATURES + CATEGORICAL_FEATURES
LABEL = "churned"

CONTRACTS = ("month-to-month", "one-year", "two-year")
PAYMENT_METHODS = ("electronic-check", "mailed-check", "bank-transfer", "credit-card")
INTERNET_SERVICES = ("fiber", "dsl", "none")

# Tuned once so that the churn rate lands near 25% across seeds (it is not re-fitted per call).
_INTERCEPT = -1.4


def make_churn_data(n_rows: int, seed: int) -> pd.DataFrame:
    """Return ``n_rows`` customers with the columns ``FEATURES + [LABEL]``.

    Integer-valued features are int64, the categoricals pandas' default string dtype; the label
    ``churned`` is 0/1 int64. Deterministic in ``(n_rows, seed)``.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    rng = np.random.default_rng(seed)

    # Many recent sign-ups and a long tail of loyal customers, capped at six years.
    tenure = np.minimum(rng.exponential(24.0, n_rows), 72.0).astype(np.int64)
    # Long-standing customers are more likely to be on longer contracts.
    p_long = 1.0 / (1.0 + np.exp(-(tenure - 30.0) / 12.0))
    contract_idx = np.where(
        rng.random(n_rows) < 0.75 - 0.5 * p_long,
        0,
        np.where(rng.random(n_rows) < 0.55, 1, 2),
    )
    contract = np.asarray(CONTRACTS, dtype=object)[contract_idx]
    payment = np.asarray(PAYMENT_METHODS, dtype=object)[
        rng.choice(4, size=n_rows, p=[0.35, 0.2, 0.22, 0.23])
    ]
    internet_idx = rng.choice(3, size=n_rows, p=[0.45, 0.35, 0.2])
    internet = np.asarray(INTERNET_SERVICES, dtype=object)[internet_idx]
    paperless = np.where(rng.random(n_rows) < 0.6, "yes", "no").astype(object)

    num_products = np.clip(rng.poisson(1.3, n_rows) + 1, 1, 6).astype(np.int64)
    age = np.clip(rng.normal(45.0, 15.0, n_rows), 18, 90).astype(np.int64)
    base_charge = np.array([75.0, 50.0, 22.0])[internet_idx]
    monthly = np.round(base_charge + 9.0 * num_products + rng.normal(0.0, 8.0, n_rows), 2)
    monthly = np.clip(monthly, 15.0, 160.0)
    total = np.round(monthly * tenure * rng.normal(1.0, 0.05, n_rows) + monthly, 2)
    is_fiber = internet_idx == 0
    support_calls = rng.poisson(np.where(is_fiber, 1.6, 0.9) + 0.4 * (num_products > 3))
    late = rng.poisson(np.where(payment == "electronic-check", 1.0, 0.4))
    gb = np.round(np.where(internet_idx == 2, 0.0, rng.gamma(2.0, 60.0, n_rows)), 1)

    m2m = contract_idx == 0
    two_year = contract_idx == 2
    logit = (
        _INTERCEPT
        + 1.4 * m2m
        - 1.6 * two_year
        # Churn hazard is steep in the first months and flattens out: a curved tenure effect.
        - 0.9 * np.log1p(tenure / 3.0)
        + 1.2 * (is_fiber & m2m)
        # Patience runs out at a threshold rather than linearly.
        + 1.8 * (support_calls >= 4)
        + 0.8 * ((support_calls >= 4) & (tenure < 12))
        + 0.5 * (payment == "electronic-check")
        + 0.6 * ((payment == "electronic-check") & (late >= 2))
        # Price sensitivity bites above a level, mostly for customers free to leave.
        + 0.035 * np.maximum(monthly - 90.0, 0.0) * (1.0 + m2m)
        # Single-product customers leave more; bundles tie people in until they get too costly.
        + 0.7 * (num_products == 1)
        - 0.5 * ((num_products >= 3) & (num_products <= 4))
        + 0.5 * ((age >= 65) & is_fiber)
        - 0.4 * ((age >= 30) & (age < 50))
        + 0.3 * (paperless == "yes")
        # Heavy users of a service they pay little for are sticky.
        - 0.004 * np.minimum(gb, 300.0) * (monthly < 70.0)
    )
    p_churn = 1.0 / (1.0 + np.exp(-logit))
    churned = (rng.random(n_rows) < p_churn).astype(np.int64)

    return pd.DataFrame(
        {
            "tenure_months": tenure,
            "monthly_charges": monthly.astype(np.float64),
            "total_charges": total.astype(np.float64),
            "support_calls": support_calls.astype(np.int64),
            "num_products": num_products,
            "age": age,
            "late_payments_12m": late.astype(np.int64),
            "avg_monthly_gb": gb.astype(np.float64),
            "contract": contract,
            "payment_method": payment,
            "internet_service": internet,
            "paperless_billing": paperless,
            LABEL: churned,
        }
    )
