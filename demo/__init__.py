"""The demo: churn-like data, two trained models, synthetic sticky traffic, ``make demo``."""
