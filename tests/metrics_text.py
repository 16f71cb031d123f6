"""Reading a real ``/metrics`` scrape in tests: parse the exposition text, sum matching samples.

Parsing goes through ``prometheus_client.parser``, so a scrape that is not valid exposition text
fails the test rather than being half-read by a regular expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample as ``(name, labels, value)``."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(
            tuple(
                (sample.name, dict(sample.labels), float(sample.value))
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            )
        )

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0.0 when none)."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        """Whether at least one sample called ``name`` carries ``labels``."""
        return any(
            sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
            for sample_name, sample_labels, _ in self.samples
        )

    def values(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name``, with its labels."""
        return [
            (labels, value) for sample_name, labels, value in self.samples if sample_name == name
        ]


def scrape(client: httpx.Client, base_url: str = "") -> Scrape:
    """GET ``/metrics`` and parse it; fails on a non-200 answer."""
    response = client.get(f"{base_url}/metrics")
    response.raise_for_status()
    return Scrape.parse(response.text)
